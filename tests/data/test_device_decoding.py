"""hf_clip.data.device_decoding, run on CPU: EXIF orientation as PIL applies it, pixels within a few 8-bit levels
of the exact path (same crop offsets for evaluation and for training crops), and the host fallback for files the
device decoder refuses."""

import io

import numpy as np
import PIL.Image
import pytest
import torch
import torchvision
from PIL import ExifTags
from torchvision.io import ImageReadMode

from hf_clip import HfClipImageProcessor
from hf_clip.data.device_decoding import DeviceImagePreprocessor, upright


def _jpeg(width: int, height: int, seed: int, orientation: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = (rng.random((5, 5, 3)) * 255).astype(np.uint8)
    picture = PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.Resampling.BICUBIC)
    exif = PIL.Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of normalised pixels, in 8-bit levels."""
    return (a - b).abs() * torch.tensor(HfClipImageProcessor.image_std).view(1, 3, 1, 1) * 255


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
    approximate = DeviceImagePreprocessor(HfClipImageProcessor(), "cpu")(jpegs)
    assert approximate.shape == exact.shape and approximate.dtype == torch.float32
    levels = _levels(approximate, exact)
    # Resampling arithmetic only: a shifted crop, a missed rotation or wrong statistics would be tens of levels.
    assert levels.max() <= 4.5 and levels.mean() <= 0.5


def test_random_crops_draw_the_offsets_the_exact_training_path_draws():
    jpegs = [_jpeg(w, h, seed) for seed, (w, h) in enumerate([(480, 240), (240, 480), (300, 301)])]
    images = [PIL.Image.open(io.BytesIO(j)) for j in jpegs]
    exact = HfClipImageProcessor().preprocess_for_training(images, torch.Generator().manual_seed(3))
    approximate = DeviceImagePreprocessor(HfClipImageProcessor(), "cpu").preprocess_for_training(
        jpegs, torch.Generator().manual_seed(3)
    )
    assert _levels(approximate, exact).max() <= 4.5


def test_sizes_mean_and_std_come_from_the_processor():
    """A 64-px processor with other statistics: the device path follows it (nothing hard-coded to OpenAI's 224)."""
    processor = HfClipImageProcessor(
        size={"shortest_edge": 64},
        crop_size={"height": 64, "width": 48},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.25, 0.25, 0.25],
    )
    jpegs = [_jpeg(w, h, seed) for seed, (w, h) in enumerate([(320, 240), (240, 400)])]
    exact = processor([PIL.Image.open(io.BytesIO(j)) for j in jpegs], return_tensors="pt")["pixel_values"]
    approximate = DeviceImagePreprocessor(processor, "cpu")(jpegs)
    assert approximate.shape == exact.shape == (2, 3, 64, 48)
    assert ((approximate - exact).abs() * 0.25 * 255).max() <= 4.5


def test_configurations_the_device_path_does_not_implement_are_refused():
    with pytest.raises(ValueError, match="bicubic"):
        DeviceImagePreprocessor(HfClipImageProcessor(resample=PIL.Image.Resampling.BILINEAR), "cpu")
    with pytest.raises(ValueError, match="default pipeline"):
        DeviceImagePreprocessor(HfClipImageProcessor(do_center_crop=False), "cpu")


def test_files_the_device_decoder_refuses_are_decoded_on_the_host(monkeypatch):
    """nvJPEG refuses some streams libjpeg-turbo reads. Emulated on CPU: a stand-in decoder refuses every call on the
    device that includes one file; the batch is then decoded file by file, that file on the host: same pixels."""
    jpegs = [
        torch.frombuffer(bytearray(_jpeg(w, h, seed)), dtype=torch.uint8)
        for seed, (w, h) in enumerate([(320, 240), (240, 400), (300, 301)])
    ]
    decoder = DeviceImagePreprocessor(HfClipImageProcessor(), "cpu")
    arguments = (jpegs, [1, 6, 1], [(0, 30), (0, 100), (0, 0)])
    expected = decoder.random_crops(*arguments)
    decode_jpeg, host_calls = torchvision.io.decode_jpeg, []

    def refusing_decode_jpeg(data, mode, device=None):
        if device is None:
            host_calls.append(data)
            return decode_jpeg(data, mode=mode)
        if any(jpeg is jpegs[1] for jpeg in (data if isinstance(data, list) else [data])):
            raise RuntimeError("nvjpegDecodeBatched failed")
        return decode_jpeg(data, mode=mode, device=device)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refusing_decode_jpeg)
    assert torch.equal(decoder.random_crops(*arguments), expected)
    assert len(host_calls) == 1 and host_calls[0] is jpegs[1]


def test_crop_offsets_outside_the_resized_image_are_a_clear_error():
    jpeg = torch.frombuffer(bytearray(_jpeg(320, 240, seed=0)), dtype=torch.uint8)  # resized to 224 x 298
    decoder = DeviceImagePreprocessor(HfClipImageProcessor(), "cpu")
    assert decoder.random_crops([jpeg], [1], [(0, 74)]).shape == (1, 3, 224, 224)
    for offsets in ((1, 0), (0, 75), (-1, 0)):
        with pytest.raises(ValueError, match="outside the resized 224x298"):
            decoder.random_crops([jpeg], [1], [offsets])
