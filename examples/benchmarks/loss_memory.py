"""Peak memory and time of the contrastive and sigmoid losses, forward + backward, on CPU (issue 20).

    python examples/benchmarks/loss_memory.py --batches 4096 16384 32768 --output loss_memory.json

Six losses on the same features (d = `--dim`, seeded random unit vectors, fp32, logit scale 14.3, SigLIP bias -10):
hf_clip's tiled `ClipLoss(tile_size=...)` / `SigLipLoss(tile_size=...)`, hf_clip's dense ones, and open_clip's
`ClipLoss` / `SigLipLoss`. Every (batch, loss) point runs in a fresh subprocess, interleaved batch by batch, so
peaks do not carry over: the baseline is the process's peak RSS with the features allocated and one small warm-up
call made, the point's figure the peak RSS after one timed forward + backward, minus the baseline (both are
reported). Dense points whose estimated peak exceeds `--dense_limit_gb` are skipped (the machine is shared) and
listed as skipped; a point the kernel kills for memory is listed as failed.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import torch

LOSSES = ("tiled_clip", "hf_clip", "open_clip", "tiled_siglip", "hf_siglip", "open_clip_siglip")
# Dense peak in B² fp32 matrices, with margin (measured at 16,384: 3.8 for both ClipLosses, 5.0 for SigLipLoss).
DENSE_MATRICES = {"hf_clip": 6, "open_clip": 6, "hf_siglip": 5, "open_clip_siglip": 5}


def dense_estimate_gb(name: str, batch: int) -> float:
    """The dense loss's peak in GB at `batch` (0 for the tiled losses): the points past a limit are skipped."""
    return DENSE_MATRICES.get(name, 0) * batch**2 * 4 / 1e9


def make_loss(name: str, tile_size: int) -> Callable[..., torch.Tensor]:
    import open_clip

    from hf_clip import ClipLoss, SigLipLoss

    return {
        "tiled_clip": lambda: ClipLoss(tile_size=tile_size),
        "hf_clip": lambda: ClipLoss(),
        "open_clip": lambda: open_clip.loss.ClipLoss(),
        "tiled_siglip": lambda: SigLipLoss(tile_size=tile_size),
        "hf_siglip": lambda: SigLipLoss(),
        "open_clip_siglip": lambda: open_clip.loss.SigLipLoss(),
    }[name]()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _first_to_be_killed() -> None:
    """In a point's subprocess: if memory runs out, the kernel's OOM killer picks this process, not another one."""
    with open("/proc/self/oom_score_adj", "w") as file:
        file.write("1000")


