"""examples/gpu_decoding.py, run on CPU: EXIF orientation as PIL applies it, and pixels within a few 8-bit levels
of the exact path (same crop offsets for evaluation and for training crops)."""

import io
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torchvision
from torchvision.io import ImageReadMode

from hf_clip.image_processing_hf_clip import HfClipImageProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from gpu_decoding import OPENAI_CLIP_STD, decode_and_preprocess, upright


def _jpeg(width: int, height: int, seed: int, orientation: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = (rng.random((5, 5, 3)) * 255).astype(np.uint8)
    picture = PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.Resampling.BICUBIC)
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of normalised pixels, in 8-bit levels."""
    return (a - b).abs() * torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1) * 255


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pil_applies_it(orientation):
    jpeg = _jpeg(40, 24, seed=orientation, orientation=orientation)
    data = torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)
    raw = torchvision.io.decode_jpeg(data, mode=ImageReadMode.RGB)
    reference = torchvision.io.decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    assert torch.equal(upright(raw, orientation), reference)
    if orientation != 1:
        assert not torch.equal(raw, reference)  # the tag really moves pixels


def test_centre_crops_are_within_a_few_levels_of_the_exact_path():
    jpegs = [_jpeg(w, h, seed) for seed, (w, h) in enumerate([(320, 240), (240, 400), (224, 224), (500, 231)])]
    jpegs.append(_jpeg(300, 260, seed=9, orientation=6))
    exact = HfClipImageProcessor()([PIL.Image.open(io.BytesIO(j)) for j in jpegs], return_tensors="pt")["pixel_values"]
    approximate = decode_and_preprocess(jpegs, "cpu")
    assert approximate.shape == exact.shape and approximate.dtype == torch.float32
    levels = _levels(approximate, exact)
    # Resampling arithmetic only: a shifted crop, a missed rotation or wrong statistics would be tens of levels.
    assert levels.max() <= 4.5 and levels.mean() <= 0.5


def test_random_crops_draw_the_offsets_the_exact_training_path_draws():
    jpegs = [_jpeg(w, h, seed) for seed, (w, h) in enumerate([(480, 240), (240, 480), (300, 301)])]
    images = [PIL.Image.open(io.BytesIO(j)) for j in jpegs]
    exact = HfClipImageProcessor().preprocess_for_training(images, torch.Generator().manual_seed(3))
    approximate = decode_and_preprocess(jpegs, "cpu", generator=torch.Generator().manual_seed(3))
    assert _levels(approximate, exact).max() <= 4.5
