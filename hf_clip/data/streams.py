"""Image–caption data for training: `datasets` streaming, per-rank and per-worker splits, skip-and-count.

Sources (all read with `datasets.load_dataset(..., streaming=True)`, offline on local files):

- `webdataset`: tar shards of `<key>.<image ext>` + `<key>.txt` (+ `<key>.cls` for labelled splits);
- `parquet`: files with an image column (`{"bytes", "path"}` structs or raw bytes) and a caption column;
- `imagefolder`: a folder of images with a `metadata.jsonl` (`file_name` plus the caption / label columns).

Training may read several sources (`DataSpec`s with a name and a weight), each in its own format and columns: each is
shuffled on its own and mapped to common columns, and `datasets.interleave_datasets` draws every next sample from a
source chosen with probability proportional to its weight, until every source has been read once (a source that
runs out earlier starts over: `stopping_strategy="all_exhausted"`).

The stream is split across ranks with `split_dataset_by_node` (whole shards when their count, the smallest of the
sources', divides the world size, otherwise every rank reads everything and keeps its share) and across DataLoader
workers by `datasets`. Every sample is decoded and preprocessed on its own: an undecodable or truncated image, an
image PIL cannot convert to RGB, a missing field or an empty caption is skipped and counted by source and reason;
the counts travel with each batch. A tar archive that is itself truncated ends that worker's pass for the epoch, over
all sources when they are mixed (`datasets` can continue neither inside a broken archive nor in an interleaved
stream one of whose sources raised); it is logged with its file and source, counted under that source, never fatal.

Determinism (for exact resume): the shuffles and the choice of sources are seeded by (seed, epoch) through
`set_epoch` (from epoch 1 on, `datasets` reseeds the choice of sources from the epoch alone), and each sample's
random crop draws from a generator seeded by (seed, epoch, rank, worker, position), so an epoch's batches depend
only on those numbers and can be replayed.

Images are decoded in the workers (the default; the training loop uses `FastClipImagePreprocessor`, bit for bit the
processor's pixels), or, with `DeviceJpegs`, RGB and grayscale JPEGs only checked there and decoded on the training
device; the batch format of that mode is documented on `DeviceJpegs`.
"""

import io
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import datasets
import numpy as np
import PIL.Image
import torch
from datasets.distributed import split_dataset_by_node
from PIL import ExifTags

from ..image_processing_hf_clip import HfClipImageProcessor, decoded, load_image_bytes
from .fast_preprocessing import default_pipeline_geometry, random_crop_offsets, resized_size

logger = logging.getLogger(__name__)

DATA_FORMATS = ("webdataset", "parquet", "imagefolder")
SKIP_REASONS = ("bad_image", "empty_caption", "missing_field", "broken_shard")
MAX_NAMED_SKIPS = 20  # per worker and pass; later skips are logged at DEBUG level
# The columns every training source is mapped to (`source`: its index; `__key__`: None where the format has none).
TRAINING_FEATURES = datasets.Features(
    {
        "image": datasets.Image(decode=False),
        "caption": datasets.Value("string"),
        "source": datasets.Value("int64"),
        "__key__": datasets.Value("string"),
    }
)


@dataclass
class DataSpec:
    """Where a split lives and which columns hold what; a training source also has a name (in logs and metrics)
    and a sampling weight (relative to the other sources')."""

    data_format: str
    data_files: list[str]
    image_column: str
    text_column: str | None = None
    label_column: str | None = None
    name: str = "train"
    weight: float = 1.0


def load_stream(spec: DataSpec) -> datasets.IterableDataset:
    """The split as a streaming `IterableDataset` whose image column yields undecoded `{"bytes", "path"}`."""
    if spec.data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {spec.data_format!r}.")
    if not spec.data_files:
        raise ValueError("no data files given.")
    if spec.data_format == "imagefolder":
        dataset = datasets.load_dataset("imagefolder", data_dir=spec.data_files[0], split="train", streaming=True)
    else:
        dataset = datasets.load_dataset(
            spec.data_format, data_files={"train": spec.data_files}, split="train", streaming=True
        )
    columns = [spec.image_column, spec.text_column, spec.label_column]
    missing = [column for column in columns if column is not None and column not in (dataset.features or {})]
    if missing:
        raise ValueError(f"columns {missing} are not in the data; it has {list(dataset.features or {})}.")
    # Decoding is ours, per sample, so that a corrupt image is skipped instead of ending the run.
    if isinstance(dataset.features[spec.image_column], datasets.Image):
        dataset = dataset.cast_column(spec.image_column, datasets.Image(decode=False))
    return dataset


