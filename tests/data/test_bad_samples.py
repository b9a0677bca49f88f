"""One bad sample costs one counted skip, one broken shard the rest of that shard (issue: nothing lost): webdataset
shards with a caption that is not UTF-8, a zero-byte image, a missing member, cut inside a member and cut between
members; each read by the training stream and by the embedding job, with the skip counts asserted."""

import functools
import io
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from hf_clip import HfClipImageProcessor, train_clip_bpe
from hf_clip.data.fast_preprocessing import FastClipImagePreprocessor
from hf_clip.data.formats import DataSpec, open_source
from hf_clip.data.samples import SKIP_REASONS
from hf_clip.data.streams import ClipBatches, random_crop
from hf_clip.embedding.job import EmbedConfig, embed_dataset
from hf_clip.testing_utils import (
    TINY_IMAGE_SIZE,
    save_tiny_clip_folder,
)

PER_SHARD = 10
PROCESSOR = HfClipImageProcessor(
    size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
)


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 20, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, content in members:
            member = tarfile.TarInfo(name)
            member.size = len(content)
            tar.addfile(member, io.BytesIO(content))
    return path


def clean_members(shard: int) -> list[tuple[str, bytes]]:
    members = []
    for index in range(PER_SHARD):
        key = f"s{shard}-{index:02d}"
        members += [(f"{key}.jpg", jpeg(100 * shard + index)), (f"{key}.txt", f"picture {shard} {index}".encode())]
    return members


