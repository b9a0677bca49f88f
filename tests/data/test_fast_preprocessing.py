"""FastClipImagePreprocessor: bit-identical to HfClipImageProcessor (evaluation and training crops) on many sizes,
image modes and input kinds; clear errors outside the pipeline it implements."""

import io

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import ExifTags

from hf_clip.data.fast_preprocessing import FastClipImagePreprocessor
from hf_clip.image_processing_hf_clip import HfClipImageProcessor


def _picture(width: int, height: int, rng: np.random.Generator) -> PIL.Image.Image:
    """Smooth colour field plus grain, so JPEG coding and bicubic resizing see photo-like content."""
    coarse = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
    smooth = np.asarray(PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.Resampling.BILINEAR), np.int16)
    grain = rng.integers(-12, 13, smooth.shape)
    return PIL.Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def _encoded(image: PIL.Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _sizes(count: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    fixed = [(1, 1), (224, 224), (223, 225), (225, 223), (300, 225), (225, 301), (1024, 768), (97, 640)]
    return fixed + [(int(w), int(h)) for w, h in rng.integers(8, 700, (count - len(fixed), 2))]


@pytest.fixture(scope="module")
def processors() -> tuple[HfClipImageProcessor, FastClipImagePreprocessor]:
    processor = HfClipImageProcessor()
    return processor, FastClipImagePreprocessor(processor)


def test_evaluation_output_is_bit_identical_on_many_jpeg_sizes(processors):
    processor, fast = processors
    rng = np.random.default_rng(0)
    blobs = [_encoded(_picture(w, h, rng), quality=90) for w, h in _sizes(40)]
    reference = processor([PIL.Image.open(io.BytesIO(b)) for b in blobs], return_tensors="pt")["pixel_values"]
    output = fast(blobs)
    assert output.dtype == torch.float32 and output.shape == reference.shape == (40, 3, 224, 224)
    assert (output - reference).abs().max().item() == 0
    assert torch.equal(output.view(torch.int32), reference.view(torch.int32))  # the bits, signed zeros included


def test_training_crops_are_bit_identical_for_the_same_generator_state(processors):
    processor, fast = processors
    rng = np.random.default_rng(1)
    images = [_picture(w, h, rng) for w, h in _sizes(16, seed=1)]
    reference = processor.preprocess_for_training(images, torch.Generator().manual_seed(7))
    output = fast.preprocess_for_training(images, torch.Generator().manual_seed(7))
    assert torch.equal(output, reference)
    # Different draws really move the crop, so the equality above is not vacuous.
    assert not torch.equal(fast.preprocess_for_training(images, torch.Generator().manual_seed(8)), reference)


def test_other_modes_exif_rotation_and_input_kinds_follow_the_processor_policy(processors, tmp_path):
    processor, fast = processors
    rng = np.random.default_rng(2)
    rgb = _picture(260, 330, rng)
    exif = PIL.Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # rotate 90° on display
    rgba = rgb.convert("RGBA")
    rgba.putalpha(PIL.Image.fromarray(rng.integers(0, 256, (330, 260), dtype=np.uint8)))
    sources = [
        PIL.Image.open(io.BytesIO(_encoded(rgb, exif=exif.tobytes()))),
        PIL.Image.open(io.BytesIO(_encoded(rgb.convert("L")))),
        PIL.Image.open(io.BytesIO(_encoded(rgba, "PNG"))),
        PIL.Image.open(io.BytesIO(_encoded(rgb.convert("P"), "PNG"))),
        rgb.convert("CMYK"),
    ]
    reference = processor(sources, return_tensors="pt")["pixel_values"]
    assert torch.equal(fast(sources), reference)

    path = tmp_path / "picture.jpg"
    path.write_bytes(_encoded(rgb, exif=exif.tobytes()))
    assert torch.equal(fast(str(path)), reference[:1])
    assert torch.equal(fast(path.read_bytes()), reference[:1])


def test_clear_errors_outside_the_implemented_pipeline(processors):
    _, fast = processors
    with pytest.raises(ValueError, match="default pipeline"):
        FastClipImagePreprocessor(HfClipImageProcessor(do_center_crop=False))
    with pytest.raises(ValueError, match="larger than"):
        FastClipImagePreprocessor(HfClipImageProcessor(crop_size={"height": 256, "width": 256}))
    with pytest.raises(TypeError, match="PIL image"):
        fast([np.zeros((4, 4, 3), np.uint8)])
    with pytest.raises(ValueError, match="not an image"):
        fast(b"definitely not a JPEG")
