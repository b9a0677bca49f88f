"""Per-core throughput of CLIP image preprocessing from JPEG bytes: hf_clip's fast path against transformers.

`--transform eval`: decode + resize + centre crop + rescale + normalise. `--transform train`: what a training data
worker does per sample (`hf_clip.data.streams.ClipBatches`): decode, then the paper's random crop from the sample's
own generator, with the processor (before) and with `FastClipImagePreprocessor` (after, the same pixels), and the
cheap check that replaces both when the training device decodes the JPEGs (`image_decoding="device"`).

One image per call (as a data-loader worker does), in one process pinned to one core with one torch thread.
Implementations run interleaved, round after round, so load from other processes on a shared host hits them alike;
the median round counts. The photo-like JPEGs (smooth multi-scale colour noise, gradients, shapes and grain;
quality 90) are generated in memory from a seed: web sizes (long side 375-1024 px) and pre-resized shards (256-px
shortest side).

    OMP_NUM_THREADS=1 taskset -c 0 python examples/benchmarks/preprocessing.py --images 48 --rounds 5
    OMP_NUM_THREADS=1 taskset -c 0 python examples/benchmarks/preprocessing.py --transform train --images 48 --rounds 5
    python examples/benchmarks/preprocessing.py --images 64 --rounds 3 --host-processes 16   # the GPU host
"""

import argparse
import io
import json
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import torch
from transformers import CLIPImageProcessor, CLIPImageProcessorPil

from hf_clip import FastClipImagePreprocessor, HfClipImageProcessor
from hf_clip.data.device_jpegs import DeviceJpegs
from hf_clip.data.streams import random_crop, sample_seed
from hf_clip.image_processing_hf_clip import load_image_bytes
from hf_clip.synthetic import photo_jpegs

PIL_BACKEND = "transformers CLIPImageProcessorPil"
TORCHVISION_BACKEND = "transformers CLIPImageProcessor (torchvision backend)"
FAST = "hf_clip FastClipImagePreprocessor"
TRAIN_BEFORE = "before: HfClipImageProcessor"
TRAIN_AFTER = "after: FastClipImagePreprocessor"
TRAIN_DEVICE_CHECK = "image_decoding=device: worker check (DeviceJpegs)"
# Per transform: the ratio columns (header, implementation, baseline) and the pair the whole-host run measures.
RATIOS = {
    "eval": [
        ("fast ÷ CLIPImageProcessorPil", FAST, PIL_BACKEND),
        ("fast ÷ CLIPImageProcessor", FAST, TORCHVISION_BACKEND),
    ],
    "train": [
        ("fast ÷ processor", TRAIN_AFTER, TRAIN_BEFORE),
        ("device check ÷ processor", TRAIN_DEVICE_CHECK, TRAIN_BEFORE),
    ],
}
HOST_IMPLEMENTATIONS = {"eval": (TORCHVISION_BACKEND, FAST), "train": (TRAIN_BEFORE, TRAIN_AFTER)}


def decode_only(data: bytes) -> PIL.Image.Image:
    image = PIL.Image.open(io.BytesIO(data))
    image.load()
    return image


def floors(fast: FastClipImagePreprocessor) -> dict[str, Callable[[bytes], object]]:
    """Floors of any bit-exact path: full-resolution decode, then decode + the one PIL bicubic resize."""
    return {
        "floor: PIL decode": decode_only,
        "floor: PIL decode + resize": lambda data: fast.resized(decode_only(data)),
    }