def run_point(name: str, batch: int, dim: int, tile_size: int) -> dict:
    """One forward + backward of loss `name` at `batch` in this (fresh) process."""
    loss_fn = make_loss(name, tile_size)
    generator = torch.Generator().manual_seed(0)
    images, texts = (
        torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator), dim=-1).requires_grad_()
        for _ in range(2)
    )
    scale = torch.tensor(14.3, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    extra = (bias,) if "siglip" in name else ()
    loss_fn(images[:64], texts[:64], scale, *extra).backward()  # warm-up: code paths and libraries loaded
    for tensor in (images, texts, scale, bias):
        tensor.grad = None
    baseline = peak_rss_mb()
    start = time.perf_counter()
    loss = loss_fn(images, texts, scale, *extra)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    return {
        "loss": name,
        "batch": batch,
        "seconds": seconds,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak,
        "loss_memory_mb": peak - baseline,
        "value": loss.item(),
    }


def device_points(device: str, batches: list[int], dim: int, tile_size: int, limit_gb: float) -> list[dict]:
    """`make gpu-check`'s loss-memory stage: the same losses on `device` in one process, peak memory from
    `torch.cuda.max_memory_allocated` above the features (CUDA only), and inf-cl's `cal_inf_loss` where it imports."""
    try:
        from inf_cl import cal_inf_loss
    except ImportError as error:
        cal_inf_loss, inf_cl_error = None, repr(error)[:200]

    def inf_cl_loss(images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Both directions (inf-cl's `cal_inf_loss` is one), as its README's CLIP loss."""
        assert cal_inf_loss is not None
        return (cal_inf_loss(images, texts, scale=scale) + cal_inf_loss(texts, images, scale=scale)) / 2

    rows = []
    for batch in batches:
        generator = torch.Generator(device).manual_seed(0)
        images, texts = (
            torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator, device=device), dim=-1)
            for _ in range(2)
        )
        for name in (*LOSSES, "inf_cl"):
            estimate_gb = dense_estimate_gb(name, batch)
            if estimate_gb > limit_gb or (name == "inf_cl" and cal_inf_loss is None):
                reason = f"estimated {estimate_gb:.0f} GB" if name != "inf_cl" else inf_cl_error
                rows.append({"loss": name, "batch": batch, "skipped": reason})
                continue
            inputs = [images.clone().requires_grad_(), texts.clone().requires_grad_()]
            scale = torch.tensor(14.3, device=device, requires_grad=True)
            bias = torch.tensor(-10.0, device=device, requires_grad=True)
            loss_fn: Callable[..., torch.Tensor] = make_loss(name, tile_size) if name != "inf_cl" else inf_cl_loss
            extra = (bias,) if "siglip" in name else ()
            loss_fn(inputs[0][:64], inputs[1][:64], scale, *extra).backward()  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated() if device == "cuda" else 0
            start = time.perf_counter()
            try:
                loss = loss_fn(*inputs, scale, *extra)
                loss.backward()
            except torch.OutOfMemoryError as error:  # a dense point past the device's memory is a result too
                rows.append({"loss": name, "batch": batch, "failed": str(error).splitlines()[0][:300]})
                del inputs
                torch.cuda.empty_cache()
                continue
            if device == "cuda":
                torch.cuda.synchronize()
            row = {"loss": name, "batch": batch, "seconds": time.perf_counter() - start, "value": loss.item()}
            if device == "cuda":
                row["loss_memory_mb"] = (torch.cuda.max_memory_allocated() - baseline) / 2**20
            rows.append(row)
            del inputs, loss
    return rows


def point_in_subprocess(name: str, batch: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--point", name, str(batch), "--dim", str(args.dim)]
    command += ["--tile_size", str(args.tile_size), "--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True, preexec_fn=_first_to_be_killed)
    if result.returncode == 0:
        row = json.loads(result.stdout.strip().splitlines()[-1])
    else:  # a dense point past the machine's memory is a result too: the kernel's OOM killer ends it
        reason = "killed (SIGKILL: out of memory)" if result.returncode == -9 else result.stderr[-500:]
        row = {"loss": name, "batch": batch, "failed": reason, "returncode": result.returncode}
    row["load_average_1min_after"] = os.getloadavg()[0]  # the point itself adds ~threads; more is other work
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--tile_size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dense_limit_gb", type=float, default=8.0)
    parser.add_argument("--output", default="loss_memory.json")
    parser.add_argument("--point", nargs=2, metavar=("LOSS", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.point is not None:
        print(json.dumps(run_point(args.point[0], int(args.point[1]), args.dim, args.tile_size)))
        return
    rows = []
    for batch in args.batches:
        for name in args.losses:
            estimate_gb = dense_estimate_gb(name, batch)
            if estimate_gb > args.dense_limit_gb:
                rows.append({"loss": name, "batch": batch, "skipped": f"estimated {estimate_gb:.0f} GB"})
            else:
                rows.append(point_in_subprocess(name, batch, args))
            print(json.dumps(rows[-1]), flush=True)
            with open(args.output, "w") as file:  # after every point: a long run stopped midway keeps what it has
                summary = {"dim": args.dim, "tile_size": args.tile_size, "threads": args.threads, "points": rows}
                json.dump(summary, file, indent=1)


if __name__ == "__main__":
    main()
