"""The embedding job's input: the data cut into numbered parts, each read, decoded and preprocessed sample by sample
with skip-and-count, as batches that never cross a part boundary.

Parts are fixed by the data alone, so any number of processes produce the same parts:

- webdataset and parquet: one part per shard of the `datasets` stream, that is per input file, in sorted path
  order (a process reads only its own files);
- imagefolder: `part_size` consecutive images of the folder's stream. Every worker walks the stream, which costs
  little because an imagefolder example is a path: only a worker's own images are opened.

Part `n` belongs to process `n % world_size`, and within a process to DataLoader worker
`(n // world_size) % num_workers`: a worker decodes whole parts, so a process decodes in parallel only when it has
several parts. Since a batch never mixes parts, its contents, and so its embeddings, are the same whatever the
number of processes or workers.
"""

import glob
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import groupby
from pathlib import Path
from typing import Any

import datasets
import PIL.Image
import torch

from ..data.streams import SKIP_REASONS, DataSpec, SkipLog, image_bytes, load_stream

logger = logging.getLogger(__name__)

BROKEN_STREAM = object()  # stands in for the examples a broken archive did not deliver


def resolve_data_files(data_format: str, data_files: list[str]) -> list[str]:
    """The imagefolder's directory, or the sorted, de-duplicated files the webdataset / parquet globs match."""
    if data_format == "imagefolder":
        if len(data_files) != 1 or not Path(data_files[0]).is_dir():
            raise ValueError(f"imagefolder data is one directory; got {data_files}.")
        return [str(Path(data_files[0]).resolve())]
    files: set[str] = set()
    for pattern in data_files:
        matches = glob.glob(pattern)
        if not matches:
            raise FileNotFoundError(f"no {data_format} files match {pattern!r}.")
        files.update(str(Path(match).resolve()) for match in matches)
    return sorted(files)


def sample_key(example: dict[str, Any], image_column: str, key_column: str | None, fallback: str) -> str:
    """The sample's key: `key_column`, else the webdataset key, else the image's path, else `fallback`."""
    if key_column is not None:
        return str(example.get(key_column))
    if example.get("__key__"):
        return str(example["__key__"])
    image = example.get(image_column)
    if isinstance(image, dict) and image.get("path"):
        return str(image["path"])
    return fallback


def _unchanged(batch: Any) -> Any:
    return batch


