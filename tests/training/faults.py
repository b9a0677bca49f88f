"""Shared pieces of the fault-injection tests: a tiny training run on real webdataset shards, run in a subprocess
(one process, or two gloo processes through `accelerate launch`), optionally killed with SIGKILL at a chosen point of
a checkpoint write by `KILLER`, a wrapper script the test writes beside the run (library code has no hook)."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image

from hf_clip import train_clip_bpe
from hf_clip.testing_utils import TINY_TEXT, TINY_VIT, two_cpu_processes_launch

COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "white": (240, 240, 240)}

# Runs the training loop after wrapping the writers of a checkpoint: at the chosen point of the chosen save (the
# `kill` JSON beside this script: point, rank, checkpoint folder name) the process SIGKILLs itself, as a preemption
# would, leaving the files written so far. Points: after_model / after_optimizer (right after accelerate wrote
# model.safetensors / optimizer.bin), before_data_state (after save_state, before the data position is written).
KILLER = """
import json, os, signal, sys
from pathlib import Path

import accelerate.checkpointing
from hf_clip.training import loop, state

kill = json.loads((Path(__file__).parent / "kill.json").read_text())
on_this_rank = int(os.environ.get("RANK", "0")) == kill["rank"]


def die_if(point, path):
    if on_this_rank and point == kill["point"] and kill["checkpoint"] in str(path):
        sys.stderr.write(f"KILLED at {point} writing {path}\\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


original_save = accelerate.checkpointing.save
def save(obj, f, *args, **kwargs):
    original_save(obj, f, *args, **kwargs)
    name = Path(f).name
    die_if({"model.safetensors": "after_model", "optimizer.bin": "after_optimizer"}.get(name), f)
accelerate.checkpointing.save = save

original_write = state.write_synced
def write_synced(path, text):
    if Path(path).name.startswith("data_state_rank"):
        die_if("before_data_state", path)
    original_write(path, text)
state.write_synced = write_synced

loop.main(sys.argv[1:])
"""


def write_shards(folder: Path, num_shards: int, per_shard: int = 24) -> list[str]:
    """Clean JPEG + caption samples of four colours."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(num_shards):
        path = folder / f"train-{shard:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(per_shard):
                number = shard * per_shard + index
                name = list(COLORS)[number % 4]
                rng = np.random.default_rng(number)
                pixels = np.clip(np.array(COLORS[name]) + rng.integers(-20, 20, (24, 30, 3)), 0, 255)
                buffer = io.BytesIO()
                PIL.Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG")
                for suffix, content in (("jpg", buffer.getvalue()), ("txt", f"a photo of a {name} square".encode())):
                    member = tarfile.TarInfo(f"sample{number:05d}.{suffix}")
                    member.size = len(content)
                    tar.addfile(member, io.BytesIO(content))
        paths.append(str(path))
    return paths


def run_arguments(folder: Path, num_shards: int, max_steps: int = 6) -> list[str]:
    """A tiny from-scratch run: checkpoints every 2 steps, metrics only (no tensorboard)."""
    shards = write_shards(folder / "shards", num_shards)
    train_clip_bpe([f"a photo of a {c} square" for c in COLORS] * 4, vocab_size=600, min_frequency=1).save_pretrained(
        folder / "tokenizer"
    )
    (folder / "model.json").write_text(
        json.dumps({"projection_dim": 16, "text_config": TINY_TEXT, "vision_config": TINY_VIT})
    )
    return [
        "--model_config", str(folder / "model.json"), "--tokenizer_name_or_path", str(folder / "tokenizer"),
        "--train_data_files", *shards, "--per_device_batch_size", "3", "--max_steps", str(max_steps),
        "--warmup_steps", "1", "--logging_steps", "1", "--save_steps", "2", "--log_with", "none",
        "--shuffle_buffer", "8",
    ]  # fmt: skip


def train(
    args: list[str], num_processes: int = 1, script: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """`python -m hf_clip.training` (or `script`), through `accelerate launch -m` for two processes."""
    target = [str(script)] if script is not None else ["-m", "hf_clip.training"]
    launcher = [sys.executable] if num_processes == 1 else two_cpu_processes_launch()
    command = [*launcher, *target, *args]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if check:
        # Every rank's own traceback, not only the last lines (rank 0's, when another rank crashed first).
        ranks = [line for line in result.stderr.splitlines() if line.startswith("[rank")]
        assert result.returncode == 0, "\n".join(ranks[-60:]) or result.stderr[-4000:]
    return result


def write_killer(folder: Path, point: str, rank: int, checkpoint: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kill.json").write_text(json.dumps({"point": point, "rank": rank, "checkpoint": checkpoint}))
    script = folder / "killing_train.py"
    script.write_text(KILLER)
    return script
