"""HfClipImageProcessor against OpenAI's preprocessing as open_clip ships it (a required reference: no skip)."""

import io
import json
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import open_clip
import PIL.Image
import pytest
import torch
from PIL import ExifTags
from transformers import AutoImageProcessor, CLIPImageProcessorPil

from hf_clip import HfClipImageProcessor
from hf_clip.testing_utils import HIDE_TORCHVISION

CROP = 224


@pytest.fixture(scope="module")
def processor() -> HfClipImageProcessor:
    return HfClipImageProcessor()


@pytest.fixture(scope="module")
def reference():
    return open_clip.image_transform(CROP, is_train=False)


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> PIL.Image.Image:
    """Uniform noise: every pixel differs from its neighbours, so any resampling or offset difference shows."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2, "CMYK": 4}[mode]
    values = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    if mode in ("L", "RGB", "RGBA"):
        return PIL.Image.fromarray(values.squeeze(-1) if channels == 1 else values)
    return PIL.Image.frombytes(mode, (width, height), values.tobytes())


def pixels(processor: HfClipImageProcessor, images) -> torch.Tensor:
    return processor(images, return_tensors="pt")["pixel_values"]


def random_sizes(count: int, seed: int = 0) -> list[tuple[int, int]]:
    """Edge cases, then random (width, height) pairs; kept under 360 px so the reference stays fast."""
    rng = np.random.default_rng(seed)
    fixed = [(1, 1), (1, 7), (5, 300), (223, 224), (224, 224), (225, 224), (224, 227), (227, 229), (231, 300)]
    fixed += [(301, 226), (640, 229), (229, 640)]
    return fixed + [(int(w), int(h)) for w, h in rng.integers(2, 360, (count, 2))]


def rounding_matters(width: int, height: int) -> bool:
    """OpenAI's offset round((L - 224) / 2) exceeds the floored one exactly when L - 224 ≡ 3 (mod 4)."""
    long_side = int(CROP * max(width, height) / min(width, height))  # torchvision's resized long side
    return (long_side - CROP) % 4 == 3


def test_bit_identical_to_open_clip_on_random_sizes(processor, reference):
    sizes = random_sizes(100)
    # The test's own power: sizes where OpenAI's rounded crop offset and transformers' floored one differ.
    assert sum(rounding_matters(width, height) for width, height in sizes) >= 10

    images = [noise_image(width, height, seed=index) for index, (width, height) in enumerate(sizes)]
    ours = pixels(processor, images)
    expected = torch.stack([reference(image) for image in images])
    assert ours.dtype == torch.float32 and ours.shape == (len(sizes), 3, CROP, CROP)
    worst = (ours - expected).abs().flatten(1).amax(dim=1)
    assert worst.max().item() == 0, [size for size, error in zip(sizes, worst, strict=True) if error > 0][:10]


def test_reference_separates_round_from_floor(reference):
    # transformers' own PIL CLIP processor floors the crop offset: the oracle must see that one-pixel shift.
    image = noise_image(227, 224)
    assert rounding_matters(227, 224)
    floor_based = CLIPImageProcessorPil()(image, return_tensors="pt")["pixel_values"][0]
    assert (floor_based - reference(image)).abs().max() > 0


def test_grayscale_matches_open_clip(processor, reference):
    for width, height in [(333, 257), (224, 300), (17, 9)]:
        image = noise_image(width, height, mode="L")
        assert (pixels(processor, image)[0] - reference(image)).abs().max().item() == 0


def test_alpha_is_composited_onto_white(processor):
    rgba = noise_image(260, 240, mode="RGBA")
    values = np.asarray(rgba).copy()
    values[..., 3] = 255
    opaque = PIL.Image.fromarray(values, mode="RGBA")
    assert torch.equal(pixels(processor, opaque), pixels(processor, opaque.convert("RGB")))
    values[..., 3] = 0
    transparent = PIL.Image.fromarray(values, mode="RGBA")
    white = PIL.Image.new("RGB", transparent.size, (255, 255, 255))
    assert torch.equal(pixels(processor, transparent), pixels(processor, white))
    for mode in ("LA", "PA"):
        assert torch.equal(pixels(processor, transparent.convert(mode)), pixels(processor, white))


