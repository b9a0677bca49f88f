"""Several training sources mixed by weight (hf_clip.data.streams.mixed_stream / ClipBatches): formats and columns
of their own, source frequencies that follow the weights, skips counted per source (broken archives included),
determinism per (seed, epoch) and disjoint ranks, per-source counts in DataCursor, and the checks on sources."""

import functools
import json
import logging
import math
import tarfile
from pathlib import Path
from types import SimpleNamespace

import datasets
import PIL.Image
import pytest
import torch

from hf_clip import HfClipImageProcessor, HfClipTokenizer, train_clip_bpe
from hf_clip.data.fast_preprocessing import FastClipImagePreprocessor
from hf_clip.data.formats import DataSpec
from hf_clip.data.samples import SKIP_REASONS
from hf_clip.data.streams import ClipBatches, mixed_stream, random_crop, skip_metrics
from hf_clip.synthetic import jpeg_bytes, write_webdataset_shard
from hf_clip.training.state import DataCursor

PROCESSOR = HfClipImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
COLOURS = [(220, 20, 20), (20, 200, 20), (20, 20, 220), (240, 240, 240)]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def photo(index: int) -> bytes:
    return jpeg_bytes(PIL.Image.new("RGB", (20 + index % 7, 18), COLOURS[index % 4]))


def caption(source: str, index: int) -> str:
    """A caption naming its source and sample (digits as words, so the tokenizer gives them back unchanged)."""
    return f"a {source} picture number {' '.join(WORDS[int(digit)] for digit in str(index))}"


def web_source(
    folder: Path,
    name: str,
    rows: list[tuple[bytes, str | None]],
    shards: int = 1,
    columns: tuple[str, str] = ("jpg", "txt"),
) -> DataSpec:
    """A webdataset source of `rows` (image, caption; None: no caption file) in `shards` tar files."""
    image_column, text_column = columns
    paths = []
    for shard in range(shards):
        path = folder / f"{name}-{shard}.tar"
        samples = []
        for index in range(shard, len(rows), shards):
            image, text = rows[index]
            samples.append(
                (f"{name}{index:05d}", {image_column: image, **({text_column: text.encode()} if text else {})})
            )
        write_webdataset_shard(path, samples)
        paths.append(str(path))
    return DataSpec("webdataset", paths, image_column, text_column, name=name)


def table_source(folder: Path, name: str, rows: list[tuple[bytes, str | None]], files: int = 1) -> DataSpec:
    """A parquet source (raw bytes in `picture`, captions in `text`) of `rows` in `files` files. (Keep parquet out
    of tests that read many passes: `datasets` ends every pass over a mixture with a parquet source in a 5 s sleep.)"""
    paths = []
    for part in range(files):
        path = folder / f"{name}-{part}.parquet"
        chunk = rows[part::files]
        columns = {"picture": [image for image, _ in chunk], "text": [text for _, text in chunk]}
        datasets.Dataset.from_dict(columns).to_parquet(path)
        paths.append(str(path))
    return DataSpec("parquet", paths, "picture", "text", name=name)


def clean_rows(name: str, count: int) -> list[tuple[bytes, str | None]]:
    return [(photo(i), caption(name, i)) for i in range(count)]


@pytest.fixture(scope="module")
def tokenizer() -> HfClipTokenizer:
    texts = [caption(name, i) for name in ("web", "table", "clean", "damaged", "archive") for i in range(100)]
    return train_clip_bpe(texts, vocab_size=600, min_frequency=1)


def clip_batches(sources: list[DataSpec], tokenizer, batch_size: int = 4, rank: int = 0, world_size: int = 1):
    return ClipBatches(
        sources,
        image_transform=functools.partial(random_crop, FastClipImagePreprocessor(PROCESSOR)),
        tokenizer=tokenizer,
        batch_size=batch_size,
        seed=7,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=8,
    )


def drain(batches: ClipBatches) -> tuple[list[dict], torch.Tensor]:
    """One pass: the full batches, and the skip counts (sources × reasons) of the whole pass."""
    records = list(batches)
    return [record for record in records if "input_ids" in record], sum(record["skipped"] for record in records)


def captions_of(batches: list[dict], tokenizer) -> list[str]:
    decoded = [
        tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
        for batch in batches
        if "input_ids" in batch
    ]
    return [text for texts in decoded for text in texts]