def check_sources(sources: list[DataSpec]) -> None:
    """Training sources: at least one; names non-empty, unique and usable in metric names; weights positive and
    finite; a caption column each."""
    if not sources:
        raise ValueError("no training sources given.")
    names = [spec.name for spec in sources]
    bad_names = [name for name in names if not name or "/" in name or name != name.strip()]
    if bad_names:
        raise ValueError(f"source names must be non-empty, without '/' or surrounding spaces; got {bad_names}.")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"source names must be unique; {duplicates} appear more than once.")
    for spec in sources:
        if not (math.isfinite(spec.weight) and spec.weight > 0):
            raise ValueError(f"source {spec.name!r}: weight must be positive and finite, got {spec.weight}.")
        if spec.text_column is None:
            raise ValueError(f"source {spec.name!r}: training data needs a caption column (text_column).")


def training_columns(
    spec: DataSpec, index: int, seed: int, shuffle_buffer: int, mixed: bool
) -> datasets.IterableDataset:
    """One source, shuffled (by `seed`, and through `set_epoch` by the epoch), in `TRAINING_FEATURES`' columns."""
    try:
        dataset = load_stream(spec)
    except ValueError as error:
        raise ValueError(f"source {spec.name!r}: {error}") from error
    if shuffle_buffer > 0:
        # Mixed, the buffer fills from one shard at a time: `datasets` ends every pass over a parquet source whose
        # shards it interleaves with a 5 s sleep (apache/arrow#45214), and a mixture restarts a source many times.
        shards = {"max_buffer_input_shards": 1} if mixed else {}
        dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer, **shards)
    # Mapped after the shuffle: the order of a shuffled parquet source depends on its arrow batches, kept so.
    return dataset.map(TrainingColumns(spec, index), remove_columns=list(dataset.features), features=TRAINING_FEATURES)


@dataclass
class TrainingColumns:
    """One source's example in `TRAINING_FEATURES`' columns (a class, not a closure: DataLoader workers started
    with `spawn` unpickle it)."""

    spec: DataSpec
    index: int

    def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
        image = example[self.spec.image_column]
        return {
            "image": {"bytes": image, "path": None} if isinstance(image, bytes) else image,
            "caption": example[cast(str, self.spec.text_column)],
            "source": self.index,
            "__key__": example.get("__key__"),
        }


def mixed_stream(sources: list[DataSpec], seed: int, shuffle_buffer: int = 1000) -> datasets.IterableDataset:
    """The training sources as one stream in `TRAINING_FEATURES`' columns: one source as it is (shuffled), several
    interleaved, each next sample from a source drawn with probability proportional to its weight, until every
    source has been read once (`stopping_strategy="all_exhausted"`)."""
    check_sources(sources)
    mixed = len(sources) > 1
    streams = [training_columns(spec, index, seed, shuffle_buffer, mixed) for index, spec in enumerate(sources)]
    if not mixed:
        return streams[0]
    total = sum(spec.weight for spec in sources)
    return datasets.interleave_datasets(
        streams,
        probabilities=[spec.weight / total for spec in sources],
        seed=sample_seed(seed, len(sources)),  # not `seed` itself: the shuffle buffers draw from that
        stopping_strategy="all_exhausted",
    )


def broken_source(error: BaseException, sources: list[DataSpec]) -> tuple[int | None, str | None]:
    """The source, and the file, that a data stream was reading when it raised `error`; `(None, None)` if unknown.

    `datasets`' readers hold the path of the file they read in a local variable, and the traceback keeps their
    frames (also those of the threads `interleave_datasets` reads its sources in), so the frames name the file."""
    owners = {os.path.realpath(path): index for index, spec in enumerate(sources) for path in spec.data_files}
    traceback = error.__traceback__
    while traceback is not None:
        for value in traceback.tb_frame.f_locals.values():
            if not isinstance(value, str) or not value:
                continue
            path = os.path.realpath(value)
            for owner, index in owners.items():
                if path == owner or path.startswith(owner + os.sep):  # a file, or a file in a folder (imagefolder)
                    return index, value
        traceback = traceback.tb_next
    return None, None