def test_palette_one_bit_and_cmyk_convert_to_rgb_before_resizing(processor):
    rgb = noise_image(250, 230)
    palette = rgb.quantize(64)
    assert torch.equal(pixels(processor, palette), pixels(processor, palette.convert("RGB")))
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 0
    expected = PIL.Image.alpha_composite(
        PIL.Image.new("RGBA", palette.size, (255, 255, 255, 255)), transparent_palette.convert("RGBA")
    ).convert("RGB")
    assert torch.equal(pixels(processor, transparent_palette), pixels(processor, expected))
    one_bit = rgb.convert("1")
    assert torch.equal(pixels(processor, one_bit), pixels(processor, one_bit.convert("L")))
    cmyk = noise_image(250, 230, mode="CMYK")
    assert torch.equal(pixels(processor, cmyk), pixels(processor, cmyk.convert("RGB")))


def test_sixteen_bit_images_are_scaled_to_eight_bits(processor):
    gray = noise_image(240, 231, mode="L")
    wide = np.asarray(gray).astype(np.uint16) * 257  # the same picture in the 16-bit range
    expected = pixels(processor, gray)
    for mode in ("I;16", "I"):
        image = PIL.Image.fromarray(wide if mode == "I;16" else wide.astype(np.int32))
        assert image.mode == mode and torch.equal(pixels(processor, image), expected), mode
    encoded = io.BytesIO()
    PIL.Image.fromarray(wide).save(encoded, format="PNG")
    assert torch.equal(pixels(processor, encoded.getvalue()), expected)
    with pytest.raises(ValueError, match="float"):
        processor(PIL.Image.fromarray(np.asarray(gray, dtype=np.float32)))


def test_one_pixel_image_is_upsampled_uniformly(processor, reference):
    image = PIL.Image.new("RGB", (1, 1), (200, 30, 90))
    ours = pixels(processor, image)[0]
    assert ours.shape == (3, CROP, CROP) and torch.equal(ours, reference(image))
    assert (ours == ours[:, :1, :1]).all()


def test_exif_orientation_is_applied(processor):
    upright = noise_image(300, 240)  # EXIF orientation 6: stored rotated, displayed after a 90° clockwise turn
    exif = PIL.Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    encoded = io.BytesIO()
    upright.save(encoded, format="PNG", exif=exif)
    tagged = PIL.Image.open(io.BytesIO(encoded.getvalue()))
    expected = pixels(processor, upright.transpose(PIL.Image.Transpose.ROTATE_270))
    assert torch.equal(pixels(processor, tagged), expected)
    assert torch.equal(pixels(processor, encoded.getvalue()), expected)
    assert not torch.equal(pixels(processor, upright), expected)


def jpeg_bytes(image: PIL.Image.Image) -> bytes:
    encoded = io.BytesIO()
    image.save(encoded, format="JPEG", quality=90)
    return encoded.getvalue()


