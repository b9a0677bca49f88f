"""One run per `output_dir`: a second run is refused unless it resumes the first (`--resume`) or replaces it
(`--overwrite_output_dir`), and a resume must continue the same run configuration: the model, the data, the seed
and the batch layout are stored with every checkpoint (`run_fingerprint`) and compared before loading."""

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from ..configuration_hf_clip import HfClipConfig
from .checkpoints import CHECKPOINTS_FOLDER, CheckpointError, partial_folder, remove_incomplete_checkpoints
from .config import TrainConfig

logger = logging.getLogger(__name__)

# The logged scalars: one JSON object per logged step, `{"step": N, ...}`.
METRICS_FILE = "metrics.jsonl"
# What a run writes into its output_dir; `--overwrite_output_dir` removes these and nothing else.
RUN_OUTPUTS = (CHECKPOINTS_FOLDER, "logs", METRICS_FILE, "model")
# Keys of a config's dict that say where or with what it was saved, not what it is.
VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version"}


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The records a run logged to its `metrics.jsonl`, in order."""
    lines = (Path(output_dir) / METRICS_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def prepare_output_dir(accelerator: Accelerator, config: TrainConfig) -> None:
    """Refuse an `output_dir` that holds another run (every rank, before any writes); with
    `overwrite_output_dir` remove that run's outputs; remove what an interrupted checkpoint save left behind."""
    output_dir = Path(config.output_dir)
    entries = sorted(path.name for path in output_dir.iterdir()) if output_dir.is_dir() else []
    if entries and config.resume is None and not config.overwrite_output_dir:
        raise FileExistsError(
            f"output_dir {output_dir} is not empty ({', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}): "
            "continue that run with --resume latest, write to a new --output_dir, or pass --overwrite_output_dir "
            "to replace it."
        )
    accelerator.wait_for_everyone()  # every rank has looked before the main process changes anything
    if accelerator.is_main_process:
        if config.overwrite_output_dir:
            for name in (*RUN_OUTPUTS, partial_folder(output_dir / "model").name):
                path = output_dir / name
                if path.exists():
                    logger.warning("overwrite_output_dir: removing %s", path)
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        remove_incomplete_checkpoints(output_dir)
    accelerator.wait_for_everyone()


def _without_volatile_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_volatile_keys(item) for key, item in value.items() if key not in VOLATILE_CONFIG_KEYS}
    return value


def run_fingerprint(config: TrainConfig, model_config: HfClipConfig, num_processes: int) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it, as plain JSON: the architecture, the training
    sources (files resolved), the seed, and the batch layout every rank's data position depends on. `max_steps`,
    learning rates and logging may change between a run and its resume."""
    fingerprint = {
        "model": _without_volatile_keys(model_config.to_dict()),
        "data": [asdict(spec) for spec in config.resolved_train_specs()],
        "seed": config.seed,
        "per_device_batch_size": config.per_device_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "num_processes": num_processes,
    }
    return json.loads(json.dumps(fingerprint))  # as it reads back from training_state.json (e.g. string dict keys)


def differences(stored: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted names of the entries where `stored` and `current` differ."""
    if isinstance(stored, dict) and isinstance(current, dict):
        return [
            name
            for key in sorted(set(stored) | set(current))
            for name in differences(stored.get(key), current.get(key), f"{prefix}{key}.")
        ]
    return [] if stored == current else [prefix.rstrip(".")]


def check_same_run(checkpoint: Path, stored: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Raise when the checkpoint was written by another run configuration, naming what differs."""
    if stored is None:
        logger.warning("%s was written without a run fingerprint (an older version): not checked", checkpoint)
        return
    changed = differences(stored, current)
    if changed:
        shown = "; ".join(
            f"{name}: checkpoint {_lookup(stored, name)!r}, this run {_lookup(current, name)!r}"
            for name in changed[:4]
        )
        raise CheckpointError(
            f"{checkpoint} belongs to another run configuration ({shown}{'; ...' if len(changed) > 4 else ''}). "
            "Resume with the settings it was written with, or start this run in a new --output_dir (or replace "
            "the old one with --overwrite_output_dir)."
        )


def _lookup(value: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value
