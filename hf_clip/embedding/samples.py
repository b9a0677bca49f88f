"""The embedding job's input: the data cut into numbered parts, each read, decoded and preprocessed sample by sample
with skip-and-count, as batches that never cross a part boundary.

Parts are fixed by the data alone, so any number of processes produce the same parts:

- formats cut by file (`hf_clip.data.formats`: webdataset, parquet, csv): one part per shard of the `datasets`
  stream, that is per input file, in sorted path order (a process reads only its own files);
- formats cut by rows (imagefolder, arrow): `part_size` consecutive images of the stream. Every worker walks the
  stream, which costs little because an imagefolder example is a path and an arrow folder is memory-mapped: only a
  worker's own images are decoded.

Part `n` belongs to process `n % world_size`, and within a process to DataLoader worker
`(n // world_size) % num_workers`: a worker decodes whole parts, so a process decodes in parallel only when it has
several parts. Since a batch never mixes parts, its contents, and so its embeddings, are the same whatever the
number of processes or workers.
"""

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import groupby
from pathlib import Path
from typing import Any

import datasets
import torch

from ..data.archives import guarded, is_broken
from ..data.formats import DataSpec, Source, open_source
from ..data.samples import SKIP_REASONS, SampleDecoder, SkipLog

logger = logging.getLogger(__name__)


def _unchanged(batch: Any) -> Any:
    return batch


def open_input(spec: DataSpec, key_column: str | None = None) -> Source:
    """The whole input as one stream (`open_source`), with the key column checked."""
    source = open_source(spec)
    if key_column is not None and key_column not in (source.dataset.features or {}):
        features = list(source.dataset.features or {})
        raise ValueError(f"key column {key_column!r} is not in the data; it has {features}.")
    return source


def count_parts(spec: DataSpec, key_column: str | None = None) -> int | None:
    """The number of parts of input cut by file (its shards: one per file); `None` for input cut by rows, whose
    parts are known only once its stream has been read. Opening the input checks its columns."""
    source = open_input(spec, key_column)
    return source.dataset.num_shards if spec.format.parts == "files" else None


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
        self.decoder = SampleDecoder(
            spec.image_column if preprocess is not None else None,
            spec.text_column,
            caption_required=embed_texts,
            skip_log=self.skip_log,
        )

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
        dataset = open_input(self.spec, self.key_column).dataset
        if self.spec.format.parts == "files":
            by_file = dataset.num_shards == len(self.spec.data_files)
            for number in range(dataset.num_shards):
                name = Path(self.spec.data_files[number]).name if by_file else f"shard-{number}"
                # Read only when iterated, so a process reads only its own files.
                shard = dataset.shard(num_shards=dataset.num_shards, index=number, contiguous=True)
                yield number, name, self._examples(shard)
            return
        folder = Path(self.spec.data_files[0]).name
        positions = enumerate(self._examples(dataset))
        for number, group in groupby(positions, key=lambda item: item[0] // self.part_size):
            yield number, folder, (example for _, example in group)

    def _examples(self, stream: datasets.IterableDataset) -> Iterator[Any]:
        """The stream's examples, guarded (`hf_clip.data.archives`): a file that breaks gives a marker."""
        # `dataset.iter`, not `iter(dataset)`: inside a DataLoader worker the latter hands each worker a share of the
        # stream's shards, and parts are already split across workers here. Batches of one keep the examples read
        # before a break.
        examples = ({column: values[0] for column, values in batch.items()} for batch in stream.iter(batch_size=1))
        return guarded(examples, self.spec.data_files)

    def _batches(self, number: int, source: str, examples: Iterator[Any]) -> Iterator[dict[str, Any]]:
        skipped: Counter[str] = Counter()
        keys: list[str] = []
        captions: list[str | None] = []
        pixels: list[torch.Tensor] = []
        read = 0
        for example in examples:
            fallback_key = f"{source}:{read}"
            read += not is_broken(example)  # a marker is no example of the data
            sample = self.decoder(example, skipped, self.preprocess, fallback_key)
            if sample is None:
                continue
            keys.append(str(example.get(self.key_column)) if self.key_column is not None else sample.key)
            captions.append(sample.caption)
            if sample.image is not None:
                pixels.append(sample.image)
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