def implementations(transform: str = "eval") -> dict[str, Callable[[bytes], object]]:
    """bytes → (1, 3, 224, 224) float32, each the way its library is used in a data-loader transform; plus floors."""
    if transform == "train":
        return training_implementations()
    hf_clip = HfClipImageProcessor()
    fast = FastClipImagePreprocessor(hf_clip)
    torchvision_backend, pil_backend = CLIPImageProcessor(), CLIPImageProcessorPil()

    def with_processor(processor) -> Callable[[bytes], torch.Tensor]:
        return lambda data: processor(PIL.Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"]

    return {
        **floors(fast),
        TORCHVISION_BACKEND: with_processor(torchvision_backend),
        PIL_BACKEND: with_processor(pil_backend),
        "hf_clip HfClipImageProcessor": with_processor(hf_clip),
        FAST: fast,
    }


def training_implementations() -> dict[str, Callable[[bytes], object]]:
    """One training sample's image work in a data worker, as `ClipBatches` does it: a generator seeded for the sample,
    then decode + resize + random crop + rescale/normalise (CPU decoding), or the JPEG check and crop draw (device
    decoding, where the decode and crop move to the training device)."""
    processor = HfClipImageProcessor()
    fast = FastClipImagePreprocessor(processor)
    device_jpegs = DeviceJpegs(processor)
    position = iter(range(1, 2**62))

    def generator() -> torch.Generator:
        return torch.Generator().manual_seed(sample_seed(0, 0, 0, 0, next(position)))

    return {
        **floors(fast),
        TRAIN_BEFORE: lambda data: random_crop(processor, load_image_bytes(data), generator()),
        TRAIN_AFTER: lambda data: random_crop(fast, load_image_bytes(data), generator()),
        TRAIN_DEVICE_CHECK: lambda data: device_jpegs(data, "image", generator()),
    }


def measure(
    sets: dict[str, list[bytes]], rounds: int, transform: str = "eval"
) -> dict[str, dict[str, dict[str, float]]]:
    """Median images/s over interleaved rounds, per source set and implementation: per CPU-second of this process
    (what one core delivers, robust to other processes on a shared host) and per wall-clock second."""
    impls = implementations(transform)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for set_name, blobs in sets.items():
        for fn in impls.values():
            fn(blobs[0])  # first-call set-up outside the timing
        cpu_rates: dict[str, list[float]] = {name: [] for name in impls}
        wall_rates: dict[str, list[float]] = {name: [] for name in impls}
        for _ in range(rounds):
            for name, fn in impls.items():
                cpu_start, wall_start = time.process_time(), time.perf_counter()
                for data in blobs:
                    fn(data)
                cpu_rates[name].append(len(blobs) / (time.process_time() - cpu_start))
                wall_rates[name].append(len(blobs) / (time.perf_counter() - wall_start))
        results[set_name] = {
            name: {
                "per_cpu_second": statistics.median(cpu_rates[name]),
                "per_wall_second": statistics.median(wall_rates[name]),
            }
            for name in impls
        }
    return results


def _host_worker(transform: str, core: int, name: str, blobs: list[bytes], passes: int, barrier, counts) -> None:
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    fn = implementations(transform)[name]
    fn(blobs[0])
    barrier.wait()
    for _ in range(passes):
        for data in blobs:
            fn(data)
    counts.put(passes * len(blobs))


def host_throughput(
    sets: dict[str, list[bytes]], processes: int, passes: int, transform: str = "eval"
) -> dict[str, dict[str, float]]:
    """Images/s of the whole host: one process per core (cores 0..processes-1), wall clock from a common start."""
    context = multiprocessing.get_context("fork")
    results: dict[str, dict[str, float]] = {}
    for set_name, blobs in sets.items():
        results[set_name] = {}
        for name in HOST_IMPLEMENTATIONS[transform]:
            barrier, counts = context.Barrier(processes + 1), context.Queue()
            workers = [
                context.Process(target=_host_worker, args=(transform, core, name, blobs, passes, barrier, counts))
                for core in range(processes)
            ]
            for worker in workers:
                worker.start()
            barrier.wait()
            start = time.perf_counter()
            total = sum(counts.get() for _ in workers)
            elapsed = time.perf_counter() - start
            for worker in workers:
                worker.join()
            results[set_name][name] = total / elapsed
    return results


def markdown(results: dict[str, dict[str, dict[str, float]]], info: dict) -> str:
    names = list(next(iter(results.values())))
    ratios = RATIOS[info["transform"]]
    lines = [
        f"Images/s per core ({info['cpu']}, pinned to core {info['pinned_core']}, 1 torch thread; load average "
        f"before/after {info['load_before']} / {info['load_after']}): images per CPU-second of the process "
        f"(wall-clock rate in brackets), median of {info['rounds']} interleaved rounds over {info['images']} images.",
        "",
        "| source images (mean JPEG size) | " + " | ".join([*names, *(header for header, _, _ in ratios)]) + " |",
        "|---" * (len(names) + len(ratios) + 1) + "|",
    ]
    for set_name, rates in results.items():
        cpu = {name: rate["per_cpu_second"] for name, rate in rates.items()}
        cells = " | ".join(f"{cpu[name]:.0f} ({rates[name]['per_wall_second']:.0f})" for name in names)
        ratio_cells = " | ".join(f"{cpu[name] / cpu[baseline]:.2f}×" for _, name, baseline in ratios)
        lines.append(f"| {set_name} ({info['mean_kb'][set_name]:.0f} KB) | {cells} | {ratio_cells} |")
    lines += ["", f"Command: `{info['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transform", choices=("eval", "train"), default="eval")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--core", type=int, default=0, help="pin to this core (-1: leave the affinity alone)")
    parser.add_argument("--host-processes", type=int, default=0, help="also measure N pinned processes (cores 0..N-1)")
    parser.add_argument("--output", default="preprocessing_results")
    args = parser.parse_args(argv)
    if args.core >= 0:
        os.sched_setaffinity(0, {args.core})
    torch.set_num_threads(1)
    sets = photo_jpegs(args.images)
    load_before = os.getloadavg()
    results = measure(sets, args.rounds, args.transform)
    info = {
        "command": "python examples/benchmarks/preprocessing.py " + " ".join(argv if argv is not None else []),
        "transform": args.transform,
        "cpu": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if "model name" in line
            ),
            "unknown",
        ),
        "pinned_core": args.core,
        "load_before": " ".join(f"{x:.2f}" for x in load_before),
        "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "rounds": args.rounds,
        "images": args.images,
        "mean_kb": {name: sum(map(len, blobs)) / len(blobs) / 1024 for name, blobs in sets.items()},
        "pillow": PIL.__version__,
        "torch": torch.__version__,
    }
    table = markdown(results, info)
    host = host_throughput(sets, args.host_processes, args.rounds, args.transform) if args.host_processes > 0 else None
    if host is not None:
        table += f"\nWhole host, {args.host_processes} pinned processes, images/s (wall clock):\n\n"
        table += "\n".join(
            f"- {set_name}: " + ", ".join(f"{n} {r:.0f}" for n, r in rates.items()) for set_name, rates in host.items()
        )
        table += "\n"
    print(table)
    Path(f"{args.output}.json").write_text(
        json.dumps({"info": info, "images_per_s": results, "host_images_per_s": host}, indent=2) + "\n"
    )
    Path(f"{args.output}.md").write_text(table)
    return {"info": info, "images_per_s": results, "host_images_per_s": host}


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
