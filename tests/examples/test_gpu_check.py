"""`make gpu-check`'s script in its CPU dry run: every stage runs the code path the GPU session will run, on tiny
configurations, and records its rows (the training run skips and counts the corrupt samples, resume reproduces the
uninterrupted loss exactly, the trained folder loads and classifies, the peers' benchmark rows are measured, the
fine-tuning options train from it with the locked tensors unchanged)."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "benchmarks" / "gpu_check.py"


def test_dry_run_records_every_stage(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--output", str(tmp_path), "--budget", "900"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    done = {row["stage"]: row for row in rows if "done" in row}
    # vit-l14 has no tiny counterpart of its own.
    assert set(done) == {"correctness", "vit-b32", "end-to-end", "fine-tuning", "loss-memory"}
    assert all(row["done"] for row in done.values()), done
    checks = {row["check"]: row for row in rows if row["stage"] == "correctness" and "check" in row}
    # Each of the 2 shards holds a truncated JPEG, bytes that are no image and an empty caption.
    assert checks["train"]["skipped_by_reason"]["skipped/bad_image"] >= 4
    assert checks["train"]["skipped_by_reason"]["skipped/empty_caption"] >= 2
    assert checks["resume"]["exact"] is True
    assert checks["load"]["ok"] is True and checks["load"]["pipeline_labels"] == 3
    assert checks["sync_debug"]["skipped"] == "needs CUDA"
    measured = [row for row in rows if row["stage"] == "vit-b32" and row.get("kind") == "train"]
    assert {row["impl"] for row in measured} == {"hf_clip", "transformers", "open_clip"}
    assert all(row["samples_per_s"] > 0 and "error" not in row for row in measured)
    assert (
        next(row for row in rows if row["stage"] == "end-to-end" and "images_per_second" in row)["images_per_second"]
        > 0
    )
    losses = {row["loss"]: row for row in rows if row["stage"] == "loss-memory" and "loss" in row}
    assert set(losses) == {
        "tiled_clip",
        "hf_clip",
        "open_clip",
        "tiled_siglip",
        "hf_siglip",
        "open_clip_siglip",
        "inf_cl",
    }
    assert abs(losses["tiled_clip"]["value"] - losses["hf_clip"]["value"]) < 1e-5
    assert abs(losses["tiled_siglip"]["value"] - losses["hf_siglip"]["value"]) < 1e-5
    tuned = next(row for row in rows if row["stage"] == "fine-tuning" and "steps" in row)
    assert tuned["losses_finite"] and tuned["locked_unchanged"] and tuned["trained_changed"] > 0
