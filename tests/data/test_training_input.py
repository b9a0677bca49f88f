"""The images a training step receives: the workers' fast path equals the processor's bit for bit, and device
decoding (`image_decoding="device"`) gives the CPU path's batches within a few 8-bit levels, from the same crop
offsets, with the same skips; PNGs and CMYK JPEGs stay on the CPU path. Run on CPU (torchvision's CPU decoder)."""

import functools
import io
import subprocess
import sys
import tarfile
import textwrap
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import ExifTags

from hf_clip import HfClipImageProcessor, HfClipTokenizer, train_clip_bpe
from hf_clip.data.device_decoding import DeviceImagePreprocessor
from hf_clip.data.device_jpegs import DeviceJpegs, device_images
from hf_clip.data.fast_preprocessing import FastClipImagePreprocessor
from hf_clip.data.formats import DataSpec
from hf_clip.data.streams import ClipBatches, random_crop
from hf_clip.synthetic import jpeg_bytes, photo_like
from hf_clip.testing_utils import HIDE_TORCHVISION
from hf_clip.training import TrainConfig
from hf_clip.training.loop import train_batches

# Resize to 40, crop 32: both crop offsets are drawn from a real range, so a swapped or shifted offset shows.
PROCESSOR = HfClipImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
CPU = torch.device("cpu")
# Device decoding vs the exact path, in 8-bit levels (tests/data/test_device_decoding.py's bounds).
MAX_LEVELS, MEAN_LEVELS = 4.5, 0.5