def skip_metrics(skipped: torch.Tensor, sources: list[DataSpec]) -> dict[str, int]:
    """Skip counts `(sources, SKIP_REASONS)` as metrics: `skipped_samples`, `skipped/<reason>` over all sources, and
    with several sources `skipped/<source>/<reason>`."""
    counts = skipped.tolist()
    if len(counts) != len(sources):
        raise ValueError(f"skip counts for {len(counts)} sources, but {len(sources)} sources given.")
    totals = [sum(column) for column in zip(*counts, strict=True)]
    metrics = {"skipped_samples": sum(totals)}
    metrics.update({f"skipped/{reason}": total for reason, total in zip(SKIP_REASONS, totals, strict=True)})
    if len(sources) > 1:
        for spec, row in zip(sources, counts, strict=True):
            metrics.update({f"skipped/{spec.name}/{reason}": n for reason, n in zip(SKIP_REASONS, row, strict=True)})
    return metrics


def image_bytes(value: Any) -> bytes | bytearray | None:
    """Encoded image bytes from a `{"bytes", "path"}` struct or raw bytes; `None` when absent."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            with open(value["path"], "rb") as file:
                return file.read()
        return None
    return value if isinstance(value, (bytes, bytearray)) and value else None


def random_crop(image_processor: Any, image: Any, generator: torch.Generator) -> torch.Tensor:
    """The paper's training augmentation for one image: resize, then a random square crop, by
    `image_processor.preprocess_for_training` (`HfClipImageProcessor` or `FastClipImagePreprocessor`: same pixels)."""
    return image_processor.preprocess_for_training([image], generator)[0]


@dataclass
class DeviceJpeg:
    """A training image the device decodes: the JPEG file, its EXIF orientation and the crop drawn for it."""

    data: bytes
    orientation: int
    top: int
    left: int


class DeviceJpegs:
    """The worker side of `image_decoding="device"`: JPEGs are checked and cropped here, decoded on the device.

    `__call__` takes the encoded image of one sample. An RGB or grayscale JPEG is decoded at 1/8 scale (PIL's draft
    mode: the entropy decoding of the whole stream still runs, so a truncated or corrupt file fails here as it would
    on the CPU path, at a fraction of a full decode's cost), and its crop offsets are drawn from the sample's
    generator exactly as the CPU path draws them; everything else (PNG, CMYK JPEGs, ...) returns `None` and takes
    the CPU path in the worker.

    `collate` writes a batch whose samples come in their stream order from both paths:

    - `decoded_on_device`: bool `(batch,)`, which rows the device decodes;
    - `jpeg_data`: uint8, those rows' JPEG files concatenated, split by `jpeg_lengths` (int64, one per such row);
    - `jpeg_orientations`: int64, their EXIF orientations (1-8); `jpeg_crop_offsets`: int64 `(rows, 2)`, the
      `(top, left)` of each crop in the resized upright image;
    - `cpu_pixel_values`: float32 `(other rows, 3, height, width)`, the other rows, preprocessed in the worker.

    `hf_clip.training.batches.device_images` turns it into `pixel_values` on the device.
    """

    def __init__(self, processor: HfClipImageProcessor):
        self.shortest_edge, self.crop_height, self.crop_width = default_pipeline_geometry(processor)

    def __call__(self, data: bytes | bytearray, name: str, generator: torch.Generator) -> DeviceJpeg | None:
        if data[:3] != b"\xff\xd8\xff":  # not a JPEG: the CPU path decodes it (and names the problem if it can't)
            return None
        try:
            image = PIL.Image.open(io.BytesIO(data))
        except PIL.UnidentifiedImageError as error:
            raise ValueError(f"{name} is not an image in a format PIL can read ({error}).") from error
        if image.format != "JPEG" or image.mode not in ("RGB", "L"):
            return None
        width, height = image.size
        orientation = int(image.getexif().get(ExifTags.Base.Orientation, 1))
        if orientation in (5, 6, 7, 8):  # transposed: the upright image is height × width
            width, height = height, width
        image.draft("L", (1, 1))  # luma only, 1/8 scale
        decoded(image, name)
        top, left = random_crop_offsets(
            *resized_size(self.shortest_edge, height, width), self.crop_height, self.crop_width, generator
        )
        return DeviceJpeg(bytes(data), orientation, top, left)

    def collate(self, images: list[torch.Tensor | DeviceJpeg]) -> dict[str, torch.Tensor]:
        jpegs = [image for image in images if isinstance(image, DeviceJpeg)]
        pixels = [image for image in images if isinstance(image, torch.Tensor)]
        offsets = torch.tensor([(jpeg.top, jpeg.left) for jpeg in jpegs], dtype=torch.int64)
        return {
            "decoded_on_device": torch.tensor([isinstance(image, DeviceJpeg) for image in images]),
            "jpeg_data": torch.from_numpy(np.frombuffer(b"".join(jpeg.data for jpeg in jpegs), np.uint8).copy()),
            "jpeg_lengths": torch.tensor([len(jpeg.data) for jpeg in jpegs], dtype=torch.int64),
            "jpeg_orientations": torch.tensor([jpeg.orientation for jpeg in jpegs], dtype=torch.int64),
            "jpeg_crop_offsets": offsets.view(-1, 2),  # (0, 2) when every row is decoded in the worker
            "cpu_pixel_values": (
                torch.stack(pixels) if pixels else torch.empty(0, 3, self.crop_height, self.crop_width)
            ),
        }


def sample_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (a polynomial hash: stable across processes and runs)."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + part + 1) % (2**63 - 1)
    return seed


class SkipLog:
    """Counts skipped samples by reason and names the first `MAX_NAMED_SKIPS` of a worker's pass in the log (enough
    to find a bad shard or file); later ones go to DEBUG, and the counts travel with the data anyway."""

    def __init__(self, rank: int):
        self.rank = rank
        self.named = 0

    def restart(self) -> None:
        self.named = 0

    def skip(self, skipped: Counter[str], reason: str, key: str, detail: str) -> None:
        skipped[reason] += 1
        self.named += 1
        level = logging.WARNING if self.named <= MAX_NAMED_SKIPS else logging.DEBUG
        logger.log(level, "rank %d: skipped sample %s (%s): %s", self.rank, key, reason, detail)


class ClipBatches(torch.utils.data.IterableDataset):
    """Full batches of `{"pixel_values", "input_ids", "attention_mask", "skipped"}` for one rank, from the training
    `sources` (`mixed_stream`).

    Use with `DataLoader(batch_size=None)`: batching happens here, after skipping, so every batch is full (the
    contrastive loss needs the same batch size on every rank). `skipped` (int64, `(len(sources), len(SKIP_REASONS))`)
    counts, per source and reason, the samples dropped since the previous batch of the same worker; a worker's pass
    ends with a `{"skipped"}`-only record when samples were dropped after its last full batch. `skip_metrics` turns
    summed counts into metrics.

    `image_transform(image, generator)` preprocesses a decoded image in the worker. With `device_jpegs`, the JPEGs
    it accepts skip that transform and travel encoded: batches then carry `DeviceJpegs.collate`'s fields instead of
    `pixel_values`.
    """

    def __init__(
        self,
        sources: list[DataSpec],
        *,
        image_transform: Callable[[Any, torch.Generator], torch.Tensor],
        tokenizer: Callable[..., Any],
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        shuffle_buffer: int = 1000,
        device_jpegs: DeviceJpegs | None = None,
    ):
        super().__init__()
        if batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (the contrastive loss of 1 pair is 0), got {batch_size}.")
        self.sources = sources
        self.dataset = split_dataset_by_node(
            mixed_stream(sources, seed, shuffle_buffer), rank=rank, world_size=world_size
        )
        self.image_transform = image_transform
        self.device_jpegs = device_jpegs
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.skip_log = SkipLog(rank)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        self.skip_log.restart()
        images: list[torch.Tensor | DeviceJpeg] = []
        captions: list[str] = []
        skipped = self._no_skips()
        position = 0
        examples = iter(self.dataset)
        while True:
            try:
                example = next(examples)
            except StopIteration:
                break
            except Exception as error:  # tarfile.ReadError, OSError, pyarrow errors from a damaged file
                self._broken(error, worker_id, skipped)
                break
            position += 1
            generator = torch.Generator().manual_seed(
                sample_seed(self.seed, self.epoch, self.rank, worker_id, position)
            )
            sample = self._sample(example, generator, skipped[example["source"]])
            if sample is None:
                continue
            images.append(sample[0])
            captions.append(sample[1])
            if len(images) == self.batch_size:
                yield self._collate(images, captions, skipped)
                images, captions, skipped = [], [], self._no_skips()
        if any(skipped):  # the counts of the dropped partial batch, as a record without samples
            yield {"skipped": self._counts(skipped)}

    def _no_skips(self) -> list[Counter[str]]:
        return [Counter() for _ in self.sources]

    def _broken(self, error: Exception, worker_id: int, skipped: list[Counter[str]]) -> None:
        index, path = broken_source(error, self.sources)
        source = repr(self.sources[index or 0].name)
        if index is None and len(self.sources) > 1:  # counted once all the same, under the first source
            source = f"unknown, counted under {source}"
        logger.error(
            "rank %d worker %d: data stream broke in %s (source %s): %s; ending this epoch's pass.",
            self.rank,
            worker_id,
            path or "an unknown file",
            source,
            error,
        )
        skipped[index or 0]["broken_shard"] += 1

    def _sample(
        self, example: dict, generator: torch.Generator, skipped: Counter
    ) -> tuple[torch.Tensor | DeviceJpeg, str] | None:
        key = str(example["__key__"] or "?")
        if len(self.sources) > 1:
            key += f" of source {self.sources[example['source']].name!r}"
        caption = example["caption"]
        data = image_bytes(example["image"])
        if data is None or caption is None:
            self.skip_log.skip(skipped, "missing_field", key, "no image or no caption")
            return None
        if not isinstance(caption, str) or not caption.strip():
            self.skip_log.skip(skipped, "empty_caption", key, "empty caption")
            return None
        image: torch.Tensor | DeviceJpeg | None = None
        try:
            if self.device_jpegs is not None:
                image = self.device_jpegs(data, key, generator)
            if image is None:
                image = self.image_transform(load_image_bytes(data, name=key), generator)
        except (ValueError, OSError, PIL.Image.DecompressionBombError) as error:
            self.skip_log.skip(skipped, "bad_image", key, str(error))
            return None
        return image, caption.strip()

    def _collate(
        self, images: list[torch.Tensor | DeviceJpeg], captions: list[str], skipped: list[Counter[str]]
    ) -> dict[str, torch.Tensor]:
        text = self.tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
        if self.device_jpegs is None:
            pixels = {"pixel_values": torch.stack(cast(list[torch.Tensor], images))}
        else:
            pixels = self.device_jpegs.collate(images)
        return {
            **pixels,
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "skipped": self._counts(skipped),
        }

    @staticmethod
    def _counts(skipped: list[Counter[str]]) -> torch.Tensor:
        return torch.tensor([[counts[reason] for reason in SKIP_REASONS] for counts in skipped], dtype=torch.int64)


def labelled_batches(
    spec: DataSpec,
    image_processor: Callable[..., Any],
    batch_size: int,
    rank: int,
    world_size: int,
    max_samples: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of a labelled evaluation split as (pixel_values, labels) batches (eval preprocessing).

    Undecodable images are skipped with a warning, as in training. `max_samples` bounds the whole split.
    """
    if spec.label_column is None:
        raise ValueError("zero-shot evaluation needs a label column (eval_label_column).")
    dataset = load_stream(spec)
    if max_samples is not None:
        dataset = dataset.take(max_samples)
    dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    batches, images, labels = [], [], []
    for example in dataset:
        data = image_bytes(example.get(spec.image_column))
        label = example.get(spec.label_column)
        try:
            if data is None or label is None:
                raise ValueError("missing image or label")
            images.append(load_image_bytes(data, name=str(example.get("__key__", "?"))))
            labels.append(int(label))
        except (ValueError, OSError) as error:
            logger.warning("rank %d: skipped evaluation sample: %s", rank, error)
            continue
        if len(images) == batch_size:
            batches.append((image_processor(images=images, return_tensors="pt")["pixel_values"], torch.tensor(labels)))
            images, labels = [], []
    if images:
        batches.append((image_processor(images=images, return_tensors="pt")["pixel_values"], torch.tensor(labels)))
    return batches
