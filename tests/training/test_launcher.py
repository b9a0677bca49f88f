"""A SIGKILL of `accelerate launch`'s process group ends the training processes too (torch's agent starts them in
sessions of their own, out of reach of the group's signal; `hf_clip.training.launcher` ties them to the launcher)."""

import os
import signal
import subprocess
import time
from pathlib import Path

from faults import run_arguments

from hf_clip.testing_utils import two_cpu_processes_launch


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:  # the process ended while we looked
            continue
    return found


def test_killing_the_launch_process_group_ends_the_workers(tmp_path):
    output_dir = tmp_path / "out"
    command = [*two_cpu_processes_launch(), "-m", "hf_clip.training"]
    command += [*run_arguments(tmp_path, num_shards=2, max_steps=100_000), "--output_dir", str(output_dir)]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    launcher = subprocess.Popen(command, env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (output_dir / "metrics.jsonl").exists():  # both workers are training
            assert launcher.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.5)
        workers = [pid for pid in processes_mentioning(str(output_dir)) if pid != launcher.pid]
        assert len(workers) == 2, workers
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 30
        while any(pid in processes_mentioning(str(output_dir)) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [pid for pid in workers if pid in processes_mentioning(str(output_dir))]
    finally:
        for pid in processes_mentioning(str(output_dir)):
            os.kill(pid, signal.SIGKILL)