def encoded(image: PIL.Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def rotated_jpeg(image: PIL.Image.Image, orientation: int) -> bytes:
    exif = PIL.Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return jpeg_bytes(image, exif=exif)


# name → (encode a photo, decoded on the device?). None: damaged, skipped as bad_image on both paths.
KINDS = {
    "rgb jpeg": (jpeg_bytes, True),
    "grayscale jpeg": (lambda image: jpeg_bytes(image.convert("L")), True),
    "progressive jpeg": (lambda image: encoded(image, "JPEG", quality=90, progressive=True), True),
    "exif-rotated jpeg (6)": (lambda image: rotated_jpeg(image, 6), True),
    "exif-rotated jpeg (3)": (lambda image: rotated_jpeg(image, 3), True),
    "cmyk jpeg": (lambda image: jpeg_bytes(image.convert("CMYK")), False),
    "rgba png": (lambda image: encoded(image.convert("RGBA"), "PNG"), False),
    "palette png": (lambda image: encoded(image.convert("P"), "PNG"), False),
    "truncated jpeg": (lambda image: jpeg_bytes(image)[: len(jpeg_bytes(image)) * 2 // 3], None),
    "jpeg without its end marker": (lambda image: jpeg_bytes(image)[:-2], None),
    "jpeg header only": (lambda image: jpeg_bytes(image)[:600], None),
    "not an image": (lambda image: b"\xff\xd8\xff but not a JPEG", None),
}
SIZES = [(97, 64), (64, 120), (300, 211), (45, 333), (160, 160), (71, 58)]


@pytest.fixture(scope="module")
def samples() -> list[tuple[str, bytes]]:
    """Every kind three times, at different sizes, in a fixed interleaved order."""
    rng = np.random.default_rng(0)
    rows = []
    for repeat in range(3):
        for index, (kind, (encode, _)) in enumerate(KINDS.items()):
            rows.append((kind, encode(photo_like(*SIZES[(index + repeat) % len(SIZES)], rng))))
    return rows


@pytest.fixture(scope="module")
def spec(samples, tmp_path_factory) -> DataSpec:
    """A webdataset shard; every image under `.jpg`, whatever its format, as in real crawled shards."""
    path = tmp_path_factory.mktemp("mixed") / "mixed.tar"
    with tarfile.open(path, "w") as tar:
        for index, (kind, data) in enumerate(samples):
            for extension, content in (("jpg", data), ("txt", f"picture {index}: {kind}".encode())):
                member = tarfile.TarInfo(f"sample{index:03d}.{extension}")
                member.size = len(content)
                tar.addfile(member, io.BytesIO(content))
    return DataSpec("webdataset", [str(path)], "jpg", "txt")


@pytest.fixture(scope="module")
def tokenizer() -> HfClipTokenizer:
    return train_clip_bpe([f"picture {i}: {kind}" for i in range(40) for kind in KINDS], vocab_size=600)


def clip_batches(spec, tokenizer, transform_processor, device_jpegs: DeviceJpegs | None = None) -> ClipBatches:
    return ClipBatches(
        [spec],
        image_transform=functools.partial(random_crop, transform_processor),
        tokenizer=tokenizer,
        batch_size=5,
        seed=3,
        rank=0,
        world_size=1,
        shuffle_buffer=8,
        device_jpegs=device_jpegs,
    )


def epochs(batches: ClipBatches) -> list[dict[str, torch.Tensor]]:
    """Two epochs of records (full batches and skip-only records)."""
    records = []
    for epoch in (0, 1):
        batches.set_epoch(epoch)
        records += list(batches)
    return records


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs() * torch.tensor(PROCESSOR.image_std).view(1, 3, 1, 1) * 255


@pytest.fixture(scope="module")
def cpu_records(spec, tokenizer) -> list[dict[str, torch.Tensor]]:
    return epochs(clip_batches(spec, tokenizer, FastClipImagePreprocessor(PROCESSOR)))


def test_fast_worker_transform_equals_the_processor_transform_bit_for_bit(spec, tokenizer, cpu_records):
    reference = epochs(clip_batches(spec, tokenizer, PROCESSOR))
    assert len(cpu_records) == len(reference) and sum("pixel_values" in record for record in reference) >= 8
    for fast, exact in zip(cpu_records, reference, strict=True):
        assert fast.keys() == exact.keys()
        for name in fast:
            assert torch.equal(fast[name], exact[name]), name


def test_train_batches_use_the_configured_decoding(spec, tokenizer, cpu_records):
    """The loop's wiring: the exact pixels by default; device decoding hands back its decoder and JPEG batches,
    which cross the DataLoader's worker boundary intact."""
    accelerator = SimpleNamespace(process_index=0, num_processes=1, device=CPU)
    config = TrainConfig(
        model_config="unused", train_data_files=spec.data_files, per_device_batch_size=5, seed=3, shuffle_buffer=8,
    )  # fmt: skip
    processor = SimpleNamespace(image_processor=PROCESSOR, tokenizer=tokenizer)
    _, loader, decoder = train_batches(config, processor, accelerator)
    records = list(loader)  # epoch 0
    assert decoder is None and len(records) < len(cpu_records)
    for record, reference in zip(records, cpu_records, strict=False):
        assert record.keys() == reference.keys()
        assert all(torch.equal(record[name], reference[name]) for name in record)
    config.image_decoding, config.dataloader_num_workers = "device", 1
    _, loader, decoder = train_batches(config, processor, accelerator)
    assert isinstance(decoder, DeviceImagePreprocessor) and decoder.device == CPU
    record = next(iter(loader))
    assert "pixel_values" not in record and record["decoded_on_device"].any()
    assert device_images(record, CPU, decoder)["pixel_values"].shape == (5, 3, 32, 32)


@pytest.fixture(scope="module")
def device_records(spec, tokenizer) -> list[dict[str, torch.Tensor]]:
    return epochs(clip_batches(spec, tokenizer, FastClipImagePreprocessor(PROCESSOR), DeviceJpegs(PROCESSOR)))


def test_device_decoding_matches_the_cpu_path(device_records, cpu_records):
    decoder = DeviceImagePreprocessor(PROCESSOR, CPU)
    assert len(device_records) == len(cpu_records)
    on_device = in_worker = 0
    for record, reference in zip(device_records, cpu_records, strict=True):
        # The same samples in the same order, the same skips (damaged JPEGs are caught in the worker).
        assert torch.equal(record["skipped"], reference["skipped"])
        if "input_ids" not in reference:
            continue
        assert torch.equal(record["input_ids"], reference["input_ids"])
        pixel_values = device_images(record, CPU, decoder)["pixel_values"]
        assert pixel_values.shape == reference["pixel_values"].shape == (5, 3, 32, 32)
        difference = levels(pixel_values, reference["pixel_values"])
        assert difference.max() <= MAX_LEVELS and difference.mean() <= MEAN_LEVELS
        # Rows decoded in the worker (PNG, CMYK) are the exact path's pixels.
        rows = record["decoded_on_device"]
        assert torch.equal(pixel_values[~rows], reference["pixel_values"][~rows])
        on_device, in_worker = on_device + int(rows.sum()), in_worker + int((~rows).sum())
    assert on_device >= 20 and in_worker >= 8  # both paths really ran
    damaged = sum(on_device is None for _, on_device in KINDS.values())
    assert sum(int(record["skipped"][0, 0]) for record in device_records) == 2 * 3 * damaged  # bad_image, 2 epochs


def test_device_crops_use_the_cpu_path_offsets(device_records, cpu_records):
    """Moving the drawn offsets by one pixel leaves the tolerance: the offsets are the CPU path's, not merely close."""
    decoder = DeviceImagePreprocessor(PROCESSOR, CPU)
    record, reference = next((r, c) for r, c in zip(device_records, cpu_records, strict=True) if "input_ids" in r)
    offsets = record["jpeg_crop_offsets"]
    for axis in (0, 1):
        shifted = offsets.clone()
        shifted[:, axis] = torch.where(offsets[:, axis] > 0, offsets[:, axis] - 1, offsets[:, axis] + 1)
        pixel_values = device_images({**record, "jpeg_crop_offsets": shifted}, CPU, decoder)["pixel_values"]
        assert levels(pixel_values, reference["pixel_values"]).max() > 3 * MAX_LEVELS


def test_worker_check_sorts_and_rejects_files():
    rng = np.random.default_rng(1)
    picture = photo_like(90, 60, rng)
    check = DeviceJpegs(PROCESSOR)
    generator = torch.Generator().manual_seed(0)
    for kind, (encode, on_device) in KINDS.items():
        data = encode(picture)
        state = generator.get_state()
        if on_device is None:
            with pytest.raises((ValueError, OSError)):
                check(data, kind, generator)
        elif on_device:
            jpeg = check(data, kind, generator)
            assert jpeg is not None and jpeg.data == data, kind
            # The crop is drawn as the CPU path draws it: from the sample's generator, two draws.
            exact = FastClipImagePreprocessor(PROCESSOR).preprocess_for_training(
                data, torch.Generator().set_state(state)
            )
            approximate = DeviceImagePreprocessor(PROCESSOR, CPU).random_crops(
                [torch.frombuffer(bytearray(data), dtype=torch.uint8)], [jpeg.orientation], [(jpeg.top, jpeg.left)]
            )
            assert levels(approximate, exact).max() <= MAX_LEVELS, kind
        else:
            assert check(data, kind, generator) is None, kind
            assert torch.equal(generator.get_state(), state), kind  # nothing drawn: the CPU path draws the crop


def test_clear_errors_for_a_wrong_setting_or_a_missing_decoder(device_records):
    with pytest.raises(ValueError, match="image_decoding"):
        TrainConfig(model_config="ViT-B-32", image_decoding="gpu").validate()
    record = next(record for record in device_records if "input_ids" in record)
    with pytest.raises(ValueError, match="DeviceImagePreprocessor"):
        device_images(record, CPU)


def test_cpu_decoding_needs_no_torchvision(spec, tmp_path):
    """In a process where torchvision cannot be found, the default training input runs and never imports device
    decoding; `image_decoding="device"` fails at set-up with an error naming torchvision."""
    script = HIDE_TORCHVISION + textwrap.dedent(
        """
        import sys
        from types import SimpleNamespace
        import torch
        from hf_clip import HfClipImageProcessor, train_clip_bpe
        from hf_clip.training import TrainConfig
        from hf_clip.training.loop import train_batches

        processor = SimpleNamespace(
            image_processor=HfClipImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}),
            tokenizer=train_clip_bpe(["a picture"] * 10, vocab_size=600),
        )
        accelerator = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
        config = TrainConfig(model_config="unused", train_data_files=[sys.argv[1]], per_device_batch_size=5)
        _, loader, decoder = train_batches(config, processor, accelerator)
        assert decoder is None and next(iter(loader))["pixel_values"].shape == (5, 3, 32, 32)
        assert "torchvision" not in sys.modules and "hf_clip.data.device_decoding" not in sys.modules
        config.image_decoding = "device"
        try:
            train_batches(config, processor, accelerator)
        except ImportError as error:
            assert "torchvision" in str(error), error
        else:
            raise AssertionError("device decoding started without torchvision")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, spec.data_files[0]], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
