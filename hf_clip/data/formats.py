"""The data formats hf_clip reads, in one table: how each is located, loaded with `datasets`, which columns it holds
by default, and how the embedding job cuts it into parts. Training, evaluation and the embedding job all open data
through `DataSpec` and `open_source` / `load_split`; a new format is one `DataFormat` entry.

- `webdataset`: tar shards of `<key>.<image ext>` + `<key>.txt` (+ `<key>.cls`); captions arrive as bytes and are
  decoded per sample (`hf_clip.data.samples`), so one caption that is not UTF-8 costs one sample, not the shard;
- `parquet`: files with an image column (`{"bytes", "path"}` structs or raw bytes) and caption / label columns;
- `imagefolder`: a folder of images with a `metadata.jsonl` (`file_name` plus caption / label columns), or class
  sub-folders (labels);
- `arrow`: a folder written by `datasets`' `Dataset.save_to_disk` (a `DatasetDict` folder: its splits);
- `csv`: CSV (`.csv`, comma) or TSV (`.tsv`, tab) files of image paths and captions, img2dataset's and open_clip's
  input (open_clip's column names `filepath` / `title` by default); relative paths are relative to the file's folder.
"""

import csv
import glob
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import datasets

from .webdataset import sample_level_webdataset

IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "filepath", "image_path", "file_name")
TEXT_COLUMNS = ("caption", "captions", "txt", "text", "title")
LABEL_COLUMNS = ("label", "cls")


@dataclass(frozen=True)
class DataFormat:
    """How one format is found and read.

    `location`: what `data_files` names (`files`: paths or glob patterns; `directory`: one folder). `parts`: how the
    embedding job cuts it into resumable parts (`files`: one part per file, `rows`: consecutive rows)."""

    name: str
    location: Literal["files", "directory"]
    parts: Literal["files", "rows"]
    image_column: str
    text_column: str
    label_column: str


FORMATS = {
    fmt.name: fmt
    for fmt in (
        DataFormat("webdataset", "files", "files", "jpg", "txt", "cls"),
        DataFormat("parquet", "files", "files", "image", "caption", "label"),
        DataFormat("imagefolder", "directory", "rows", "image", "text", "label"),
        DataFormat("arrow", "directory", "rows", "image", "caption", "label"),
        DataFormat("csv", "files", "files", "filepath", "title", "label"),
    )
}
DataFormatName = Literal["webdataset", "parquet", "imagefolder", "arrow", "csv"]


def data_format(name: str) -> DataFormat:
    if name not in FORMATS:
        raise ValueError(f"data_format must be one of {list(FORMATS)}, got {name!r}.")
    return FORMATS[name]


@dataclass
class DataSpec:
    """Where a split lives and which columns hold what; a training source also has a name (in logs and metrics)
    and a sampling weight (relative to the other sources'). A column left `None` is the format's default where the
    data has it (`open_source`); `text_column` / `label_column` stay `None` when the data has no such column."""

    data_format: str
    data_files: list[str]
    image_column: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    name: str = "train"
    weight: float = 1.0

    @property
    def format(self) -> DataFormat:
        return data_format(self.data_format)


def resolve_files(spec_format: str, patterns: list[str], what: str = "data") -> list[str]:
    """The format's input as absolute paths: one existing folder, or the sorted files the patterns match (each
    pattern must match something)."""
    fmt = data_format(spec_format)
    if not patterns:
        raise ValueError(f"{what}: no data files given.")
    if fmt.location == "directory":
        if len(patterns) != 1:
            raise ValueError(f"{what}: {fmt.name} data is one folder, got {len(patterns)} paths: {patterns}.")
        folder = Path(patterns[0])
        if not folder.is_dir():
            raise FileNotFoundError(f"{what}: the {fmt.name} folder {folder} does not exist (or is not a folder).")
        return [str(folder.resolve())]
    files: set[str] = set()
    for pattern in patterns:
        matches = glob.glob(pattern) or ([pattern] if Path(pattern).is_file() else [])
        if not matches:
            raise FileNotFoundError(f"{what}: no {fmt.name} files match {pattern!r}.")
        files.update(str(Path(match).resolve()) for match in matches if Path(match).is_file())
    return sorted(files)


def _csv_rows(files: list[str], image_column: str) -> Iterator[dict[str, Any]]:
    """Rows of CSV / TSV files, the image column as an undecoded image whose path is absolute."""
    for file in files:
        with open(file, newline="", encoding="utf-8", errors="surrogateescape") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if file.endswith(".tsv") else ",")
            for line, row in enumerate(reader, start=2):
                value = row.get(image_column)
                path = str(Path(file).parent / value) if value else None
                yield {**row, image_column: {"path": path, "bytes": None}, "__key__": f"{Path(file).name}:{line}"}


def _csv_features(files: list[str], image_column: str | None, decode: bool) -> tuple[datasets.Features, str]:
    with open(files[0], newline="", encoding="utf-8", errors="surrogateescape") as handle:
        header = next(csv.reader(handle, delimiter="\t" if files[0].endswith(".tsv") else ","), [])
    column = image_column or FORMATS["csv"].image_column
    if column not in header:
        raise ValueError(f"column {column!r} is not in {files[0]}; its header has {header}.")
    features = {name: datasets.Value("string") for name in header}
    features[column] = datasets.Image(decode=decode)
    return datasets.Features({**features, "__key__": datasets.Value("string")}), column


