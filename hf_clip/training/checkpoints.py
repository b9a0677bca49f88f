"""Checkpoint folders on disk: written atomically, found, verified and rotated.

A checkpoint is written into `checkpoints/.step_XXXXXXXX.partial`; every rank flushes (fsync) what it wrote; after a
barrier the main process writes `training_state.json` last, flushes it and renames the folder to `step_XXXXXXXX`.
So a `step_*` folder holding `training_state.json` is complete by construction, and a kill or a full disk at any
moment leaves at worst a `.partial` folder, which `latest` never picks. The final `model/` folder is committed the
same way. Anything else under `checkpoints/` (a `.partial` or `.old` folder, a `step_*` folder without
`training_state.json` from an older version) is incomplete: ignored with a warning naming it, and removed.
"""

import json
import logging
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from ..saved_folders import safetensors_problem

logger = logging.getLogger(__name__)

CHECKPOINTS_FOLDER = "checkpoints"
CHECKPOINT_PREFIX = "step_"
TRAINING_STATE_FILE = "training_state.json"
PARTIAL_SUFFIX = ".partial"
OLD_SUFFIX = ".old"
# What a failed write raises: OSError (ENOSPC from Python), RuntimeError (torch.save: "iostream error", "unexpected
# pos"), SafetensorError ("No space left on device").
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


class CheckpointError(RuntimeError):
    """A checkpoint or saved folder that cannot be loaded or written; the message names the folder, the file and
    what to do."""


def checkpoint_folder(output_dir: Path, step: int) -> Path:
    return output_dir / CHECKPOINTS_FOLDER / f"{CHECKPOINT_PREFIX}{step:08d}"


def partial_folder(final: Path) -> Path:
    """Where `final` is written before it is committed: a hidden sibling, so the rename stays on one filesystem."""
    return final.with_name(f".{final.name}{PARTIAL_SUFFIX}")


def write_synced(path: Path, text: str) -> None:
    """`text` into `path`, on disk (fsync) before returning."""
    with path.open("w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` and the folders themselves (a rename is durable only once the folder is)."""
    for path in [*sorted(folder.rglob("*")), folder]:
        fsync_path(path)


def fsync_path(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # another rank's temporary file, renamed or removed since the folder was listed
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def commit_folder(partial: Path, final: Path) -> None:
    """Rename the complete `partial` to `final`. An existing `final` (a checkpoint of a step written again after a
    resume from an earlier one, or the previous `model/`) is moved aside first and removed only afterwards."""
    old = final.with_name(f".{final.name}{OLD_SUFFIX}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    partial.rename(final)
    fsync_path(final.parent)
    if old.exists():
        shutil.rmtree(old)


def write_folder_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """One process: `write(partial)` fills a fresh partial folder, which is flushed and renamed to `final`. A failed
    write (a full disk) removes the partial folder and leaves `final` as it was."""
    partial = partial_folder(final)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        write(partial)
        fsync_tree(partial)
    except WRITE_ERRORS as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise write_error(final, error) from error
    commit_folder(partial, final)


def write_error(final: Path, error: BaseException) -> CheckpointError:
    """The error of a failed write of `final`, with the free space on its filesystem (a full disk is the usual
    cause: torch reports it as `basic_ios::clear: iostream error`)."""
    free = shutil.disk_usage(final.parent).free
    return CheckpointError(
        f"could not write {final} ({type(error).__name__}: {error}); {free / 2**20:.1f} MiB free on its filesystem. "
        f"Nothing was committed: the previous folder, if any, is intact. Free disk space (or set save_total_limit) "
        "and rerun with --resume latest."
    )


def is_complete(folder: Path) -> bool:
    return folder.is_dir() and (folder / TRAINING_STATE_FILE).is_file()


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoints under `output_dir/checkpoints`, oldest step first."""
    folder = output_dir / CHECKPOINTS_FOLDER
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.glob(f"{CHECKPOINT_PREFIX}*") if is_complete(path))


def remove_incomplete_checkpoints(output_dir: Path) -> list[Path]:
    """Remove (with a warning naming each) every entry of `output_dir/checkpoints` that is not a complete
    checkpoint: what a kill or a full disk left mid-write. Main process only. Returns the removed paths."""
    folder = output_dir / CHECKPOINTS_FOLDER
    if not folder.is_dir():
        return []
    complete = set(complete_checkpoints(output_dir))
    removed = []
    for path in sorted(folder.iterdir()):
        if path in complete:
            continue
        logger.warning("removing incomplete checkpoint %s (a save that did not finish: killed or out of disk)", path)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        removed.append(path)
    return removed


def rotate_checkpoints(output_dir: Path, save_total_limit: int | None) -> None:
    """Keep the newest `save_total_limit` complete checkpoints (at least one: the newest is never removed)."""
    if save_total_limit is None:
        return
    for path in complete_checkpoints(output_dir)[: -max(1, save_total_limit)]:
        logger.info("removing %s (save_total_limit=%d)", path, save_total_limit)
        shutil.rmtree(path)


def latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = complete_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def read_training_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / TRAINING_STATE_FILE).read_text())


# --- checking files before loading them ------------------------------------------------------------------------


def file_problem(path: Path) -> str | None:
    """Why `path` cannot be loaded, for the formats checkpoints hold (safetensors, torch's zip archives, JSON)."""
    if path.stat().st_size == 0:
        return "empty (0 bytes)"
    if path.suffix == ".safetensors":
        return safetensors_problem(path)
    # torch.save (accelerate's optimizer, scheduler and RNG-state files) writes a zip archive; a cut one has no
    # central directory.
    if path.suffix in (".bin", ".pt", ".pth", ".pkl"):
        if not zipfile.is_zipfile(path):
            return "cut short or corrupt (not a complete torch archive)"
        return None
    if path.suffix == ".json":
        try:
            json.loads(path.read_text())
        except ValueError:
            return "cut short or corrupt (not valid JSON)"
    return None


def check_folder_files(folder: Path, required: list[str], advice: str) -> None:
    """Raise one `CheckpointError` naming `folder`, the first missing or damaged file and `advice`."""
    for name in required:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} cannot be loaded: {name} is missing. {advice}")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        problem = file_problem(path)
        if problem is not None:
            raise CheckpointError(f"{folder} cannot be loaded: {path.relative_to(folder)} is {problem}. {advice}")


def earlier_checkpoint_advice(folder: Path) -> str:
    """What to do about a damaged checkpoint: resume from the newest complete one before it, if there is one."""
    earlier = [path for path in complete_checkpoints(folder.parent.parent) if path.name < folder.name]
    if earlier:
        return f"Resume from an earlier checkpoint: --resume {earlier[-1]} (or delete {folder})."
    return f"There is no earlier checkpoint: delete {folder} and start again, or resume from a copy of it."
