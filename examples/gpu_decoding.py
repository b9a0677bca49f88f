"""Training-time JPEG decoding and CLIP preprocessing on the GPU (optional; needs torchvision).

On one H100 with 16 cores the exact CPU path cannot feed ViT-B/32 training (DESIGN §12), so for training the
JPEG bytes go to the device: `torchvision.io.decode_jpeg(device="cuda")` (nvJPEG; the EXIF orientation, which
nvJPEG ignores, is read from the header and applied in torch), then an antialiased bicubic resize of the shortest
side, a crop (centre, or random for the paper's augmentation), rescale and normalise, all in torch. This is close
to, not equal to, the exact path: torch's antialiased bicubic keeps the horizontal pass in float where PIL rounds
it to 8 bits, uses float instead of fixed-point weights, and nvJPEG's IDCT and chroma
upsampling differ from libjpeg-turbo's. Evaluation stays on the exact path (`HfClipImageProcessor` or
`hf_clip.fast_preprocessing.FastClipImagePreprocessor`).

    python examples/gpu_decoding.py --device cpu    # numerical difference from the exact path, measured on CPU
    python examples/gpu_decoding.py --device cuda   # the same, plus decode+preprocess images/s on the GPU
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
from torch.nn import functional as F
from torchvision.io import ImageReadMode

ORIENTATION_TAG = 0x0112
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def exif_orientation(jpeg: bytes) -> int:
    """The EXIF orientation tag (1 = upright) from the header, without decoding the pixels."""
    with PIL.Image.open(io.BytesIO(jpeg)) as image:
        return int(image.getexif().get(ORIENTATION_TAG, 1))


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation to a (C, H, W) tensor as `PIL.ImageOps.exif_transpose` does."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.rot90(-1, dims=(-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return image.rot90(1, dims=(-2, -1))
    return image


def decode_and_preprocess(
    jpegs: list[bytes],
    device: torch.device | str,
    shortest_edge: int = 224,
    crop_size: int = 224,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """JPEG bytes → float32 (batch, 3, crop, crop) on `device`; random crops from `generator`, else centre crops.

    Sizes and crop offsets follow the exact path (long side `int(edge * long / short)`, centre offset rounded,
    random offsets drawn per image as `preprocess_for_training` draws them); the resized image is rounded to 8-bit
    levels as PIL's output is, so the remaining difference is the resampling arithmetic and the decoder.
    """
    data = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in jpegs]
    # nvJPEG ignores `apply_exif_orientation`, so the tag is read from the header here and applied in torch.
    decoded = torchvision.io.decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    images = [upright(image, exif_orientation(jpeg)) for image, jpeg in zip(decoded, jpegs, strict=True)]
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=device).view(3, 1, 1)
    batch = torch.empty(len(images), 3, crop_size, crop_size, device=device)
    for index, image in enumerate(images):
        height, width = image.shape[-2:]
        short, long = min(height, width), max(height, width)
        new_long = int(shortest_edge * long / short)
        new_size = (shortest_edge, new_long) if height <= width else (new_long, shortest_edge)
        resized = F.interpolate(
            image[None].float(), size=new_size, mode="bicubic", antialias=True, align_corners=False
        )
        resized = resized[0].round_().clamp_(0, 255)
        if generator is None:
            top, left = round((new_size[0] - crop_size) / 2), round((new_size[1] - crop_size) / 2)
        else:
            top = int(torch.randint(new_size[0] - crop_size + 1, (1,), generator=generator))
            left = int(torch.randint(new_size[1] - crop_size + 1, (1,), generator=generator))
        batch[index] = (resized[:, top : top + crop_size, left : left + crop_size] / 255 - mean) / std
    return batch


def difference_from_exact_path(jpegs: list[bytes], device: torch.device) -> dict[str, float]:
    """Max and mean |difference| from HfClipImageProcessor, in normalised units and in 8-bit levels."""
    from hf_clip.image_processing_hf_clip import HfClipImageProcessor

    processor = HfClipImageProcessor()
    exact = processor([PIL.Image.open(io.BytesIO(j)) for j in jpegs], return_tensors="pt")["pixel_values"]
    approximate = decode_and_preprocess(jpegs, device).cpu()
    diff = (approximate - exact).abs()
    levels = diff * torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1) * 255
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
    decode_and_preprocess(jpegs, device)
    rates = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        decode_and_preprocess(jpegs, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(len(jpegs) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    from benchmark_preprocessing import make_jpegs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--throughput-images", type=int, default=256, help="batch for the images/s figure (CUDA)")
    args = parser.parse_args()
    device = torch.device(args.device)
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    sets = make_jpegs(args.images)
    for name, jpegs in sets.items():
        results[name] = {"difference_from_exact": difference_from_exact_path(jpegs, device)}
        if device.type == "cuda":
            repeated = (jpegs * (args.throughput_images // len(jpegs) + 1))[: args.throughput_images]
            results[name]["images_per_s"] = throughput(repeated, device)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
