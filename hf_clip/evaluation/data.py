"""Evaluation data: splits loaded with `datasets` from local files, columns found by type or name, class names and
templates from a file or the installed clip-benchmark package, and index-carrying image samples.

Images reach the model only through its image processor, which applies the input policy (EXIF orientation, alpha
composited onto white, 16-bit scaling, grayscale to RGB): samples are handed over as decoded, unconverted.
"""

import importlib.util
import json
from pathlib import Path
from typing import Any, Protocol

import torch
from datasets import ClassLabel, Dataset, DatasetDict, Image, load_dataset, load_from_disk

from ..data.formats import DataFormatName, data_format, load_split, resolve_files

CLIP_BENCHMARK_TEMPLATES = "en_zeroshot_classification_templates.json"
CLIP_BENCHMARK_CLASSNAMES = "en_classnames.json"


class ListSources(Protocol):
    """Where class names and templates come from (the fields of `EvalConfig` that name them)."""

    dataset_name: str | None
    classnames_file: str | None
    templates_file: str | None


class SplitSources(Protocol):
    """Where the evaluation splits come from (the fields of `EvalConfig` that name them)."""

    data_format: DataFormatName
    data_dir: str | None
    data_files: list[str] | None
    split: str
    train_split: str
    tasks: list[str]
    max_samples: int | None


def read_list(path: str, dataset_name: str | None) -> list[str]:
    """A list from a JSON list, a JSON object keyed by dataset name, or a text file with one entry per line."""
    text = Path(path).read_text()
    if not path.endswith(".json"):
        return [line.strip() for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, dict):
        if dataset_name not in data:
            raise ValueError(f"{path} is keyed by dataset; {dataset_name!r} is not among {sorted(data)}.")
        data = data[dataset_name]
    if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
        raise ValueError(f"{path} must hold a list of strings.")
    return data


def clip_benchmark_list(file_name: str, dataset_name: str) -> list[str]:
    """A published list from the installed clip-benchmark package (read from its files, not copied here)."""
    spec = importlib.util.find_spec("clip_benchmark")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("clip-benchmark is not installed (`pip install clip-benchmark`, or pass a file).")
    return read_list(str(Path(next(iter(spec.submodule_search_locations))) / "datasets" / file_name), dataset_name)


def resolve_classnames(config: ListSources, dataset: Dataset, label_column: str) -> list[str]:
    if config.classnames_file:
        return read_list(config.classnames_file, config.dataset_name)
    if config.dataset_name:
        try:
            return clip_benchmark_list(CLIP_BENCHMARK_CLASSNAMES, config.dataset_name)
        except ValueError:
            pass  # clip-benchmark takes some datasets' class names from the dataset itself: so do we
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel):
        return [name.replace("_", " ") for name in feature.names]
    raise ValueError(
        "No class names: pass --classnames_file, a clip-benchmark --dataset_name, or a ClassLabel column."
    )


def resolve_templates(config: ListSources) -> list[str]:
    if config.templates_file:
        return read_list(config.templates_file, config.dataset_name)
    if config.dataset_name:
        return clip_benchmark_list(CLIP_BENCHMARK_TEMPLATES, config.dataset_name)
    raise ValueError("Ensembling needs templates: pass --templates_file or a clip-benchmark --dataset_name.")


def load_splits(config: SplitSources) -> dict[str, Dataset]:
    """The splits the tasks need, from `data_files` (`split=glob` entries; a bare glob is `config.split`) through the
    format table, or from `data_dir` (a folder whose files or sub-folders `datasets` names by split)."""
    fmt = data_format(config.data_format)
    needed = list(dict.fromkeys([config.split] + ([config.train_split] if "linear_probe" in config.tasks else [])))
    if config.data_files:
        patterns: dict[str, list[str]] = {}
        for entry in config.data_files:
            split, _, pattern = entry.partition("=") if "=" in entry else (config.split, "", entry)
            patterns.setdefault(split, []).append(pattern)
        available = sorted(patterns)
        splits = {
            name: load_split(fmt.name, resolve_files(fmt.name, patterns[name], f"split {name!r}"), name)
            for name in needed
            if name in patterns
        }
    else:
        if fmt.name == "csv":
            raise ValueError("csv data is given as files (--data_files 'split=pattern'), not --data_dir.")
        loaded = (
            load_from_disk(config.data_dir)
            if fmt.name == "arrow"
            else load_dataset(fmt.name, data_dir=config.data_dir)
        )
        if not isinstance(loaded, DatasetDict):
            loaded = DatasetDict({"train": loaded})
        available = sorted(loaded)
        splits = {name: loaded[name] for name in needed if name in loaded}
    if missing := [name for name in needed if name not in splits]:
        raise ValueError(f"Splits {missing} not found; the data has {available} (choose one with --split).")
    if config.max_samples:
        splits = {name: split.select(range(min(config.max_samples, len(split)))) for name, split in splits.items()}
    return splits


def find_column(dataset: Dataset, given: str | None, candidates: tuple[str, ...], what: str) -> str:
    if given is not None:
        if given not in dataset.column_names:
            raise ValueError(f"{what} column {given!r} not in {dataset.column_names}.")
        return given
    if what == "image":
        found = [name for name, feature in dataset.features.items() if isinstance(feature, Image)]
    else:
        found = [name for name in candidates if name in dataset.column_names]
    if not found:
        raise ValueError(f"No {what} column among {dataset.column_names}; name it with --{what}_column.")
    return found[0]


class IndexedImages(torch.utils.data.Dataset):
    """Rows of a dataset as (index, image[, label]) so gathered results can be checked and put back in order."""

    def __init__(self, dataset: Dataset, image_column: str, label_column: str | None):
        columns = [image_column] + ([label_column] if label_column else [])
        self.dataset = dataset.select_columns(columns)
        self.image_column, self.label_column = image_column, label_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.dataset[index]
        item = {"index": index, "image": row[self.image_column]}
        if self.label_column:
            item["label"] = int(row[self.label_column])
        return item


def caption_pairs(dataset: Dataset, caption_column: str) -> tuple[list[str], torch.Tensor]:
    """All captions, flattened, with the index of the image each belongs to (captions only: images stay encoded)."""
    captions, text_to_image = [], []
    for index, value in enumerate(dataset.select_columns([caption_column])[caption_column]):
        for caption in [value] if isinstance(value, str) else value:
            captions.append(caption)
            text_to_image.append(index)
    return captions, torch.tensor(text_to_image)
