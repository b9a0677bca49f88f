"""What a training run keeps between steps and across restarts: each rank's data position, checkpoints, the final
model folder, and the metrics log."""

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ..data.samples import SKIP_REASONS
from ..data.streams import ClipBatches
from ..processing_hf_clip import HfClipProcessor

logger = logging.getLogger(__name__)

TRAINING_STATE_FILE = "training_state.json"


class DataCursor:
    """This rank's position in its data stream: epoch, batches taken in it, and skip counts so far, one row of
    `SKIP_REASONS` per training source (`skipped` as nested lists, as `state` writes them)."""

    def __init__(
        self,
        epoch: int = 0,
        batches_in_epoch: int = 0,
        skipped: list[list[int]] | list[int] | None = None,
        num_sources: int = 1,
    ):
        self.epoch = epoch
        self.batches_in_epoch = batches_in_epoch
        shape = (num_sources, len(SKIP_REASONS))
        if skipped is None:
            self.skipped = torch.zeros(shape, dtype=torch.int64)
            return
        counts = torch.tensor(skipped, dtype=torch.int64)
        if counts.numel() % num_sources == 0:  # a flat row is one source (stored before per-source counts)
            counts = counts.view(num_sources, -1)
            # Reasons are only ever appended: a checkpoint written before the newer ones counted none of them.
            counts = torch.nn.functional.pad(counts, (0, max(0, len(SKIP_REASONS) - counts.shape[1])))
        if tuple(counts.shape) != shape:
            raise ValueError(
                f"the stored skip counts have shape {tuple(counts.shape)}, this run counts {shape} (a row of "
                f"{SKIP_REASONS} per training source): resume with the sources the checkpoint was written with."
            )
        self.skipped = counts

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch, "skipped": self.skipped.tolist()}

    def stream(
        self, batches: ClipBatches, loader: torch.utils.data.DataLoader, rank: int
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches forever, epoch after epoch, starting (by replay) from the stored position."""
        trained = self.batches_in_epoch > 0
        while True:
            batches.set_epoch(self.epoch)
            iterator = iter(loader)
            for _ in range(self.batches_in_epoch):  # replay to the resume point
                next(iterator)
            for batch in iterator:
                self.batches_in_epoch += 1  # counts loader items (also skip-only records): what replay consumes
                self.skipped += batch.pop("skipped")
                if batch:
                    trained = True
                    yield batch
            if not trained:
                raise RuntimeError(
                    f"rank {rank} got no full batch from its share of the data: use more data or a smaller batch."
                )
            self.epoch, self.batches_in_epoch, trained = self.epoch + 1, 0, False


def checkpoint_to_resume(resume: str | None, output_dir: Path) -> Path | None:
    """`None`, a checkpoint folder, or `latest`: the highest step under `output_dir/checkpoints`."""
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = sorted((output_dir / "checkpoints").glob("step_*"))
        if not checkpoints:
            raise FileNotFoundError(f"--resume latest: no checkpoint under {output_dir / 'checkpoints'}.")
        return checkpoints[-1]
    path = Path(resume)
    if not (path / TRAINING_STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint written by the training loop (no {TRAINING_STATE_FILE}).")
    return path


def load_checkpoint(accelerator: Accelerator, path: Path, num_sources: int) -> tuple[int, DataCursor]:
    """Restore `save_state` and return the stored step and this rank's data position (skip counts for
    `num_sources` training sources)."""
    accelerator.load_state(str(path))
    step = json.loads((path / TRAINING_STATE_FILE).read_text())["step"]
    data_state = json.loads((path / f"data_state_rank{accelerator.process_index}.json").read_text())
    cursor = DataCursor(**data_state, num_sources=num_sources)
    return step, cursor


def save_checkpoint(accelerator: Accelerator, path: Path, step: int, cursor: DataCursor) -> None:
    """`save_state` (model, optimizer, scheduler, RNG) plus the step and every rank's data position."""
    accelerator.save_state(str(path))
    (path / f"data_state_rank{accelerator.process_index}.json").write_text(json.dumps(cursor.state()))
    if accelerator.is_main_process:
        (path / TRAINING_STATE_FILE).write_text(json.dumps({"step": step}))
    accelerator.wait_for_everyone()


def save_final(accelerator: Accelerator, embedder: torch.nn.Module, processor: HfClipProcessor, path: Path) -> None:
    """Model and processor in one folder; the full state dict is gathered first (FSDP shards it)."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(embedder)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(embedder).model
        prefix = "model."
        model.save_pretrained(path, state_dict={k[len(prefix) :]: v for k, v in state_dict.items()})
        processor.save_pretrained(path)
        logger.info("saved model and processor to %s", path)
    accelerator.wait_for_everyone()


def log_record(accelerator: Accelerator, output_dir: Path, step: int, record: dict[str, Any]) -> None:
    """Scalars to tensorboard and, on the main process, one line of `metrics.jsonl`."""
    accelerator.log(record, step=step)
    if accelerator.is_main_process:
        logger.info("step %d: %s", step, {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()})
        with (output_dir / "metrics.jsonl").open("a") as file:
            file.write(json.dumps({"step": step, **record}) + "\n")
