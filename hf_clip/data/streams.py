"""Image–caption data for training: `datasets` streaming, per-rank and per-worker splits, skip-and-count.

Sources are opened through the format table (`hf_clip.data.formats`: webdataset, parquet, imagefolder, arrow, csv).
Training may read several sources (`DataSpec`s with a name and a weight), each in its own format and columns: each is
shuffled on its own and mapped to common columns, and `datasets.interleave_datasets` draws every next sample from a
source chosen with probability proportional to its weight, until every source has been read once (a source that
runs out earlier starts over: `stopping_strategy="all_exhausted"`).

The stream is split across ranks with `split_dataset_by_node` (whole shards when their count, the smallest of the
sources', divides the world size, otherwise every rank reads everything and keeps its share) and across DataLoader
workers by `datasets`. Every example goes through the one `SampleDecoder` (`hf_clip.data.samples`): a sample that
cannot be used is one skip, counted by source and reason and named in the log; the counts travel with each batch.
A tar shard that breaks costs the rest of that shard, counted as one `broken_shard` after the samples read before
the break, and the worker goes on with its next shard; another file that breaks the stream (a damaged parquet file)
ends that worker's pass for the epoch, over all sources when they are mixed (`datasets` can continue neither a
stream that raised nor an interleaved stream one of whose sources raised): logged with its file and source, counted
under that source, never fatal (`hf_clip.data.archives`).

Determinism (for exact resume): the shuffles and the choice of sources are seeded by (seed, epoch) through
`set_epoch` (from epoch 1 on, `datasets` reseeds the choice of sources from the epoch alone), and each sample's
random crop draws from a generator seeded by (seed, epoch, rank, worker, position), so an epoch's batches depend
only on those numbers and can be replayed.

Images are decoded in the workers (the default; the training loop uses `FastClipImagePreprocessor`, bit for bit the
processor's pixels), or, with `DeviceJpegs` (`hf_clip.data.device_jpegs`), RGB and grayscale JPEGs only checked there
and decoded on the training device.
"""

import functools
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import datasets
import torch
from datasets.distributed import split_dataset_by_node

from ..image_processing_hf_clip import load_image_bytes
from ..tokenization_hf_clip import tokenize_captions
from .archives import BROKEN_COLUMN, guarded, holds
from .device_jpegs import DeviceJpeg, DeviceJpegs
from .formats import DataSpec, open_source
from .samples import SKIP_REASONS, SampleDecoder, SkipLog

logger = logging.getLogger(__name__)

# The columns every training source is mapped to (`source`: its index; `__key__`: None where the format has none;
# `caption`: bytes, decoded per sample; `__broken__`: the marker of a broken file).
TRAINING_FEATURES = datasets.Features(
    {
        "image": datasets.Image(decode=False),
        "caption": datasets.Value("binary"),
        "source": datasets.Value("int64"),
        "__key__": datasets.Value("string"),
        BROKEN_COLUMN: datasets.Value("string"),
    }
)


def check_sources(sources: list[DataSpec]) -> None:
    """Training sources: at least one; names non-empty, unique and usable in metric names; weights positive and
    finite."""
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


def training_columns(
    spec: DataSpec, index: int, seed: int, shuffle_buffer: int, mixed: bool
) -> datasets.IterableDataset:
    """One source, shuffled (by `seed`, and through `set_epoch` by the epoch), in `TRAINING_FEATURES`' columns."""
    try:
        source = open_source(spec, need_text=True)
    except (ValueError, FileNotFoundError) as error:
        raise ValueError(f"source {spec.name!r}: {error}") from error
    dataset = source.dataset
    if shuffle_buffer > 0:
        # Mixed, the buffer fills from one shard at a time: `datasets` ends every pass over a parquet source whose
        # shards it interleaves with a 5 s sleep (apache/arrow#45214), and a mixture restarts a source many times.
        shards = {"max_buffer_input_shards": 1} if mixed else {}
        dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer, **shards)
    # Mapped after the shuffle: the order of a shuffled parquet source depends on its arrow batches, kept so.
    return dataset.map(
        TrainingColumns(source.spec, index), remove_columns=list(dataset.features), features=TRAINING_FEATURES
    )