def test_undecodable_input_raises_clearly(processor, tmp_path):
    data = jpeg_bytes(noise_image(320, 240))
    truncated = data[: len(data) // 2]
    with pytest.raises(ValueError, match="truncated"):
        processor(truncated)
    with pytest.raises(ValueError, match="truncated"):
        processor(PIL.Image.open(io.BytesIO(truncated)))  # lazily opened: fails on decode, not on open
    path = tmp_path / "cut.jpg"
    path.write_bytes(truncated)
    with pytest.raises(ValueError, match=r"cut\.jpg.*truncated"):
        processor(str(path))
    with pytest.raises(ValueError, match="not an image"):
        processor(b"this is not an image at all")
    (tmp_path / "notes.txt").write_text("plain text")
    with pytest.raises(ValueError, match="not an image"):
        processor(tmp_path / "notes.txt")


def test_encoded_bytes_and_paths_are_accepted(processor, tmp_path):
    image = noise_image(260, 250)
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    (tmp_path / "image.png").write_bytes(encoded.getvalue())
    expected = pixels(processor, image)
    assert torch.equal(pixels(processor, encoded.getvalue()), expected)
    assert torch.equal(pixels(processor, str(tmp_path / "image.png")), expected)


def test_arrays_tensors_and_pickled_copies_match_pil(processor):
    image = noise_image(300, 240)
    values = np.array(image)
    expected = pixels(processor, image)
    assert torch.equal(pixels(processor, values), expected)  # HWC uint8
    assert torch.equal(pixels(processor, torch.from_numpy(values).permute(2, 0, 1)), expected)  # CHW uint8
    assert torch.equal(pixels(pickle.loads(pickle.dumps(processor)), image), expected)  # DataLoader workers


def test_random_crop_for_training(processor):
    images = [noise_image(300, 240, seed=1), noise_image(224, 500, seed=2), noise_image(224, 224, seed=3)]
    first = processor.preprocess_for_training(images, torch.Generator().manual_seed(0))
    again = processor.preprocess_for_training(images, torch.Generator().manual_seed(0))
    other = processor.preprocess_for_training(images, torch.Generator().manual_seed(1))
    assert first.dtype == torch.float32 and first.shape == (3, 3, CROP, CROP)
    assert torch.equal(first, again) and not torch.equal(first, other)
    # Each crop is a CROP×CROP window of the resized (uncropped) image, at the offsets the generator draws.
    resized = [processor(image, do_center_crop=False, return_tensors="pt")["pixel_values"][0] for image in images]
    generator = torch.Generator().manual_seed(0)
    for crop, full in zip(first, resized, strict=True):
        top = int(torch.randint(full.shape[1] - CROP + 1, (1,), generator=generator))
        left = int(torch.randint(full.shape[2] - CROP + 1, (1,), generator=generator))
        assert torch.equal(crop, full[:, top : top + CROP, left : left + CROP])
    # A square image already at the crop size has one possible crop: the evaluation one.
    assert torch.equal(first[2], pixels(processor, images[2])[0])


def test_save_load_keeps_the_pil_backend(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "HfClipImageProcessor"
    image = noise_image(301, 226)
    for backend in (None, "torchvision", "pil"):  # torchvision is installed here: it must still not be used
        reloaded = AutoImageProcessor.from_pretrained(tmp_path, backend=backend)
        assert type(reloaded) is HfClipImageProcessor and reloaded.backend == "pil"
        assert torch.equal(pixels(reloaded, image), pixels(processor, image))


def test_runs_without_torchvision(processor, tmp_path):
    """In a fresh process where torchvision cannot be found, import, process and reload give the same bits."""
    image = noise_image(263, 301)
    image.save(tmp_path / "image.png")
    processor.save_pretrained(tmp_path / "saved")
    torch.save(pixels(processor, image), tmp_path / "expected.pt")
    script = HIDE_TORCHVISION + textwrap.dedent(
        """
        import sys
        import torch
        from transformers import AutoImageProcessor
        from transformers.utils import is_torchvision_available
        import hf_clip

        folder = sys.argv[1]
        assert not is_torchvision_available()
        for processor in (hf_clip.HfClipImageProcessor(), AutoImageProcessor.from_pretrained(folder + "/saved")):
            pixels = processor(folder + "/image.png", return_tensors="pt")["pixel_values"]
            assert torch.equal(pixels, torch.load(folder + "/expected.pt")), "pixels differ without torchvision"
        assert "torchvision" not in sys.modules
        """
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("image", [np.zeros((0, 0, 3), np.uint8), np.zeros((0, 5, 3), np.uint8), "pil-empty"])
def test_an_image_without_pixels_is_named_not_a_division_by_zero(image):
    image = PIL.Image.new("RGB", (0, 0)) if isinstance(image, str) else image
    with pytest.raises(ValueError, match="pixels has nothing to preprocess"):
        HfClipImageProcessor()(images=image, return_tensors="pt")