def _load(fmt: DataFormat, files: list[str], split: str, streaming: bool, image_column: str | None) -> Any:
    if fmt.name == "webdataset" and streaming:
        return sample_level_webdataset(files, split).as_streaming_dataset(split=split)
    if fmt.name == "imagefolder":
        folders = datasets.load_dataset("imagefolder", data_dir=files[0], streaming=streaming)
        if split not in folders and len(folders) == 1:  # no split sub-folders: the whole folder is the split asked for
            return next(iter(folders.values()))
        if split not in folders:
            raise ValueError(f"{files[0]} holds the split folders {sorted(folders)}, not {split!r}.")
        return folders[split]
    if fmt.name == "arrow":
        saved = datasets.load_from_disk(files[0])
        if isinstance(saved, datasets.DatasetDict):
            if split not in saved:
                raise ValueError(f"{files[0]} holds splits {list(saved)}, not {split!r}.")
            saved = saved[split]
        return saved.to_iterable_dataset(num_shards=max(1, len(saved.cache_files))) if streaming else saved
    if fmt.name == "csv":
        features, column = _csv_features(files, image_column, decode=not streaming)
        kwargs = {"files": files, "image_column": column}
        if streaming:
            # A list in gen_kwargs shards the stream by file, as the file-based builders do.
            return datasets.IterableDataset.from_generator(_csv_rows, features=features, gen_kwargs=kwargs)
        return datasets.Dataset.from_generator(_csv_rows, features=features, gen_kwargs=kwargs)
    return datasets.load_dataset(fmt.name, data_files={split: files}, split=split, streaming=streaming)


def _first(candidates: tuple[str, ...], features: datasets.Features) -> str | None:
    return next((name for name in candidates if name in features), None)


def resolved_columns(spec: DataSpec, features: datasets.Features, need_text: bool = False) -> DataSpec:
    """`spec` with its columns checked against `features` and the unnamed ones filled: the format's default where
    present, else the first Image feature / a usual caption or label name. Captions must be text."""
    fmt = spec.format
    named = [column for column in (spec.image_column, spec.text_column, spec.label_column) if column is not None]
    missing = [column for column in named if column not in features]
    if missing:
        raise ValueError(f"columns {missing} are not in the data; it has {list(features)}.")
    image = spec.image_column or _first((fmt.image_column,), features)
    image = image or next((name for name, f in features.items() if isinstance(f, datasets.Image)), None)
    image = image or _first(IMAGE_COLUMNS, features)
    if image is None:
        raise ValueError(f"no image column among {list(features)}: name it (image_column).")
    text = spec.text_column or (_first((fmt.text_column, *TEXT_COLUMNS), features) if need_text else None)
    if need_text and text is None:
        raise ValueError(f"no caption column among {list(features)}: name it (text_column).")
    if text is not None:
        check_text_feature(text, features[text])
    return replace(spec, image_column=image, text_column=text)


def check_text_feature(column: str, feature: Any) -> None:
    """A caption column holds text (string, bytes, or a list of strings): an integer column is a clear error."""
    value = feature.feature if isinstance(feature, (datasets.List, datasets.Sequence)) else feature
    if not (isinstance(value, datasets.Value) and value.dtype in ("string", "large_string", "binary")):
        raise ValueError(f"caption column {column!r} holds {feature}, not text.")


def default_label_column(spec: DataSpec, features: datasets.Features) -> str | None:
    """The label column: the named one, else the format's default or a usual label name when present."""
    return spec.label_column or _first((spec.format.label_column, *LABEL_COLUMNS), features)


@dataclass
class Source:
    """An opened input: the stream (images undecoded `{"bytes", "path"}`) and the spec with resolved columns."""

    dataset: datasets.IterableDataset
    spec: DataSpec


def open_source(spec: DataSpec, need_text: bool = False) -> Source:
    """Open `spec` (its `data_files` as `resolve_files` gives them) as a stream whose images stay encoded: decoding
    is per sample (`hf_clip.data.samples`), so a corrupt image is one skipped sample."""
    fmt = spec.format
    if not spec.data_files:
        raise ValueError("no data files given.")
    dataset = _load(fmt, spec.data_files, "train", True, spec.image_column)
    spec = resolved_columns(spec, dataset.features or datasets.Features(), need_text)
    if spec.label_column is not None and spec.label_column not in (dataset.features or {}):
        raise ValueError(f"columns {[spec.label_column]} are not in the data; it has {list(dataset.features)}.")
    assert spec.image_column is not None  # resolved
    if isinstance(dataset.features[spec.image_column], datasets.Image):
        dataset = dataset.cast_column(spec.image_column, datasets.Image(decode=False))
    return Source(dataset, spec)


def load_stream(spec: DataSpec) -> datasets.IterableDataset:
    """The split as a streaming `IterableDataset` whose image column yields undecoded `{"bytes", "path"}`."""
    return open_source(spec).dataset


def load_split(
    data_format_name: str, files: list[str], split: str = "train", image_column: str | None = None
) -> datasets.Dataset:
    """One split as a map-style `Dataset` (evaluation's exact path: random access, length, images decoded by
    `datasets`)."""
    return _load(data_format(data_format_name), files, split, False, image_column)
