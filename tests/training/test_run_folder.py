"""Runs never overwrite each other, a resume continues only its own run, `--resume latest` with nothing to resume
starts fresh, metrics are not duplicated, damaged checkpoints and a full disk give one clear error, and
`save_total_limit` keeps the newest checkpoints. One process, in-process runs of the tiny model on real shards."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from faults import run_arguments
from safetensors.torch import load_file

from hf_clip.training import main
from hf_clip.training.checkpoints import CheckpointError, complete_checkpoints, latest_checkpoint
from hf_clip.training.run_folder import read_metrics


@pytest.fixture(scope="module")
def args(tmp_path_factory) -> list[str]:
    return run_arguments(tmp_path_factory.mktemp("run"), num_shards=1, max_steps=4)


@pytest.fixture(scope="module")
def finished(args, tmp_path_factory) -> Path:
    """A complete 4-step run: checkpoints at steps 2 and 4, model/."""
    output_dir = tmp_path_factory.mktemp("finished") / "out"
    main([*args, "--output_dir", str(output_dir)])
    return output_dir


def copy_run(finished: Path, tmp_path: Path) -> Path:
    output_dir = tmp_path / "out"
    shutil.copytree(finished, output_dir)
    return output_dir


def metric_steps(output_dir: Path) -> list[int]:
    return [record["step"] for record in read_metrics(output_dir)]


def test_a_second_run_into_a_used_output_dir_is_refused_unless_overwritten(args, finished, tmp_path):
    output_dir = copy_run(finished, tmp_path)
    with pytest.raises(FileExistsError, match=r"output_dir .* is not empty .*--resume latest.*--overwrite_output_dir"):
        main([*args, "--output_dir", str(output_dir), "--max_steps", "2"])
    (output_dir / "notes.txt").write_text("mine")
    main([*args, "--output_dir", str(output_dir), "--max_steps", "2", "--overwrite_output_dir"])
    assert [path.name for path in complete_checkpoints(output_dir)] == ["step_00000002"]  # the old step 4 is gone
    assert metric_steps(output_dir) == [1, 2] and (output_dir / "notes.txt").read_text() == "mine"


def test_resume_latest_without_a_checkpoint_starts_fresh_and_drops_stale_metrics(args, finished, tmp_path, caplog):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    shutil.copy(finished / "metrics.jsonl", output_dir)  # a run killed before its first checkpoint logged these
    caplog.set_level("INFO")
    main([*args, "--output_dir", str(output_dir), "--resume", "latest"])
    assert "no complete checkpoint under" in caplog.text and "starting a new run" in caplog.text
    assert metric_steps(output_dir) == [1, 2, 3, 4]
    assert (
        load_file(output_dir / "model" / "model.safetensors").keys()
        == load_file(finished / "model" / "model.safetensors").keys()
    )


def test_a_resume_from_an_earlier_checkpoint_replaces_the_later_metrics(args, finished, tmp_path):
    output_dir = copy_run(finished, tmp_path)
    main([*args, "--output_dir", str(output_dir), "--resume", str(output_dir / "checkpoints" / "step_00000002")])
    assert metric_steps(output_dir) == [1, 2, 3, 4]
    resumed, uninterrupted = (load_file(path / "model" / "model.safetensors") for path in (output_dir, finished))
    assert all(torch.equal(resumed[name], tensor) for name, tensor in uninterrupted.items())


@pytest.mark.parametrize(
    ("change", "named"),
    [(["--seed", "1"], "seed"), (["--per_device_batch_size", "4"], "per_device_batch_size")],
)
def test_a_resume_with_another_run_configuration_is_refused(args, finished, tmp_path, change, named):
    output_dir = copy_run(finished, tmp_path)
    with pytest.raises(CheckpointError, match=rf"belongs to another run configuration \({named}: checkpoint"):
        main([*args, "--output_dir", str(output_dir), "--resume", "latest", "--max_steps", "6", *change])


def test_a_resume_with_another_architecture_names_the_field(args, finished, tmp_path):
    output_dir = copy_run(finished, tmp_path)
    model_json = Path(args[args.index("--model_config") + 1])
    values = json.loads(model_json.read_text())
    values["text_config"]["num_hidden_layers"] = 1
    (tmp_path / "other.json").write_text(json.dumps(values))
    with pytest.raises(CheckpointError, match=r"model\.text_config\.num_hidden_layers: checkpoint 2, this run 1"):
        main(
            [
                *args,
                "--output_dir",
                str(output_dir),
                "--resume",
                "latest",
                "--model_config",
                str(tmp_path / "other.json"),
            ]
        )


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("cut model", r"step_00000004 cannot be loaded: model.safetensors is cut short"),
        ("cut optimizer", r"step_00000004 cannot be loaded: optimizer.bin is cut short or corrupt"),
        ("cut rng", r"step_00000004 cannot be loaded: random_states_0.pkl is cut short or corrupt"),
        ("no data state", r"step_00000004 cannot be loaded: data_state_rank0.json is missing"),
    ],
)
def test_a_damaged_checkpoint_is_one_error_naming_folder_file_and_the_earlier_checkpoint(
    args, finished, tmp_path, damage, message
):
    output_dir = copy_run(finished, tmp_path)
    checkpoint = output_dir / "checkpoints" / "step_00000004"
    if damage == "no data state":
        (checkpoint / "data_state_rank0.json").unlink()
    else:
        name = {"cut model": "model.safetensors", "cut optimizer": "optimizer.bin", "cut rng": "random_states_0.pkl"}
        path = checkpoint / name[damage]
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    earlier = output_dir / "checkpoints" / "step_00000002"
    with pytest.raises(CheckpointError, match=rf"{message}.*Resume from an earlier checkpoint: --resume {earlier}"):
        main([*args, "--output_dir", str(output_dir), "--resume", "latest", "--max_steps", "6"])


def test_save_total_limit_keeps_the_newest(args, tmp_path):
    output_dir = tmp_path / "out"
    main([*args, "--output_dir", str(output_dir), "--save_total_limit", "1"])
    assert [path.name for path in complete_checkpoints(output_dir)] == ["step_00000004"]
    with pytest.raises(ValueError, match="save_total_limit must be at least 1"):
        main([*args, "--output_dir", str(tmp_path / "other"), "--save_total_limit", "0"])


def test_a_full_disk_while_saving_leaves_the_previous_checkpoint_latest(args, finished, tmp_path):
    """A real ENOSPC: the run writes into a tmpfs that holds one checkpoint and a half (we run as root here)."""
    checkpoint = finished / "checkpoints" / "step_00000002"
    pages = sum(-(-path.stat().st_size // 4096) for path in checkpoint.rglob("*") if path.is_file())
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    size_kib = (pages * 3 // 2) * 4 + 64
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mount_point)])
    assert mounted.returncode == 0, "mounting a tmpfs needs root (this test makes a real full disk)"
    try:
        output_dir = mount_point / "out"
        with pytest.raises(CheckpointError, match=r"could not write .*step_00000004 .*MiB free.*previous folder"):
            main([*args, "--output_dir", str(output_dir)])
        assert latest_checkpoint(output_dir) == output_dir / "checkpoints" / "step_00000002"
        assert sorted(path.name for path in (output_dir / "checkpoints").iterdir()) == ["step_00000002"]
        for path in checkpoint.rglob("*"):  # intact: the same bytes as the uninterrupted run's step 2
            if path.is_file():
                assert (output_dir / "checkpoints" / "step_00000002" / path.name).read_bytes() == path.read_bytes()
        moved = tmp_path / "moved"
        shutil.copytree(output_dir, moved)
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
    main([*args, "--output_dir", str(moved), "--resume", "latest"])  # more space: the run goes on from step 2
    resumed, uninterrupted = (load_file(path / "model" / "model.safetensors") for path in (moved, finished))
    assert all(torch.equal(resumed[name], tensor) for name, tensor in uninterrupted.items())
