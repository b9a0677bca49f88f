"""Checks of a saved model folder before transformers loads it, so a missing folder, a training checkpoint given
where a model folder belongs, or a weights file cut short by a kill or a full disk is one error naming the folder,
the file and what to do (transformers would report a Hub repo-id rule or safetensors' `incomplete metadata`)."""

import json
import re
import struct
from pathlib import Path

CONFIG_FILE = "config.json"
# A name transformers may resolve on the Hub (or in its cache) rather than on disk: `name` or `namespace/name`.
REPO_ID = re.compile(r"^[\w][\w.-]*(/[\w][\w.-]*)?$")


def safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file `path` is unreadable (cut short, bad header), or None. Reads only the header."""
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            return f"cut short ({size} bytes, no header)"
        (header_size,) = struct.unpack("<Q", prefix)
        if 8 + header_size > size:
            return f"cut short ({size} bytes; its header alone needs {8 + header_size})"
        try:
            header = json.loads(file.read(header_size))
        except ValueError:
            return "not a safetensors file (unreadable header)"
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + header_size + end > size:
        return f"cut short ({size} bytes of {8 + header_size + end})"
    return None


def check_model_folder(name_or_path: str | Path, what: str = "model folder") -> None:
    """Raise one clear error when `name_or_path` is not a loadable saved model folder. A name that does not exist
    locally but has the form of a Hub repo id (`name`, `namespace/name`) is left to transformers."""
    folder = Path(name_or_path)
    if not folder.exists():
        if REPO_ID.match(str(name_or_path)) and not str(name_or_path).startswith("."):
            return
        raise FileNotFoundError(
            f"{what} {folder} does not exist: give a folder written by save_pretrained (a training run writes "
            "<output_dir>/model)."
        )
    if not folder.is_dir():
        raise NotADirectoryError(
            f"{what} {folder} is a file; give the folder that holds {CONFIG_FILE} and the weights."
        )
    if not (folder / CONFIG_FILE).is_file():
        checkpoint = (folder / "training_state.json").is_file() or folder.name.startswith("step_")
        raise FileNotFoundError(
            f"{what} {folder} has no {CONFIG_FILE}, so it is not a saved model folder"
            + (
                ": it is a training checkpoint (accelerate state). Use the run's <output_dir>/model, or continue "
                "training from it with --resume."
                if checkpoint
                else " (save_pretrained writes one)."
            )
        )
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not any(folder.glob("pytorch_model*.bin")):
        raise FileNotFoundError(f"{what} {folder} holds no weights (model.safetensors): its save did not finish.")
    for path in weights:
        problem = safetensors_problem(path)
        if problem is not None:
            raise OSError(
                f"{what} {folder}: {path.name} is {problem}, so its save did not finish or the copy was damaged. "
                "Save or copy the folder again (a training run: its last checkpoint holds the weights; resume it)."
            )
