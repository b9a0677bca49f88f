"""The tiled loss trains as the dense one does, on `make demo`'s run (issue 20): the Fashion-MNIST demo twice, once
with the dense `ClipLoss` and once with `--loss_tile_size` (a tile that does not divide the batch of 128), every
step logged, then the two loss curves compared step by step.

    python examples/benchmarks/tiled_loss_demo.py --output-dir tiled_loss_demo --tile_size 48

Both runs see the same data, weights and random draws (the run is deterministic on CPU: same seed, same worker
order), so any difference is the loss's floating-point summation order. That order differs from the first step
(fp32 sums over blocks instead of rows), and training amplifies it over the steps, so the comparison reports the
per-step gap as it grows, and the zero-shot accuracies both models reach on the 10,000 test images.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from hf_clip.training.run_folder import read_metrics

DEMO = Path(__file__).resolve().parents[1] / "demo.py"


def demo(output_dir: Path, max_steps: int, extra: list[str]) -> tuple[list[dict], dict]:
    command = [sys.executable, str(DEMO), "--output-dir", str(output_dir), "--max-steps", str(max_steps)]
    subprocess.run([*command, "--", "--logging_steps", "1", *extra], check=True)
    records = [record for record in read_metrics(output_dir / "run") if "loss" in record]
    return records, json.loads((output_dir / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("tiled_loss_demo"))
    parser.add_argument("--tile_size", type=int, default=48)
    parser.add_argument("--max-steps", type=int, default=1000)
    args = parser.parse_args()
    dense, dense_summary = demo(args.output_dir / "dense", args.max_steps, [])
    tiled, tiled_summary = demo(args.output_dir / "tiled", args.max_steps, ["--loss_tile_size", str(args.tile_size)])
    assert [record["step"] for record in dense] == [record["step"] for record in tiled], "the runs logged other steps"
    gaps = [abs(a["loss"] - b["loss"]) for a, b in zip(dense, tiled, strict=True)]
    relative = [gap / abs(a["loss"]) for gap, a in zip(gaps, dense, strict=True)]

    def first_step_over(bound: float) -> int | None:
        return next((record["step"] for record, gap in zip(dense, relative, strict=True) if gap > bound), None)

    result = {
        "command": " ".join(sys.argv),
        "tile_size": args.tile_size,
        "steps": len(gaps),
        "step_1_loss": {"dense": dense[0]["loss"], "tiled": tiled[0]["loss"]},
        "max_relative_gap_in_steps": {
            f"1-{end}": max(relative[:end]) for end in (1, 10, 50, 100, 200, 500, len(gaps)) if end <= len(gaps)
        },
        "first_step_relative_gap_over": {str(bound): first_step_over(bound) for bound in (1e-6, 1e-5, 1e-4, 1e-3)},
        "last_loss": {"dense": dense[-1]["loss"], "tiled": tiled[-1]["loss"]},
        "zero_shot_top1_ensemble": {
            "dense": dense_summary["zero_shot_top1_ensemble"],
            "tiled": tiled_summary["zero_shot_top1_ensemble"],
        },
        "train_seconds_in_steps": {
            "dense": dense_summary["train_seconds_in_steps"],
            "tiled": tiled_summary["train_seconds_in_steps"],
        },
    }
    (args.output_dir / "comparison.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
