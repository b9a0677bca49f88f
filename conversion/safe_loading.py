"""Loading checkpoints without running code from them.

Pickle files run arbitrary code on load, so every `.pt`/`.bin`/`.pth` goes through `torch.load(weights_only=True)`
(a restricted unpickler that only rebuilds tensors and plain containers), `.safetensors` through safetensors, and
TorchScript archives (OpenAI's original `.pt` files, whose loading deserialises and compiles TorchScript code) only
when the caller passes `allow_torchscript=True`. Archives of checkpoint folders are unpacked member by member, and a
member that would land outside the target folder (`../x`, absolute paths, links) is refused before anything is
written.
"""

import pickle
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

StateDict = dict[str, torch.Tensor]

SAFETENSORS_SUFFIX = ".safetensors"
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")


class UnsafeCheckpointError(ValueError):
    """The file can only be loaded by running code from it, or it tries to write outside its target folder."""


def is_torchscript_archive(path: str | Path) -> bool:
    """True for a TorchScript zip (it carries `constants.pkl` and compiled `code/`), as `torch.load` detects it."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in archive.namelist())


def load_torch_file(path: str | Path, allow_torchscript: bool = False) -> Any:
    """Load a `.safetensors` file or a torch checkpoint without executing code.

    Returns whatever the file holds: a flat state dict, or (open_clip training checkpoints) a dict wrapping one.
    A TorchScript archive is loaded only with `allow_torchscript=True`, and then only its tensors are returned.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.name.endswith(SAFETENSORS_SUFFIX):
        return load_file(path, device="cpu")
    if is_torchscript_archive(path):
        if not allow_torchscript:
            raise UnsafeCheckpointError(
                f"{path} is a TorchScript archive (OpenAI's original `.pt` format); loading one deserialises and "
                "compiles code stored in it. Pass --allow-torchscript only for files from a source you trust, or "
                "convert a plain state dict / safetensors file instead."
            )
        module = torch.jit.load(str(path), map_location="cpu")
        return {key: value for key, value in module.state_dict().items()}
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # what the restricted unpickler raises for anything but tensors/containers
        raise UnsafeCheckpointError(
            f"{path} cannot be loaded with torch.load(weights_only=True): it holds objects other than tensors and "
            f"plain containers, and loading it fully would run code from the file. Original error: {error}"
        ) from error


def _checked_target(root: Path, member_name: str) -> Path:
    target = (root / member_name).resolve()
    if member_name.startswith(("/", "\\")) or not target.is_relative_to(root):
        raise UnsafeCheckpointError(f"archive member {member_name!r} would be written outside {root}; refusing it.")
    return target


def extract_archive(archive: str | Path, destination: str | Path) -> Path:
    """Unpack a `.tar*` or `.zip` archive into `destination`, refusing any member that escapes it.

    Every member is checked before the first one is written, so a rejected archive leaves nothing behind.
    Links are refused outright: a checkpoint folder has no need for them and they can point anywhere.
    """
    archive = Path(archive)
    root = Path(destination).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zip_file:
            members = zip_file.infolist()
            for info in members:
                _checked_target(root, info.filename)
                # The high 16 bits of external_attr hold the Unix mode; 0o120000 marks a symbolic link.
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise UnsafeCheckpointError(f"archive member {info.filename!r} is a link; refusing it.")
            for info in members:
                zip_file.extract(info, root)
        return root
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar_file:
            tar_members = tar_file.getmembers()
            for member in tar_members:
                _checked_target(root, member.name)
                if not (member.isfile() or member.isdir()):
                    raise UnsafeCheckpointError(
                        f"archive member {member.name!r} is not a regular file or folder; refusing it."
                    )
            # The "data" filter re-checks every member (paths, links, device files, permissions) as it extracts.
            tar_file.extractall(root, members=tar_members, filter="data")
        return root
    raise ValueError(f"{archive} is neither a tar nor a zip archive (expected one of {ARCHIVE_SUFFIXES}).")


def is_archive(path: str | Path) -> bool:
    path = Path(path)
    return path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES) and not is_torchscript_archive(path)