def test_two_formats_with_their_own_columns_train_together(tmp_path, tokenizer):
    sources = [
        web_source(tmp_path, "web", clean_rows("web", 12)),
        table_source(tmp_path, "table", clean_rows("table", 10)),
    ]
    taken, skipped = drain(clip_batches(sources, tokenizer))
    assert all(batch["pixel_values"].shape == (4, 3, 16, 16) for batch in taken)
    assert skipped.shape == (2, len(SKIP_REASONS)) and skipped.dtype == torch.int64 and not skipped.any()
    texts = captions_of(taken, tokenizer)
    # Every sample of both sources is read at least once (the one that runs out first starts over).
    read = {text.strip() for text in texts}
    expected = {caption("web", i) for i in range(12)} | {caption("table", i) for i in range(10)}
    assert len(expected - read) < 4  # at most the dropped partial batch's
    assert read <= expected


def test_source_frequencies_follow_the_weights(tmp_path):
    """Weights 3:1 over sources of 1,500 and 500 samples: the mixed stream ends when both are read (about 2,000
    samples); the share of the first source is 3/4 within 4 binomial standard deviations."""
    junk = b"not decoded here"
    sources = [
        web_source(tmp_path, "many", [(junk, f"row {i}") for i in range(1500)]),
        web_source(tmp_path, "few", [(junk, f"row {i}") for i in range(500)], columns=("png", "text")),
    ]
    sources[0].weight, sources[1].weight = 3.0, 1.0
    drawn = [example["source"] for example in mixed_stream(sources, seed=0, shuffle_buffer=0)]
    total, first = len(drawn), drawn.count(0)
    assert total >= 2000 - 4 * math.sqrt(2000)
    sigma = math.sqrt(total * 0.75 * 0.25)
    assert abs(first - 0.75 * total) < 4 * sigma, (first, total)
    # Equal weights give another mixture: the weights are what sets it.
    sources[0].weight = 1.0
    equal = [example["source"] for example in mixed_stream(sources, seed=0, shuffle_buffer=0)]
    assert abs(equal.count(0) / len(equal) - 0.75) > 0.1