@pytest.fixture
def shards(tmp_path) -> dict[str, Path]:
    """Shard 0 holds one bad sample of each kind; shard 1 is clean; shard 2 is cut inside a member's data; shard 3
    is cut between two members (no end-of-archive blocks); shard 4 is clean again."""
    bad = clean_members(0)
    bad[1] = ("s0-00.txt", "caf\xe9".encode("latin-1"))  # not UTF-8
    bad[2] = ("s0-01.jpg", b"")  # a zero-byte image
    del bad[5]  # s0-02 has no caption
    paths = {"bad": write_shard(tmp_path / "shard-0.tar", bad)}
    paths["clean"] = write_shard(tmp_path / "shard-1.tar", clean_members(1))
    cut = write_shard(tmp_path / "shard-2.tar", clean_members(2))
    with tarfile.open(cut) as tar:
        member = tar.getmember("s2-04.jpg")
    cut.write_bytes(cut.read_bytes()[: member.offset_data + member.size // 2])
    paths["cut_inside"] = cut
    boundary = write_shard(tmp_path / "shard-3.tar", clean_members(3))
    with tarfile.open(boundary) as tar:
        member = tar.getmember("s3-06.jpg")
    boundary.write_bytes(boundary.read_bytes()[: member.offset])  # ends just before s3-06's header
    paths["cut_between"] = boundary
    paths["clean_after"] = write_shard(tmp_path / "shard-4.tar", clean_members(4))
    return paths


def training_pass(files: list[Path]) -> tuple[list[str], dict[str, int]]:
    """The captions of one unshuffled epoch of the training stream, and its skip counts by reason."""
    captions = [f"picture {shard} {index}" for shard in range(5) for index in range(PER_SHARD)]
    tokenizer = train_clip_bpe(captions * 3, vocab_size=600)
    batches = ClipBatches(
        [DataSpec("webdataset", [str(path) for path in files], "jpg", "txt")],
        image_transform=functools.partial(random_crop, FastClipImagePreprocessor(PROCESSOR)),
        tokenizer=tokenizer,
        batch_size=2,
        seed=0,
        rank=0,
        world_size=1,
        shuffle_buffer=0,
    )
    texts, skipped = [], torch.zeros(1, len(SKIP_REASONS), dtype=torch.int64)
    for batch in batches:
        skipped += batch["skipped"]
        if "input_ids" in batch:
            texts += tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    return texts, dict(zip(SKIP_REASONS, skipped[0].tolist(), strict=True))


def test_each_bad_sample_is_one_counted_skip_and_the_shard_goes_on(shards, caplog, tmp_path, monkeypatch):
    # A file named like the zero-byte member in the working directory must not be read in its place.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s0-01.jpg").write_bytes(jpeg(7))
    with caplog.at_level(logging.WARNING):
        texts, skipped = training_pass([shards["bad"], shards["clean"]])
    assert skipped == {"bad_image": 1, "empty_caption": 0, "missing_field": 1, "broken_shard": 0, "bad_caption": 1}
    # 20 samples, 3 skipped: 17 usable, 8 batches of 2 (one left over); all the samples after the bad ones train.
    assert len(texts) == 16 and "picture 0 9" in texts and "picture 1 0" in texts
    for key, reason in (("s0-00", "bad_caption"), ("s0-01", "bad_image"), ("s0-02", "missing_field")):
        assert f"skipped sample {key} ({reason})" in caplog.text
    assert "zero bytes" in caplog.text


@pytest.mark.parametrize(("name", "kept"), [("cut_inside", 4), ("cut_between", 6)])
def test_a_cut_shard_keeps_its_samples_before_the_cut_and_the_next_shard(shards, caplog, name, kept):
    with caplog.at_level(logging.ERROR):
        texts, skipped = training_pass([shards[name], shards["clean_after"]])
    assert skipped["broken_shard"] == 1 and sum(skipped.values()) == 1
    shard = 2 if name == "cut_inside" else 3
    assert sorted(text for text in texts if text.startswith(f"picture {shard}")) == sorted(
        f"picture {shard} {index}" for index in range(kept)
    )
    assert sum(text.startswith("picture 4") for text in texts) == PER_SHARD  # the next shard is read whole
    assert str(shards[name]) in caplog.text and "broke" in caplog.text


def test_a_complete_archive_is_not_taken_for_a_cut_one(shards):
    rows = list(open_source(DataSpec("webdataset", [str(shards["clean"])], "jpg", "txt")).dataset)
    assert len(rows) == PER_SHARD and not any(row["__broken__"] for row in rows)
    assert os.path.getsize(shards["clean"]) % 512 == 0


def test_the_embedding_job_counts_the_same_skips(shards, tmp_path):
    model = tmp_path / "model"
    save_tiny_clip_folder(model)
    files = [shards[name] for name in ("bad", "clean", "cut_inside", "cut_between")]
    config = EmbedConfig(
        model=str(model),
        data_format="webdataset",
        data_files=[str(path) for path in files],
        output_dir=str(tmp_path / "out"),
        embed=["image", "text"],
        text_column="txt",
        batch_size=4,
        num_workers=0,
    )
    summary = embed_dataset(config)
    assert summary["skipped"] == {
        "bad_image": 1,
        "empty_caption": 0,
        "missing_field": 1,
        "broken_shard": 2,
        "bad_caption": 1,
    }
    assert summary["samples"] == (PER_SHARD - 3) + PER_SHARD + 4 + 6


def test_a_caption_column_that_is_not_text_is_named(tmp_path):
    import datasets

    path = tmp_path / "numbers.parquet"
    datasets.Dataset.from_dict({"image": [jpeg(1)], "caption": [7]}).to_parquet(path)
    with pytest.raises(ValueError, match=r"caption column 'caption' holds .*int64.*, not text"):
        open_source(DataSpec("parquet", [str(path)], "image", "caption"), need_text=True)


def test_a_sample_without_key_or_path_is_named_by_its_place(tmp_path, caplog):
    import datasets

    path = tmp_path / "rows.parquet"
    rows = {"image": [jpeg(1), b"not a png", jpeg(2)], "caption": ["a", "b", "c"]}
    datasets.Dataset.from_dict(rows).to_parquet(path)
    batches = ClipBatches(
        [DataSpec("parquet", [str(path)], "image", "caption")],
        image_transform=functools.partial(random_crop, FastClipImagePreprocessor(PROCESSOR)),
        tokenizer=train_clip_bpe(["a", "b", "c"] * 10, vocab_size=600),
        batch_size=2,
        seed=0,
        rank=0,
        world_size=1,
        shuffle_buffer=0,
    )
    with caplog.at_level(logging.WARNING):
        records = list(batches)
    assert sum(int(record["skipped"][0, SKIP_REASONS.index("bad_image")]) for record in records) == 1
    assert "skipped sample #2 of worker 0's epoch-0 stream (bad_image)" in caplog.text
