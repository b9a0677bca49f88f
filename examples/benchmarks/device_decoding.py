"""Device JPEG decoding (`hf_clip.data.device_decoding`) against the exact path: the numerical difference, and on a
GPU the decode + preprocess rate.

    python examples/benchmarks/device_decoding.py --device cpu    # difference from the exact path, on CPU
    python examples/benchmarks/device_decoding.py --device cuda   # the same, plus images/s on the GPU
"""

import argparse
import io
import json
import statistics
import time

import numpy as np
import PIL.Image
import torch
import torchvision
from torchvision.io import ImageReadMode

from hf_clip import HfClipImageProcessor
from hf_clip.data.device_decoding import DeviceImagePreprocessor
from hf_clip.synthetic import photo_jpegs


def difference_from_exact_path(jpegs: list[bytes], device: torch.device) -> dict[str, float]:
    """Max and mean |difference| from HfClipImageProcessor, in normalised units and in 8-bit levels."""
    processor = HfClipImageProcessor()
    images: list[PIL.Image.Image] = [PIL.Image.open(io.BytesIO(j)) for j in jpegs]
    exact = processor(images, return_tensors="pt")["pixel_values"]
    approximate = DeviceImagePreprocessor(processor, device)(jpegs).cpu()
    diff = (approximate - exact).abs()
    levels = diff * torch.tensor(processor.image_std).view(1, 3, 1, 1) * 255
    decoded_cpu = torchvision.io.decode_jpeg(
        [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs], mode=ImageReadMode.RGB
    )
    pil_decoded = [torch.from_numpy(np.array(PIL.Image.open(io.BytesIO(j)).convert("RGB"))) for j in jpegs]
    decoder_diff = max(
        int((ours.permute(1, 2, 0).short() - pil.short()).abs().max())
        for ours, pil in zip(decoded_cpu, pil_decoded, strict=True)
    )
    return {
        "max_abs_normalised": float(diff.max()),
        "mean_abs_normalised": float(diff.mean()),
        "max_abs_8bit_levels": float(levels.max()),
        "mean_abs_8bit_levels": float(levels.mean()),
        "fraction_of_values_differing": float((diff > 0).float().mean()),
        "cpu_decoder_max_level_diff_vs_pil": decoder_diff,
    }


def throughput(jpegs: list[bytes], device: torch.device, rounds: int = 5) -> float:
    """Images/s of decode + preprocess of the whole list as one batch (median of `rounds`)."""
    preprocess = DeviceImagePreprocessor(HfClipImageProcessor(), device)
    preprocess(jpegs)
    rates = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        preprocess(jpegs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(len(jpegs) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--throughput-images", type=int, default=256, help="batch for the images/s figure (CUDA)")
    args = parser.parse_args()
    device = torch.device(args.device)
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    sets = photo_jpegs(args.images)
    for name, jpegs in sets.items():
        results[name] = {"difference_from_exact": difference_from_exact_path(jpegs, device)}
        if device.type == "cuda":
            repeated = (jpegs * (args.throughput_images // len(jpegs) + 1))[: args.throughput_images]
            results[name]["images_per_s"] = throughput(repeated, device)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