@dataclass
class TrainingColumns:
    """One source's example in `TRAINING_FEATURES`' columns, unjudged: `SampleDecoder` decides what is usable (a
    class, not a closure: DataLoader workers started with `spawn` unpickle it)."""

    spec: DataSpec
    index: int

    def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
        image = example[cast(str, self.spec.image_column)]
        caption = example[cast(str, self.spec.text_column)]
        return {
            "image": {"bytes": image, "path": None} if isinstance(image, (bytes, bytearray)) else image,
            "caption": caption.encode("utf-8", "surrogateescape") if isinstance(caption, str) else caption,
            "source": self.index,
            "__key__": example.get("__key__"),
            BROKEN_COLUMN: example.get(BROKEN_COLUMN),
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


def source_of_file(path: str | None, sources: list[DataSpec]) -> int | None:
    """The index of the source whose files hold `path` (a broken file), or `None`."""
    if path is None:
        return None
    return next((index for index, spec in enumerate(sources) if holds(spec.data_files, path)), None)


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


def random_crop(image_processor: Any, image: Any, generator: torch.Generator) -> torch.Tensor:
    """The paper's training augmentation for one image: resize, then a random square crop, by
    `image_processor.preprocess_for_training` (`HfClipImageProcessor` or `FastClipImagePreprocessor`: same pixels)."""
    return image_processor.preprocess_for_training([image], generator)[0]


def sample_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (a polynomial hash: stable across processes and runs)."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + part + 1) % (2**63 - 1)
    return seed


class ClipBatches(torch.utils.data.IterableDataset):
    """Full batches of `{"pixel_values", "input_ids", "attention_mask", "skipped", "truncated_captions"}` for one
    rank, from the training `sources` (`mixed_stream`); `truncated_captions` counts the batch's captions cut to the
    tokenizer's `model_max_length` (`tokenize_captions`).

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
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
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
        self.decoder = SampleDecoder("image", "caption", skip_log=self.skip_log)

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
        files = [file for spec in self.sources for file in spec.data_files]
        for position, example in enumerate(guarded(self.dataset, files), start=1):
            generator = torch.Generator().manual_seed(
                sample_seed(self.seed, self.epoch, self.rank, worker_id, position)
            )
            index = self._source_index(example)
            decode_image = functools.partial(self._image, generator=generator)
            # A format without keys or paths (parquet of raw bytes): the sample is named by its place in the stream.
            fallback_key = f"#{position} of worker {worker_id}'s epoch-{self.epoch} stream"
            sample = self.decoder(example, skipped[index], decode_image, fallback_key, where=self._where(index))
            if sample is None:
                continue
            images.append(cast(torch.Tensor | DeviceJpeg, sample.image))
            captions.append(cast(str, sample.caption))
            if len(images) == self.batch_size:
                yield self._collate(images, captions, skipped)
                images, captions, skipped = [], [], self._no_skips()
        if any(skipped):  # the counts of the dropped partial batch, as a record without samples
            yield {"skipped": self._counts(skipped)}

    def _no_skips(self) -> list[Counter[str]]:
        return [Counter() for _ in self.sources]

    def _source_index(self, example: dict[str, Any]) -> int:
        """The example's source; a broken file the stream raised on is attributed to the source holding it (the
        first one when unknown, named so in the log)."""
        if example.get("source") is not None:
            return int(example["source"])
        index = source_of_file(example.get("__url__"), self.sources)
        if index is None and len(self.sources) > 1:
            logger.error(
                "rank %d: a broken file of an unknown source is counted under %r.", self.rank, self.sources[0].name
            )
        return index or 0

    def _where(self, index: int) -> str:
        return f" of source {self.sources[index].name!r}" if len(self.sources) > 1 else ""

    def _image(self, data: bytes | bytearray, key: str, generator: torch.Generator) -> torch.Tensor | DeviceJpeg:
        image = self.device_jpegs(data, key, generator) if self.device_jpegs is not None else None
        return image if image is not None else self.image_transform(load_image_bytes(data, name=key), generator)

    def _collate(
        self, images: list[torch.Tensor | DeviceJpeg], captions: list[str], skipped: list[Counter[str]]
    ) -> dict[str, torch.Tensor]:
        text, truncated = tokenize_captions(self.tokenizer, captions)
        if self.device_jpegs is None:
            pixels = {"pixel_values": torch.stack(cast(list[torch.Tensor], images))}
        else:
            pixels = self.device_jpegs.collate(images)
        return {
            **pixels,
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "skipped": self._counts(skipped),
            "truncated_captions": torch.tensor(truncated),
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
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], Counter[str]]:
    """This rank's share of a labelled evaluation split as (pixel_values, labels) batches (eval preprocessing), and
    the counts of the samples skipped (`SampleDecoder`, as in training). `max_samples` bounds the whole split."""
    source = open_source(spec)
    if source.spec.label_column is None:
        raise ValueError("zero-shot evaluation needs a label column (eval_label_column).")
    dataset = source.dataset if max_samples is None else source.dataset.take(max_samples)
    dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    decoder = SampleDecoder(source.spec.image_column, label_column=source.spec.label_column, skip_log=SkipLog(rank))
    batches, images, labels = [], [], []
    skipped: Counter[str] = Counter()
    for example in guarded(dataset, spec.data_files):
        sample = decoder(example, skipped, lambda data, key: load_image_bytes(data, name=key))
        if sample is None:
            continue
        images.append(sample.image)
        labels.append(cast(int, sample.label))
        if len(images) == batch_size:
            batches.append((image_processor(images=images, return_tensors="pt")["pixel_values"], torch.tensor(labels)))
            images, labels = [], []
    if images:
        batches.append((image_processor(images=images, return_tensors="pt")["pixel_values"], torch.tensor(labels)))
    return batches, skipped
