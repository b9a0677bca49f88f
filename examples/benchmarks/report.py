"""Environment record, markdown table and result files of `benchmark.py`."""

import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

PEERS = ("transformers", "open_clip")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device, ceiling: float, matmul_size: int, command: list[str]) -> dict:
    """Hardware, versions and the command line, recorded with every result."""
    return {
        "command": " ".join(command),
        "device": device.type,
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": _version("transformers"),
        "open_clip_torch": _version("open_clip_torch"),
        "hf_clip": _version("hf_clip"),
        "precision": "bf16 autocast, fused AdamW" if device.type == "cuda" else "fp32, AdamW",
        "matmul_ceiling_tflops": ceiling / 1e12,
        "matmul_ceiling": f"{'bf16' if device.type == 'cuda' else 'fp32'} {matmul_size}x{matmul_size} matmul",
    }


def _best_peer(rows: list[dict], kind: str, model: str, rate: str) -> float | None:
    rates = [r[rate] for r in rows if r["kind"] == kind and r["model"] == model and r["impl"] in PEERS and rate in r]
    return max(rates) if rates else None


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _format(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown_table(results: dict) -> str:
    """One table of training and encoding rows (errors shown in place), then the exactness checks."""
    env, rows = results["environment"], results["rows"]
    ceiling = env["matmul_ceiling_tflops"]
    device = env["gpu"] or env["cpu"]
    lines = [
        f"Device: {device} · {env['precision']} · matmul ceiling {ceiling:.3g} TFLOP/s ({env['matmul_ceiling']}) · "
        f"torch {env['torch']}, transformers {env['transformers']}, open_clip {env['open_clip_torch']}",
        "",
        "| work | model | impl | variant | batch | samples/s | × best peer | TFLOP/s | MFU | peak mem (GB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["kind"] == "exactness":
            continue
        rate_key = "samples_per_s" if row["kind"] == "train" else "images_per_s"
        head = f"| {row['kind']} | {row['model']} | {row['impl']} | {row['variant']} | {row['bs']} "
        if "error" in row:
            lines.append(head + f"| ({row['error']}) | | | | |")
            continue
        best = _best_peer(rows, row["kind"], row["model"], rate_key)
        ratio = row[rate_key] / best if best and row["impl"].startswith("hf_clip") else None
        tflops = row.get("tflops")
        mfu = tflops / ceiling if tflops is not None else None
        lines.append(
            head + f"| {_rate(row[rate_key])} | {_format(ratio, '.2f')} | {_format(tflops, '.3g')} "
            f"| {_format(mfu, '.1%')} | {_format(row.get('peak_mem_gb'), '.2f')} |"
        )
    checks = [row for row in rows if row["kind"] == "exactness"]
    if checks:
        lines += [
            "",
            "Exactness of the optimised hf_clip step against `hf_clip-plain` (same weights, same batch):",
            "",
            "| model | variant | exact | tolerance | loss |Δ| | grad max |Δ| | grad rel. L2 |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in checks:
            if "error" in row:
                lines.append(f"| {row['model']} | {row['variant']} | ({row['error']}) | | | | |")
                continue
            lines.append(
                f"| {row['model']} | {row['variant']} | {'yes' if row['exact'] else 'NO'} | {row['tolerance']} "
                f"| {row['loss_abs_diff']:.2e} | {row['grad_max_abs_diff']:.2e} | {row['grad_rel_l2_diff']:.2e} |"
            )
    lines += ["", f"Command: `{env['command']}`"]
    return "\n".join(lines) + "\n"


def write_results(results: dict, table: str, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{output}.json").write_text(json.dumps(results, indent=2) + "\n")
    Path(f"{output}.md").write_text(table)
