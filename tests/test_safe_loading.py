"""Loading never runs code from a checkpoint, and archives cannot write outside their target folder."""

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conversion.convert_openai import main as convert_openai_main
from conversion.safe_loading import UnsafeCheckpointError, extract_archive, is_archive, load_torch_file


class WritesMarker:
    """Unpickling this object calls `Path.touch(marker)`: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickle_that_would_run_code_is_refused(tmp_path, zip_format):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save(
        {"weight": torch.zeros(2), "payload": WritesMarker(marker)}, path, _use_new_zipfile_serialization=zip_format
    )
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        load_torch_file(path)
    assert not marker.exists()


def test_plain_pickle_file_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(WritesMarker(marker)))
    with pytest.raises(UnsafeCheckpointError):
        load_torch_file(path)
    assert not marker.exists()


def test_converter_cli_refuses_the_pickle_and_writes_nothing(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "ViT-B-32.pt"
    torch.save({"visual.proj": torch.zeros(2, 2), "payload": WritesMarker(marker)}, path)
    with pytest.raises(UnsafeCheckpointError):
        convert_openai_main([str(path), str(tmp_path / "out")])
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_tensors_and_plain_containers_load(tmp_path):
    torch.save({"state_dict": {"module.w": torch.ones(3)}, "epoch": 2}, tmp_path / "epoch_2.pt")
    checkpoint = load_torch_file(tmp_path / "epoch_2.pt")
    assert checkpoint["epoch"] == 2 and torch.equal(checkpoint["state_dict"]["module.w"], torch.ones(3))
    save_file({"w": torch.arange(4.0)}, tmp_path / "weights.safetensors")
    assert torch.equal(load_torch_file(tmp_path / "weights.safetensors")["w"], torch.arange(4.0))


def test_torchscript_archive_needs_the_explicit_flag(tmp_path):
    path = tmp_path / "openai_jit.pt"
    torch.jit.script(torch.nn.Linear(2, 3)).save(str(path))
    assert not is_archive(path)
    with pytest.raises(UnsafeCheckpointError, match="--allow-torchscript"):
        load_torch_file(path)
    state_dict = load_torch_file(path, allow_torchscript=True)
    assert set(state_dict) == {"weight", "bias"} and state_dict["weight"].shape == (3, 2)


def _tar_with(path: Path, members: dict[str, bytes], symlink: tuple[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink is not None:
            info = tarfile.TarInfo(symlink[0])
            info.type, info.linkname = tarfile.SYMTYPE, symlink[1]
            tar.addfile(info)
    return path


def _zip_with(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.mark.parametrize("evil_name", ["../evil", "good/../../evil", "/tmp/hf_clip_evil_absolute"])
def test_tar_member_escaping_the_folder_is_rejected(tmp_path, evil_name):
    archive = _tar_with(tmp_path / "checkpoint.tar.gz", {"config.json": b"{}", evil_name: b"pwned"})
    target = tmp_path / "out" / "inner"
    with pytest.raises(UnsafeCheckpointError, match="outside"):
        extract_archive(archive, target)
    assert not (tmp_path / "out" / "evil").exists() and not (tmp_path / "evil").exists()
    assert not Path("/tmp/hf_clip_evil_absolute").exists()
    assert not (target / "config.json").exists()  # checked before anything is written


def test_zip_member_escaping_the_folder_is_rejected(tmp_path):
    archive = _zip_with(tmp_path / "checkpoint.zip", {"config.json": b"{}", "../evil": b"pwned"})
    with pytest.raises(UnsafeCheckpointError, match="outside"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "out" / "config.json").exists()


def test_tar_symlink_is_rejected(tmp_path):
    archive = _tar_with(tmp_path / "checkpoint.tar.gz", {"config.json": b"{}"}, symlink=("weights", "/etc/passwd"))
    with pytest.raises(UnsafeCheckpointError, match="not a regular file"):
        extract_archive(archive, tmp_path / "out")


def test_well_formed_archives_extract(tmp_path):
    members = {"hub/open_clip_config.json": b"{}", "hub/open_clip_model.safetensors": b"x"}
    for archive in (_tar_with(tmp_path / "a.tar.gz", members), _zip_with(tmp_path / "a.zip", members)):
        assert is_archive(archive)
        out = extract_archive(archive, tmp_path / archive.name.replace(".", "_"))
        assert (out / "hub" / "open_clip_config.json").read_bytes() == b"{}"