def test_skips_are_counted_under_their_source(tmp_path, tokenizer):
    rows = clean_rows("damaged", 24)
    rows[3] = (b"this is not an image", rows[3][1])
    rows[7] = (rows[7][0][: len(rows[7][0]) // 2], rows[7][1])  # truncated JPEG
    rows[11] = (rows[11][0], " ")
    rows[15] = (rows[15][0], None)
    # The clean source is small: it starts over until the damaged one has been read, once.
    sources = [
        web_source(tmp_path, "clean", clean_rows("clean", 6)),
        web_source(tmp_path, "damaged", rows, columns=("jpeg", "text")),
    ]
    taken, skipped = drain(clip_batches(sources, tokenizer))
    assert taken
    assert skipped.tolist() == [[0, 0, 0, 0, 0], [2, 1, 1, 0, 0]]
    metrics = skip_metrics(skipped, sources)
    assert metrics["skipped_samples"] == 4 and metrics["skipped/bad_image"] == 2
    assert metrics["skipped/damaged/bad_image"] == 2 and metrics["skipped/damaged/empty_caption"] == 1
    assert metrics["skipped/damaged/missing_field"] == 1 and metrics["skipped/clean/bad_image"] == 0
    assert len(metrics) == 1 + 3 * len(SKIP_REASONS)
    # One source: the totals only, as before sources were mixed.
    assert skip_metrics(skipped[1:], sources[1:]) == {
        "skipped_samples": 4,
        **{f"skipped/{reason}": n for reason, n in zip(SKIP_REASONS, [2, 1, 1, 0, 0], strict=True)},
    }


def test_a_broken_archive_is_counted_under_its_source(tmp_path, tokenizer, caplog):
    whole = web_source(tmp_path, "archive", clean_rows("archive", 40))
    path = Path(whole.data_files[0])
    with tarfile.open(path) as tar:
        member = tar.getmembers()[50]  # the image of sample 25
    path.write_bytes(path.read_bytes()[: member.offset_data + member.size // 2])  # cut inside its data
    sources = [table_source(tmp_path, "table", clean_rows("table", 30)), whole]
    with caplog.at_level(logging.ERROR, logger="hf_clip.data.streams"):
        taken, skipped = drain(clip_batches(sources, tokenizer))
    assert len(taken) >= 4  # the samples read before the break still train
    assert skipped[:, SKIP_REASONS.index("broken_shard")].tolist() == [0, 1]
    assert "source 'archive'" in caplog.text and str(path) in caplog.text


def test_mixed_stream_is_deterministic_per_epoch_and_ranks_are_disjoint(tmp_path, tokenizer):
    sources = [
        web_source(tmp_path, "web", clean_rows("web", 16), shards=2),
        web_source(tmp_path, "table", clean_rows("table", 12), shards=2, columns=("png", "text")),
    ]
    sources[0].weight = 2.0
    first, again = clip_batches(sources, tokenizer), clip_batches(sources, tokenizer)
    epoch0 = list(first)
    for a, b in zip(epoch0, again, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    first.set_epoch(1)
    epoch1 = list(first)
    assert captions_of(epoch1, tokenizer) != captions_of(epoch0, tokenizer)
    replay = clip_batches(sources, tokenizer)
    replay.set_epoch(1)
    for a, b in zip(epoch1, replay, strict=True):
        assert all(torch.equal(a[name], b[name]) for name in a)
    # Two shards per source: each rank reads its own shards of both sources.
    rank0, rank1 = (set(captions_of(list(clip_batches(sources, tokenizer, 2, r, 2)), tokenizer)) for r in (0, 1))
    assert rank0 and rank1 and not rank0 & rank1
    assert {text.split()[1] for text in rank0} == {text.split()[1] for text in rank1} == {"web", "table"}


def test_data_cursor_keeps_counts_per_source():
    counts = [torch.tensor([[1, 0, 0, 0, 0], [0, 2, 0, 0, 0]]), torch.tensor([[0, 0, 0, 1, 0], [3, 0, 0, 0, 0]])]
    nothing = torch.zeros(2, len(SKIP_REASONS), dtype=torch.int64)
    records = [{"input_ids": 1, "skipped": counts[0]}, {"skipped": counts[1]}, {"input_ids": 2, "skipped": nothing}]
    cursor = DataCursor(num_sources=2)
    stream = cursor.stream(SimpleNamespace(set_epoch=lambda epoch: None), records, rank=0)
    assert [next(stream), next(stream)] == [{"input_ids": 1}, {"input_ids": 2}]  # the skip-only record counts too
    assert cursor.skipped.tolist() == [[1, 0, 0, 1, 0], [3, 2, 0, 0, 0]] and cursor.batches_in_epoch == 3
    state = json.loads(json.dumps(cursor.state()))
    skipped = [[1, 0, 0, 1, 0], [3, 2, 0, 0, 0]]
    assert state == {"epoch": 0, "batches_in_epoch": 3, "skipped": skipped, "truncated_captions": 0}
    restored = DataCursor(**state, num_sources=2)
    assert torch.equal(restored.skipped, cursor.skipped) and restored.batches_in_epoch == 3
    with pytest.raises(ValueError, match="resume with the sources"):
        DataCursor(**state, num_sources=3)
    # A flat row of an older checkpoint, written before bad_caption was counted.
    assert DataCursor(skipped=[4, 0, 1, 0], num_sources=1).skipped.tolist() == [[4, 0, 1, 0, 0]]
    assert DataCursor(num_sources=3).skipped.tolist() == [[0] * len(SKIP_REASONS)] * 3


@pytest.mark.parametrize(
    "change, message",
    [
        ({"name": ""}, "non-empty"),
        ({"name": "a/b"}, "without '/'"),
        ({"name": "web"}, r"unique; \['web'\]"),
        ({"weight": 0.0}, "'table': weight must be positive and finite, got 0.0"),
        ({"weight": -1.0}, "positive and finite"),
        ({"weight": float("inf")}, "positive and finite"),
        ({"weight": float("nan")}, "positive and finite"),
        ({"data_format": "tsv"}, "'table': data_format must be one of"),
        ({"image_column": "photo"}, r"source 'table': columns \['photo'\] are not in the data"),
    ],
)
def test_bad_sources_are_rejected(tmp_path, tokenizer, change, message):
    sources = [
        web_source(tmp_path, "web", clean_rows("web", 2)),
        table_source(tmp_path, "table", clean_rows("table", 2)),
    ]
    for field, value in change.items():
        setattr(sources[1], field, value)
    with pytest.raises(ValueError, match=message):
        clip_batches(sources, tokenizer)


def test_no_sources_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="no training sources"):
        clip_batches([], tokenizer)