class SkippedSample(Exception):
    """A sample that cannot be embedded, with its `SKIP_REASONS` reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def open_input(spec: DataSpec, key_column: str | None = None) -> datasets.IterableDataset:
    """The whole input as one stream (`load_stream`), with the key column checked."""
    dataset = load_stream(spec)
    if key_column is not None and key_column not in (dataset.features or {}):
        raise ValueError(f"key column {key_column!r} is not in the data; it has {list(dataset.features or {})}.")
    return dataset


def count_parts(spec: DataSpec, key_column: str | None = None) -> int | None:
    """The number of parts of webdataset or parquet input (its shards: one per file); `None` for an imagefolder,
    whose parts are known only once its stream has been read. Opening the input checks its columns."""
    dataset = open_input(spec, key_column)
    return None if spec.data_format == "imagefolder" else dataset.num_shards


class PartBatches(torch.utils.data.IterableDataset):
    """This process's unfinished parts as batches of `{"part", "keys", "captions", "pixel_values", "end"}`.

    `pixel_values` is `None` unless images are embedded, `captions` is `None` without a text column. The last batch
    of a part has `end=True` and carries the part's counts: `examples` (stream examples read) and `skipped` (per
    `SKIP_REASONS`); it may hold no samples. Use with `DataLoader(batch_size=None, collate_fn=PartBatches.collate)`.
    """

    collate = staticmethod(_unchanged)

    def __init__(
        self,
        spec: DataSpec,
        preprocess: Callable[..., torch.Tensor] | None,
        embed_texts: bool,
        batch_size: int,
        part_size: int,
        rank: int,
        world_size: int,
        finished: set[int],
        key_column: str | None = None,
    ):
        super().__init__()
        if embed_texts and spec.text_column is None:
            raise ValueError("embedding captions needs a text column.")
        self.spec = spec
        self.preprocess = preprocess
        self.embed_texts = embed_texts
        self.batch_size = batch_size
        self.part_size = part_size
        self.rank = rank
        self.world_size = world_size
        self.finished = finished
        self.key_column = key_column
        self.skip_log = SkipLog(rank)

    def owns(self, number: int, worker_id: int, num_workers: int) -> bool:
        return (
            number % self.world_size == self.rank
            and (number // self.world_size) % num_workers == worker_id
            and number not in self.finished
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        self.skip_log.restart()
        for number, source, examples in self._parts():
            if self.owns(number, worker_id, num_workers):
                yield from self._batches(number, source, examples)

    def _parts(self) -> Iterator[tuple[int, str, Iterator[Any]]]:
        """`(part number, source name, its examples)`, lazily: a part nobody iterates costs nothing to skip."""
        dataset = open_input(self.spec, self.key_column)
        if self.spec.data_format != "imagefolder":
            by_file = dataset.num_shards == len(self.spec.data_files)
            for number in range(dataset.num_shards):
                name = Path(self.spec.data_files[number]).name if by_file else f"shard-{number}"
                # Read only when iterated, so a process reads only its own files.
                shard = dataset.shard(num_shards=dataset.num_shards, index=number, contiguous=True)
                yield number, name, self._guarded(shard, name)
            return
        folder = Path(self.spec.data_files[0]).name
        positions = enumerate(self._guarded(dataset, folder))
        for number, group in groupby(positions, key=lambda item: item[0] // self.part_size):
            yield number, folder, (example for _, example in group)

    def _guarded(self, stream: datasets.IterableDataset, source: str) -> Iterator[Any]:
        """The stream's examples; a stream that breaks (truncated archive, damaged file) ends with `BROKEN_STREAM`."""
        # `dataset.iter`, not `iter(dataset)`: inside a DataLoader worker the latter hands each worker a share of the
        # stream's shards, and parts are already split across workers here. Batches of one keep the examples read
        # before a break.
        examples = ({column: values[0] for column, values in batch.items()} for batch in stream.iter(batch_size=1))
        while True:
            try:
                example = next(examples)
            except StopIteration:
                return
            except Exception as error:  # tarfile.ReadError, OSError, pyarrow errors from a damaged file
                logger.error("rank %d: %s broke (%s); the rest of it is skipped.", self.rank, source, error)
                yield BROKEN_STREAM
                return
            yield example

    def _batches(self, number: int, source: str, examples: Iterator[Any]) -> Iterator[dict[str, Any]]:
        skipped: Counter[str] = Counter()
        keys: list[str] = []
        captions: list[str | None] = []
        pixels: list[torch.Tensor] = []
        read = 0
        for example in examples:
            if example is BROKEN_STREAM:
                skipped["broken_shard"] += 1
                continue
            key = sample_key(example, self.spec.image_column, self.key_column, f"{source}:{read}")
            read += 1
            try:
                sample = self._sample(example)
            except SkippedSample as skip:
                self.skip_log.skip(skipped, skip.reason, key, str(skip))
                continue
            keys.append(key)
            captions.append(sample[0])
            if sample[1] is not None:
                pixels.append(sample[1])
            if len(keys) == self.batch_size:
                yield self._batch(number, keys, captions, pixels)
                keys, captions, pixels = [], [], []
        last = self._batch(number, keys, captions, pixels)
        last.update(end=True, examples=read, skipped={reason: skipped[reason] for reason in SKIP_REASONS})
        yield last

    def _batch(
        self, number: int, keys: list[str], captions: list[str | None], pixels: list[torch.Tensor]
    ) -> dict[str, Any]:
        return {
            "part": number,
            "keys": keys,
            "captions": captions if self.spec.text_column is not None else None,
            "pixel_values": torch.stack(pixels) if pixels else None,
            "end": False,
        }

    def _sample(self, example: dict[str, Any]) -> tuple[str | None, torch.Tensor | None]:
        """`(caption, pixel_values)` of one example; raises `SkippedSample` when it cannot be embedded."""
        caption = example.get(self.spec.text_column) if self.spec.text_column is not None else None
        if isinstance(caption, str):
            caption = caption.strip()
        if self.embed_texts:
            if caption is None:
                raise SkippedSample("missing_field", "no caption")
            if not isinstance(caption, str) or not caption:
                raise SkippedSample("empty_caption", "empty caption")
        if self.preprocess is None:
            return caption, None
        try:
            data = image_bytes(example.get(self.spec.image_column))  # reads an imagefolder file: may raise
            if data is None:
                raise SkippedSample("missing_field", "no image")
            return caption, self.preprocess(data)
        except (ValueError, OSError, PIL.Image.DecompressionBombError) as error:
            raise SkippedSample("bad_image", str(error)) from error
