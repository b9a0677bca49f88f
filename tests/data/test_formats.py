"""The format table (hf_clip.data.formats) through its three users: the two formats it gained — a `save_to_disk`
folder (arrow) and CSV/TSV files of image paths and captions — train, evaluate and embed from real files, with the
same samples as the webdataset they are made from."""

import csv
import functools
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from datasets import ClassLabel, Dataset, Features, Image, Value

from hf_clip import HfClipImageProcessor, train_clip_bpe
from hf_clip.data.fast_preprocessing import FastClipImagePreprocessor
from hf_clip.data.formats import FORMATS, DataSpec, load_split, open_source, resolve_files
from hf_clip.data.streams import ClipBatches, random_crop
from hf_clip.embedding.job import EmbedConfig, embed_dataset
from hf_clip.embedding.layout import load_embeddings
from hf_clip.evaluation.runner import EvalConfig, evaluate_model
from hf_clip.testing_utils import (
    TINY_IMAGE_SIZE,
    random_images,
    save_tiny_clip_folder,
    tiny_clip_tokenizer,
    tiny_config,
)
from hf_clip.training.loop import main

CLASSES = ["red", "green", "blue"]
ROWS = 12


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """The same 12 captioned, labelled images as a webdataset shard, an arrow folder, a TSV and a CSV."""
    root = tmp_path_factory.mktemp("formats")
    images = random_images(ROWS, seed=3, size=(40, 36))
    captions = [f"a {CLASSES[index % 3]} square number {index}" for index in range(ROWS)]
    labels = [index % 3 for index in range(ROWS)]
    with tarfile.open(root / "shard.tar", "w") as tar:
        for index in range(ROWS):
            fields = {"png": png(images[index]), "txt": captions[index].encode(), "cls": str(labels[index]).encode()}
            for extension, content in fields.items():
                member = tarfile.TarInfo(f"{index:04d}.{extension}")
                member.size = len(content)
                tar.addfile(member, io.BytesIO(content))
    features = Features({"image": Image(), "caption": Value("string"), "label": ClassLabel(names=CLASSES)})
    rows = {"image": images, "caption": captions, "label": labels}
    Dataset.from_dict(rows, features=features).save_to_disk(str(root / "saved"))
    (root / "images").mkdir()
    for index, image in enumerate(images):
        image.save(root / "images" / f"{index}.png")
    # open_clip's TSV (filepath / title, relative paths), and a CSV with img2dataset's column names.
    with open(root / "pairs.tsv", "w", newline="") as file:
        writer = csv.writer(file, delimiter="\t")
        writer.writerow(["filepath", "title", "label"])
        writer.writerows([f"images/{index}.png", captions[index], labels[index]] for index in range(ROWS))
    with open(root / "pairs.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["url", "caption"])
        writer.writerows([str(root / "images" / f"{index}.png"), captions[index]] for index in range(ROWS))
    return {"root": root, "captions": captions}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    save_tiny_clip_folder(folder)
    return folder


def test_every_format_has_one_table_entry_with_its_defaults():
    assert set(FORMATS) == {"webdataset", "parquet", "imagefolder", "arrow", "csv"}
    assert (FORMATS["csv"].image_column, FORMATS["csv"].text_column) == ("filepath", "title")
    assert FORMATS["arrow"].location == FORMATS["imagefolder"].location == "directory"
    with pytest.raises(ValueError, match="data_format must be one of"):
        _ = DataSpec("tsv", ["x"]).format


def test_files_are_resolved_by_the_format(data, tmp_path):
    root = data["root"]
    assert resolve_files("csv", [str(root / "*.tsv")]) == [str((root / "pairs.tsv").resolve())]
    assert resolve_files("arrow", [str(root / "saved")]) == [str((root / "saved").resolve())]
    with pytest.raises(FileNotFoundError, match=r"the arrow folder .*missing does not exist"):
        resolve_files("arrow", [str(tmp_path / "missing")])
    with pytest.raises(FileNotFoundError, match="no csv files match"):
        resolve_files("csv", [str(tmp_path / "*.csv")])
    with pytest.raises(ValueError, match="imagefolder data is one folder"):
        resolve_files("imagefolder", [str(root), str(root)])


def training_samples(spec: DataSpec) -> list[tuple[str, torch.Tensor]]:
    """Every (caption, pixels) of one epoch of the training stream, in caption order (no shuffle)."""
    size = {"shortest_edge": TINY_IMAGE_SIZE}
    processor = HfClipImageProcessor(size=size, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    tokenizer = tiny_clip_tokenizer()
    batches = ClipBatches(
        [spec],
        image_transform=functools.partial(random_crop, FastClipImagePreprocessor(processor)),
        tokenizer=tokenizer,
        batch_size=4,
        seed=0,
        rank=0,
        world_size=1,
        shuffle_buffer=0,
    )
    samples = []
    for batch in batches:
        if "pixel_values" not in batch:
            continue
        assert not batch["skipped"].any()
        texts = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
        samples += list(zip(texts, batch["pixel_values"], strict=True))
    return sorted(samples, key=lambda sample: sample[0])


def test_arrow_and_csv_train_on_the_same_samples_as_webdataset(data):
    root = data["root"]
    reference = training_samples(
        DataSpec("webdataset", [str(root / "shard.tar")])
    )  # its images: the first Image column
    assert len(reference) == ROWS
    for spec in (
        DataSpec("arrow", resolve_files("arrow", [str(root / "saved")])),
        DataSpec("csv", resolve_files("csv", [str(root / "pairs.tsv")])),
        DataSpec("csv", resolve_files("csv", [str(root / "pairs.csv")]), "url", "caption"),
    ):
        samples = training_samples(spec)
        assert [text for text, _ in samples] == [text for text, _ in reference], spec.data_format
        # The crops differ (each is drawn by the sample's position), but every image is the same picture.
        assert all(pixels.shape == (3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE) for _, pixels in samples)


def test_open_source_fills_the_formats_default_columns(data):
    root = data["root"]
    tsv = open_source(DataSpec("csv", [str(root / "pairs.tsv")]), need_text=True)
    assert (tsv.spec.image_column, tsv.spec.text_column) == ("filepath", "title")
    first = next(iter(tsv.dataset))
    assert first["filepath"]["path"] == str(root / "images" / "0.png") and first["__key__"] == "pairs.tsv:2"
    arrow = open_source(DataSpec("arrow", [str(root / "saved")]), need_text=True)
    assert (arrow.spec.image_column, arrow.spec.text_column) == ("image", "caption")
    with pytest.raises(ValueError, match="column 'photo' is not in"):
        open_source(DataSpec("csv", [str(root / "pairs.tsv")], "photo"))
    with pytest.raises(ValueError, match="caption column 'label' holds"):
        open_source(DataSpec("arrow", [str(root / "saved")], text_column="label"))


def test_the_training_loop_reads_csv_and_evaluates_on_arrow(data, tmp_path):
    root = data["root"]
    (tmp_path / "model.json").write_text(tiny_config().to_json_string())
    train_clip_bpe(data["captions"] * 5, vocab_size=600).save_pretrained(tmp_path / "tokenizer")
    arguments = [
        "--model_config",
        str(tmp_path / "model.json"),
        "--tokenizer_name_or_path",
        str(tmp_path / "tokenizer"),
    ]
    arguments += ["--output_dir", str(tmp_path / "run"), "--train_data_format", "csv"]
    arguments += ["--train_data_files", str(root / "pairs.tsv"), "--per_device_batch_size", "4", "--max_steps", "3"]
    arguments += [
        "--eval_data_format",
        "arrow",
        "--eval_data_files",
        str(root / "saved"),
        "--eval_label_column",
        "label",
    ]
    arguments += ["--class_names", *CLASSES, "--log_with", "none", "--warmup_steps", "0", "--shuffle_buffer", "4"]
    main(arguments)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert '"zero_shot_top1"' in lines[-1] and '"skipped_samples": 0' in lines[-1]
    assert (tmp_path / "run" / "model" / "config.json").is_file()


@pytest.mark.parametrize("data_format", ["arrow", "csv"])
def test_evaluation_reads_the_new_formats_as_the_webdataset(data, model_folder, data_format):
    root = data["root"]
    files = {"arrow": {"data_dir": str(root / "saved")}, "csv": {"data_files": [f"test={root / 'pairs.tsv'}"]}}
    common = {"model": str(model_folder), "tasks": ["zero_shot", "retrieval"], "template_mode": "single"}
    common |= {"classnames_file": None, "batch_size": 5}
    (root / "classes.txt").write_text("\n".join(CLASSES))
    common["classnames_file"] = str(root / "classes.txt")
    reference = evaluate_model(
        EvalConfig(data_format="webdataset", data_files=[f"test={root / 'shard.tar'}"], **common),
        Accelerator(cpu=True),
    )
    split = "train" if data_format == "arrow" else "test"
    config = EvalConfig(data_format=data_format, split=split, caption_column=None, **files[data_format], **common)
    results = evaluate_model(config, Accelerator(cpu=True))
    assert results["dataset"]["num_samples"] == ROWS
    assert results["zero_shot"]["single"]["top1"] == pytest.approx(reference["zero_shot"]["single"]["top1"])
    for key in ("image_to_text_recall@1", "text_to_image_recall@5"):
        assert results["retrieval"][key] == pytest.approx(reference["retrieval"][key])
    assert (
        load_split(
            data_format,
            resolve_files(data_format, [str(root / ("saved" if split == "train" else "pairs.tsv"))]),
            split,
        ).num_rows
        == ROWS
    )


@pytest.mark.parametrize(("data_format", "files"), [("arrow", ["saved"]), ("csv", ["pairs.tsv"])])
def test_the_embedding_job_embeds_the_new_formats_as_the_webdataset(data, model_folder, tmp_path, data_format, files):
    root = data["root"]

    def embedded(fmt: str, data_files: list[str], output: str, **columns) -> tuple[np.ndarray, list[str]]:
        config = EmbedConfig(
            model=str(model_folder),
            data_format=fmt,
            data_files=[str(root / name) for name in data_files],
            output_dir=str(tmp_path / output),
            embed=["image", "text"],
            batch_size=5,
            num_workers=0,
            part_size=5,
            **columns,
        )
        summary = embed_dataset(config)
        assert summary["samples"] == ROWS and sum(summary["skipped"].values()) == 0
        vectors, metadata = load_embeddings(tmp_path / output, "image")
        captions = metadata.column("caption").to_pylist()
        order = np.argsort(captions)
        return vectors[order], sorted(captions)

    reference, captions = embedded("webdataset", ["shard.tar"], "web", image_column="png", text_column="txt")
    vectors, new_captions = embedded(data_format, files, data_format, text_column=FORMATS[data_format].text_column)
    assert new_captions == captions == sorted(data["captions"])
    np.testing.assert_array_equal(vectors, reference)
    if data_format == "arrow":  # cut by rows: 12 rows in parts of 5
        assert sorted(path.name for path in (tmp_path / "arrow" / "img_emb").iterdir()) == [
            f"img_emb_{part:06d}.npy" for part in range(3)
        ]
