"""What a training run keeps between steps and across restarts: each rank's data position, checkpoints (written
and checked by `checkpoints`), the final model folder, and the metrics log."""

import contextlib
import json
import logging
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ..data.samples import SKIP_REASONS
from ..data.streams import ClipBatches
from ..processing_hf_clip import HfClipProcessor
from .checkpoints import (
    PARTIAL_SUFFIX,
    TRAINING_STATE_FILE,
    WRITE_ERRORS,
    CheckpointError,
    check_folder_files,
    checkpoint_folder,
    commit_folder,
    earlier_checkpoint_advice,
    fsync_tree,
    is_complete,
    latest_checkpoint,
    partial_folder,
    read_training_state,
    rotate_checkpoints,
    write_error,
    write_folder_atomically,
    write_synced,
)
from .run_folder import METRICS_FILE, check_same_run

logger = logging.getLogger(__name__)


class DataCursor:
    """This rank's position in its data stream: epoch, batches taken in it, skip counts so far, one row of
    `SKIP_REASONS` per training source (`skipped` as nested lists, as `state` writes them), and the number of
    captions truncated to the text context so far."""

    def __init__(
        self,
        epoch: int = 0,
        batches_in_epoch: int = 0,
        skipped: list[list[int]] | list[int] | None = None,
        num_sources: int = 1,
        truncated_captions: int = 0,
    ):
        self.epoch = epoch
        self.batches_in_epoch = batches_in_epoch
        self.truncated_captions = torch.tensor(truncated_captions, dtype=torch.int64)
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
        return {
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "skipped": self.skipped.tolist(),
            "truncated_captions": int(self.truncated_captions),
        }

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
                self.truncated_captions += batch.pop("truncated_captions", 0)  # skip-only records have none
                if batch:
                    trained = True
                    yield batch
            if not trained:
                raise RuntimeError(
                    f"rank {rank} got no full batch from its share of the data: use more data or a smaller batch."
                )
            self.epoch, self.batches_in_epoch, trained = self.epoch + 1, 0, False


def checkpoint_to_resume(resume: str | None, output_dir: Path) -> Path | None:
    """`None`, a checkpoint folder, or `latest`: the newest complete checkpoint under `output_dir/checkpoints` (none
    yet: a new run, so a preempted job's restart loop can always pass `--resume latest`)."""
    if resume is None:
        return None
    if resume == "latest":
        latest = latest_checkpoint(output_dir)
        if latest is None:
            logger.info("--resume latest: no complete checkpoint under %s yet, starting a new run", output_dir)
        return latest
    path = Path(resume)
    if not is_complete(path):
        raise CheckpointError(
            f"{path} is not a complete checkpoint written by the training loop (no {TRAINING_STATE_FILE}): "
            "give a checkpoints/step_* folder, or --resume latest for the newest complete one."
        )
    return path


def load_checkpoint(
    accelerator: Accelerator, path: Path, num_sources: int, fingerprint: dict[str, Any]
) -> tuple[int, DataCursor]:
    """Check that `path` is intact and belongs to this run (`fingerprint`), restore `save_state` and return the
    stored step and this rank's data position (skip counts for `num_sources` training sources)."""
    advice = earlier_checkpoint_advice(path)
    data_states = [f"data_state_rank{rank}.json" for rank in range(accelerator.num_processes)]
    check_folder_files(path, [TRAINING_STATE_FILE, *data_states], advice)
    training_state = read_training_state(path)
    check_same_run(path, training_state.get("run"), fingerprint)
    try:
        accelerator.load_state(str(path))
    except (*WRITE_ERRORS, ValueError, EOFError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{path} cannot be loaded ({type(error).__name__}: {error}). {advice}") from error
    data_state = json.loads((path / data_states[accelerator.process_index]).read_text())
    return training_state["step"], DataCursor(**data_state, num_sources=num_sources)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    step: int,
    cursor: DataCursor,
    fingerprint: dict[str, Any],
    save_total_limit: int | None = None,
) -> None:
    """`save_state` (model, optimizer, scheduler, RNG), every rank's data position, then the step and the run's
    fingerprint, committed atomically (see `checkpoints`); the oldest checkpoints beyond `save_total_limit` go."""
    final = checkpoint_folder(output_dir, step)
    partial = partial_folder(final)
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    with removed_on_write_error(accelerator, final, partial):
        accelerator.save_state(str(partial))
        write_synced(partial / f"data_state_rank{accelerator.process_index}.json", json.dumps(cursor.state()))
        fsync_tree(partial)  # this rank's files (and the others': harmless) are on disk before the barrier
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with removed_on_write_error(accelerator, final, partial):
            write_synced(partial / TRAINING_STATE_FILE, json.dumps({"step": step, "run": fingerprint}))
            commit_folder(partial, final)
        rotate_checkpoints(output_dir, save_total_limit)
    accelerator.wait_for_everyone()


@contextlib.contextmanager
def removed_on_write_error(accelerator: Accelerator, final: Path, partial: Path) -> Iterator[None]:
    """A failed write (a full disk) of this rank: the main process removes the partial folder (freeing the space),
    and the error names the checkpoint and the free space. Barriers stay outside: a dead peer is not a write error."""
    try:
        yield
    except WRITE_ERRORS as error:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise write_error(final, error) from error


def save_final(accelerator: Accelerator, embedder: torch.nn.Module, processor: HfClipProcessor, path: Path) -> None:
    """Model and processor in one folder, committed atomically; the full state dict is gathered first (FSDP shards
    it)."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(embedder)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(embedder).model
        prefix = "model."

        def write(folder: Path) -> None:
            model.save_pretrained(folder, state_dict={k[len(prefix) :]: v for k, v in state_dict.items()})
            processor.save_pretrained(folder)

        write_folder_atomically(path, write)
        logger.info("saved model and processor to %s", path)
    accelerator.wait_for_everyone()


def drop_metrics_after(accelerator: Accelerator, output_dir: Path, step: int) -> None:
    """Keep the `metrics.jsonl` lines up to `step` (where a run resumes): the steps it replays are logged again."""
    path = output_dir / METRICS_FILE
    if not accelerator.is_main_process or not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
        partial = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
        write_synced(partial, "".join(kept))
        partial.replace(path)
        logger.info(
            "metrics.jsonl: dropped %d lines after step %d (logged again by this run)", len(lines) - len(kept), step
        )


def log_record(accelerator: Accelerator, output_dir: Path, step: int, record: dict[str, Any]) -> None:
    """Scalars to tensorboard and, on the main process, one line of `metrics.jsonl`."""
    accelerator.log(record, step=step)
    if accelerator.is_main_process:
        logger.info("step %d: %s", step, {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()})
        with (output_dir / METRICS_FILE).open("a") as file:
            file.write(json.dumps({"step": step, **record}) + "\n")
