"""hf_clip.embedding.job: clip-retrieval's layout with skip counts, 2 processes under `accelerate launch` equal to one,
resume after a kill without redoing finished parts, and transformers' CLIPModel folders with parquet input."""

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset

from hf_clip import HfClipImageProcessor, HfClipModel
from hf_clip.embedding import job
from hf_clip.embedding.job import EmbedConfig, embed_dataset
from hf_clip.embedding.layout import embedding_path, finished_parts, load_embeddings, metadata_path
from hf_clip.image_processing_hf_clip import load_image_bytes
from hf_clip.testing_utils import (
    TINY_IMAGE_SIZE,
    random_images,
    tiny_clip_tokenizer,
    tiny_config,
    tiny_image_processor,
    tiny_models,
    two_cpu_processes_launch,
)
from hf_clip.zero_shot import encode_images, encode_texts

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PER_SHARD = 5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is faster on a shared CPU, and the same thread count as the launched processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    HfClipModel(tiny_config()).save_pretrained(folder)
    tiny_clip_tokenizer().save_pretrained(folder)
    size = {"shortest_edge": TINY_IMAGE_SIZE}
    HfClipImageProcessor(size=size, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}).save_pretrained(
        folder
    )
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    """Three shards of five samples: one undecodable image, one empty caption, and a third shard cut inside its third
    sample. `kept` holds the samples the job must embed: (JPEG bytes, caption) by key."""
    folder = tmp_path_factory.mktemp("shards")
    images = random_images(3 * PER_SHARD, seed=1, size=(48, 40))
    paths, kept = [], {}
    for shard in range(3):
        path = folder / f"shard-{shard}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(PER_SHARD):
                number = shard * PER_SHARD + index
                key, caption, data = f"s{number:03d}", f"sample number {number}", jpeg(images[number])
                if number == 2:
                    data = b"not an image"
                elif number == 6:
                    caption = "  "
                else:
                    kept[key] = (data, caption)
                for suffix, content in (("jpg", data), ("txt", caption.encode())):
                    member = tarfile.TarInfo(f"{key}.{suffix}")
                    member.size = len(content)
                    tar.addfile(member, io.BytesIO(content))
        paths.append(str(path))
    with tarfile.open(paths[2]) as tar:  # cut inside s012's image: tarfile raises, the stream breaks there
        member = tar.getmember("s012.jpg")
    broken = Path(paths[2])
    broken.write_bytes(broken.read_bytes()[: member.offset_data + member.size // 2])
    return {"files": paths, "kept": {key: value for key, value in kept.items() if key < "s012"}}


def shard_config(model_folder: Path, shards: dict, output_dir: Path, **overrides) -> EmbedConfig:
    settings = {
        "model": str(model_folder),
        "data_format": "webdataset",
        "data_files": [str(Path(shards["files"][0]).parent / "shard-*.tar")],
        "output_dir": str(output_dir),
        "embed": ["image", "text"],
        "text_column": "txt",
        "batch_size": 2,
        "num_workers": 2,
        **overrides,
    }
    return EmbedConfig(**settings)


@pytest.fixture(scope="module")
def single_run(model_folder, shards, tmp_path_factory) -> tuple[Path, dict]:
    output_dir = tmp_path_factory.mktemp("single")
    return output_dir, embed_dataset(shard_config(model_folder, shards, output_dir))


def test_job_writes_clip_retrieval_layout_and_counts_skips(single_run, shards, model_folder):
    output_dir, summary = single_run
    assert finished_parts(output_dir) == [0, 1, 2]
    image_embeds, metadata = load_embeddings(output_dir, "image")
    text_embeds, _ = load_embeddings(output_dir, "text")
    assert np.load(embedding_path(output_dir, "image", 0)).dtype == np.float16
    assert pq.read_table(metadata_path(output_dir, 0)).column_names == ["image_path", "caption"]
    # Every decodable sample with a caption, in stream order; the broken shard gives what precedes the cut.
    keys = metadata.column("image_path").to_pylist()
    assert keys == sorted(shards["kept"])
    assert metadata.column("caption").to_pylist() == [shards["kept"][key][1] for key in keys]

    model = HfClipModel.from_pretrained(model_folder).eval()
    processor = HfClipImageProcessor.from_pretrained(model_folder)
    decoded = [load_image_bytes(shards["kept"][key][0]) for key in keys]
    pixel_values = processor(images=decoded, return_tensors="pt")["pixel_values"]
    expected_images = encode_images(model, pixel_values).numpy()
    expected_texts = encode_texts(model, tiny_clip_tokenizer(), [shards["kept"][key][1] for key in keys]).numpy()
    np.testing.assert_allclose(image_embeds, expected_images, rtol=0, atol=2e-3)  # float16 storage
    np.testing.assert_allclose(text_embeds, expected_texts, rtol=0, atol=2e-3)

    assert json.loads((output_dir / "summary.json").read_text()) == summary
    assert summary["skipped"] == {
        "bad_image": 1,
        "empty_caption": 1,
        "missing_field": 0,
        "broken_shard": 1,
        "bad_caption": 0,
    }
    assert summary["samples"] == len(keys) == 10 and summary["examples"] == len(keys) + 2
    assert summary["this_run"]["parts_embedded"] == 3 and summary["this_run"]["samples"] == len(keys)


def test_two_processes_cover_every_sample_once_and_equal_one_process(single_run, model_folder, shards, tmp_path):
    single_dir, single_summary = single_run
    output_dir = tmp_path / "two"
    config = shard_config(model_folder, shards, output_dir, num_workers=0)
    command = [*two_cpu_processes_launch(), str(EXAMPLES / "embed.py")]
    for name in ("model", "data_format", "output_dir", "text_column", "batch_size", "num_workers"):
        command += [f"--{name}", str(getattr(config, name))]
    command += ["--data_files", *config.data_files, "--embed", *config.embed]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["this_run"]["processes"] == 2
    assert {key: summary[key] for key in ("parts", "examples", "samples", "skipped")} == {
        key: single_summary[key] for key in ("parts", "examples", "samples", "skipped")
    }
    keys = load_embeddings(output_dir)[1].column("image_path").to_pylist()
    assert len(keys) == len(set(keys)) == single_summary["samples"]
    for number in finished_parts(single_dir):
        for modality in ("image", "text"):
            two, one = (np.load(embedding_path(d, modality, number)) for d in (output_dir, single_dir))
            assert np.array_equal(two, one), f"part {number} {modality} differs"
        two_metadata, one_metadata = (pq.read_table(metadata_path(d, number)) for d in (output_dir, single_dir))
        assert two_metadata.equals(one_metadata)


def write_imagefolder(folder: Path, count: int, corrupt: int) -> list[Path]:
    folder.mkdir()
    paths = []
    for index, image in enumerate(random_images(count, seed=2)):
        path = folder / f"photo{index:02d}.jpg"
        path.write_bytes(b"\xff\xd8 a cut-off jpeg" if index == corrupt else jpeg(image))
        paths.append(path)
    return paths


class Killed(BaseException):
    """What a SIGKILL looks like from inside: nothing after it runs."""


def test_resume_after_kill_skips_finished_parts(model_folder, tmp_path, monkeypatch):
    paths = write_imagefolder(tmp_path / "photos", count=11, corrupt=5)
    settings = {"model": str(model_folder), "data_format": "imagefolder", "data_files": [str(tmp_path / "photos")]}
    settings.update(part_size=4, batch_size=3, num_workers=0)
    output_dir = tmp_path / "resumed"
    write_part = job.write_part

    def killed_while_writing_part_1(folder, record, metadata, embeddings):
        if record.number == 1:  # its embeddings reach the disk, its metadata (the "done" mark) never does
            np.save(embedding_path(folder, "image", 1), embeddings["image"])
            raise Killed
        write_part(folder, record, metadata, embeddings)

    monkeypatch.setattr(job, "write_part", killed_while_writing_part_1)
    with pytest.raises(Killed):
        embed_dataset(EmbedConfig(output_dir=str(output_dir), **settings))
    monkeypatch.undo()
    assert finished_parts(output_dir) == [0]
    part_0 = [embedding_path(output_dir, "image", 0), metadata_path(output_dir, 0)]
    written = [(path.stat().st_ino, path.stat().st_mtime_ns) for path in part_0]

    summary = embed_dataset(EmbedConfig(output_dir=str(output_dir), **settings))
    assert summary["this_run"]["parts_already_done"] == 1 and summary["this_run"]["parts_embedded"] == 2
    assert summary["this_run"]["samples"] == 11 - 1 - 4  # part 0 (4 images) is not embedded again
    assert [(path.stat().st_ino, path.stat().st_mtime_ns) for path in part_0] == written
    assert summary["skipped"]["bad_image"] == 1 and summary["examples"] == 11

    uninterrupted = tmp_path / "uninterrupted"
    embed_dataset(EmbedConfig(output_dir=str(uninterrupted), **settings))
    resumed_embeds, resumed_metadata = load_embeddings(output_dir)
    clean_embeds, clean_metadata = load_embeddings(uninterrupted)
    assert np.array_equal(resumed_embeds, clean_embeds) and resumed_metadata.equals(clean_metadata)
    assert resumed_metadata.column("image_path").to_pylist() == [str(p) for i, p in enumerate(paths) if i != 5]

    with pytest.raises(ValueError, match="output_dtype"):
        embed_dataset(EmbedConfig(output_dir=str(output_dir), output_dtype="float32", **settings))


def test_transformers_clip_folder_and_parquet_input(tmp_path):
    _, reference = tiny_models()
    folder = tmp_path / "clip"
    reference.save_pretrained(folder)
    tiny_clip_tokenizer().save_pretrained(folder)
    tiny_image_processor().save_pretrained(folder)
    images = random_images(5, seed=3)
    rows = {"image": [{"bytes": jpeg(image), "path": None} for image in images], "caption": ["a"] * 5}
    rows["image"][1] = {"bytes": None, "path": None}
    Dataset.from_dict(rows).to_parquet(str(tmp_path / "data.parquet"))
    config = EmbedConfig(
        model=str(folder),
        data_format="parquet",
        data_files=[str(tmp_path / "data.parquet")],
        output_dir=str(tmp_path / "out"),
        output_dtype="float32",
        num_workers=0,
    )
    summary = embed_dataset(config)
    assert summary["skipped"]["missing_field"] == 1 and summary["samples"] == 4
    embeds, metadata = load_embeddings(config.output_dir)
    assert metadata.column("image_path").to_pylist() == [f"data.parquet:{i}" for i in (0, 2, 3, 4)]
    kept = [load_image_bytes(rows["image"][i]["bytes"]) for i in (0, 2, 3, 4)]
    pixel_values = tiny_image_processor()(images=kept, return_tensors="pt")["pixel_values"]
    np.testing.assert_allclose(embeds, encode_images(reference, pixel_values).numpy(), rtol=0, atol=1e-6)
