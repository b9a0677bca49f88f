"""examples/benchmarks/benchmark.py, run as users run it: a CPU smoke run on tiny configs gives a complete,
well-formed table for hf_clip, transformers and open_clip with exactness checks passing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "examples" / "benchmarks"
TINY = {"tiny-vit": str(BENCHMARKS / "tiny-vit.json"), "tiny-resnet": str(BENCHMARKS / "tiny-resnet.json")}
IMPLS = ("hf_clip", "hf_clip-plain", "transformers", "open_clip")


def run_benchmark(*argv: str) -> subprocess.CompletedProcess:
    # One thread: on a shared 2-core host, OpenMP workers spin-waiting for each other cost 8x the CPU time.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, str(BENCHMARKS / "benchmark.py"), *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[dict, Path]:
    output = tmp_path_factory.mktemp("bench") / "results"
    argv = ["--device", "cpu", "--arch", ",".join(TINY.values()), "--batch-size", "6", "--encode-batch-size", "4"]
    argv += ["--variants", "eager", "--steps", "2", "--warmup", "1", "--matmul-size", "128", "--output", str(output)]
    result = run_benchmark(*argv)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(Path(f"{output}.json").read_text()), output


def _rows(results: dict, kind: str, model: str) -> dict[str, dict]:
    return {row["impl"]: row for row in results["rows"] if row["kind"] == kind and row["model"] == model}


def test_every_implementation_has_measured_training_and_encoding_rows(smoke_run):
    results, _ = smoke_run
    for kind, rate in (("train", "samples_per_s"), ("encode", "images_per_s")):
        vit = _rows(results, kind, "tiny-vit")
        assert set(vit) == set(IMPLS)
        for impl, row in vit.items():
            assert "error" not in row, (impl, row)
            assert row[rate] > 0 and row["step_min"] <= row["step_s"] <= row["step_max"]
        resnet = _rows(results, kind, "tiny-resnet")
        assert "no ResNet" in resnet["transformers"]["error"]
        assert all("error" not in resnet[impl] for impl in ("hf_clip", "hf_clip-plain", "open_clip"))
    for model in TINY:
        for impl, row in _rows(results, "train", model).items():
            if "error" not in row:
                assert row["flops_per_step"] > 0 and row["tflops"] > 0 and row["peak_mem_gb"] >= 0, impl


def test_flop_counts_show_identical_work_and_the_trimmed_text(smoke_run):
    results, _ = smoke_run
    train = _rows(results, "train", "tiny-vit")
    # The unoptimised hf_clip path does exactly transformers' work.
    assert train["hf_clip-plain"]["flops_per_step"] == train["transformers"]["flops_per_step"]
    assert train["hf_clip-plain"]["text_len"] == 77
    # The optimised path trims the text to the batch's longest caption, so it does less work.
    assert train["hf_clip"]["text_len"] < 77
    assert train["hf_clip"]["flops_per_step"] < train["hf_clip-plain"]["flops_per_step"]


def test_optimised_step_matches_the_unoptimised_one_in_fp32(smoke_run):
    results, _ = smoke_run
    checks = [row for row in results["rows"] if row["kind"] == "exactness"]
    assert {row["model"] for row in checks} == set(TINY)
    for row in checks:
        assert row["exact"] is True, row
        assert row["loss_abs_diff"] <= 1e-5 and row["grad_rel_l2_diff"] <= 1e-5


def test_results_files_record_environment_command_and_a_table(smoke_run):
    results, output = smoke_run
    saved = json.loads(Path(f"{output}.json").read_text())
    assert saved["rows"] == results["rows"]
    progress = [json.loads(line) for line in Path(f"{output}.jsonl").read_text().splitlines()]
    assert progress[0]["kind"] == "env" and progress[1:] == saved["rows"]
    env = saved["environment"]
    assert env["torch"] == torch.__version__ and env["transformers"] and env["open_clip_torch"]
    assert env["matmul_ceiling_tflops"] > 0 and "--arch" in env["command"] and env["cpu"]
    table = Path(f"{output}.md").read_text()
    header = "| work | model | impl | variant | batch | samples/s | × best peer | TFLOP/s | MFU | peak mem (GB) |"
    assert header in table
    lines = [line for line in table.splitlines() if line.startswith("| train") or line.startswith("| encode")]
    assert len(lines) == 2 * len(TINY) * len(IMPLS)
    assert all(line.count("|") == header.count("|") for line in lines)
    for impl in ("| hf_clip |", "| transformers |", "| open_clip |"):
        assert impl in table
    assert "| tiny-vit | eager | yes |" in table


def test_bad_arguments_are_named():
    for argv, message in (
        (["--impls", "hf_clip,flax"], "unknown implementation 'flax'"),
        (["--arch", "ViT-Z-99", "--matmul-size", "64"], "ViT-Z-99"),
    ):
        result = run_benchmark("--device", "cpu", *argv)
        assert result.returncode != 0 and message in result.stderr, (argv, result.stderr[-2000:])
