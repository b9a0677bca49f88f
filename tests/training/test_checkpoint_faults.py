"""Training survives a SIGKILL in the middle of a checkpoint write: the killed save leaves only a `.partial` folder,
`--resume latest` takes the previous complete checkpoint (warning about and removing the partial one), and the run
ends bitwise equal to an uninterrupted one, in one process and in two gloo processes."""

from pathlib import Path

import pytest
import torch
from faults import run_arguments, train, write_killer
from safetensors.torch import load_file

from hf_clip.training.run_folder import read_metrics

KILLED_CHECKPOINT = "step_00000004"  # the second save of the 6-step run


@pytest.fixture(scope="module")
def setup(request, tmp_path_factory) -> dict:
    """The run's arguments and its uninterrupted result, for `request.param` processes."""
    num_processes = request.param
    folder = tmp_path_factory.mktemp(f"faults{num_processes}")
    args = run_arguments(folder, num_shards=num_processes)
    train([*args, "--output_dir", str(folder / "uninterrupted")], num_processes)
    return {"folder": folder, "args": args, "num_processes": num_processes}


def assert_same_model(output_dir: Path, reference: Path) -> None:
    resumed, uninterrupted = (load_file(path / "model" / "model.safetensors") for path in (output_dir, reference))
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name


KILLS = [("after_model", 0), ("after_optimizer", 0), ("before_data_state", 0)]


@pytest.mark.parametrize(
    ("setup", "point", "rank"),
    [(1, *kill) for kill in KILLS] + [(2, *kill) for kill in [*KILLS, ("before_data_state", 1)]],
    ids=[f"1-process-{p}" for p, _ in KILLS]
    + [f"2-processes-{p}-rank{r}" for p, r in [*KILLS, ("before_data_state", 1)]],
    indirect=["setup"],
)
def test_kill_during_a_checkpoint_write_then_resume_latest(setup, point, rank):
    folder, num_processes = setup["folder"], setup["num_processes"]
    output_dir = folder / f"killed_{point}_{rank}"
    script = write_killer(folder / f"killer_{point}_{rank}", point, rank, KILLED_CHECKPOINT)
    killed = train([*setup["args"], "--output_dir", str(output_dir)], num_processes, script, check=False)
    assert killed.returncode != 0 and f"KILLED at {point}" in killed.stderr, killed.stderr[-3000:]
    checkpoints = sorted(path.name for path in (output_dir / "checkpoints").iterdir())
    # The kill hit the write: its files sit in the partial folder; only the previous checkpoint is complete.
    assert checkpoints == [f".{KILLED_CHECKPOINT}.partial", "step_00000002"], checkpoints
    assert not (output_dir / "model").exists()

    resumed = train([*setup["args"], "--output_dir", str(output_dir), "--resume", "latest"], num_processes)
    assert "removing incomplete checkpoint" in resumed.stderr and f".{KILLED_CHECKPOINT}.partial" in resumed.stderr
    assert "resumed from" in resumed.stderr and "step_00000002 at step 2" in resumed.stderr
    assert_same_model(output_dir, folder / "uninterrupted")
    steps = [record["step"] for record in read_metrics(output_dir)]
    assert steps == [1, 2, 3, 4, 5, 6]  # the killed run's steps 3 and 4 were dropped, then logged again
    assert sorted(path.name for path in (output_dir / "checkpoints").iterdir()) == [
        "step_00000002",
        "step_00000004",
        "step_00000006",
    ]
