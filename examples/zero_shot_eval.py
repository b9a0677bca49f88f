"""Evaluate a CLIP model: zero-shot classification, image↔text retrieval and a linear probe, written as JSON.

    accelerate launch examples/zero_shot_eval.py --model path/to/model --data_format imagefolder \\
        --data_dir path/to/data --dataset_name cifar10 --tasks zero_shot linear_probe --output_file results.json

`--model` is a folder with the model (HfClipModel or transformers' CLIPModel), tokenizer and image processor.
Data is read with `datasets.load_dataset(data_format, data_dir=..., data_files=...)` from local files:
"imagefolder" (class folders), "webdataset" (tar shards: image + `cls` and/or `txt`) or "parquet" (an image column
and a label and/or caption column). Columns are detected (first Image feature; `label`/`cls`; `caption`/
`captions`/`txt`/`text`, each a string or a list of strings) or named with `--*_column`. Class names and templates
come from `--classnames_file` / `--templates_file` (JSON list, JSON object keyed by dataset name, or one per line),
else from the installed `clip-benchmark` package's published lists for `--dataset_name`, else (class names only)
from the dataset's ClassLabel feature. Several processes split the data and `gather_for_metrics` reassembles
exactly the dataset, without the samples padded in to even out the last batch.

Output JSON (written by `evaluate.save`, which adds `_timestamp`, `_git_commit_hash`, `_evaluate_version`,
`_python_version`, `_interpreter_path`); accuracies and recalls are fractions in [0, 1]; a section is present only
when its task ran, `single`/`ensemble` per `--template_mode`:

    {"model": str, "num_processes": int,
     "dataset": {"name": str | null, "format": str, "split": str, "num_samples": int},
     "zero_shot": {"num_classes": int,
                   "single": {"templates": [str], "top1": float, "top5": float, "mean_per_class_recall": float},
                   "ensemble": {"templates": [str], "top1": float, "top5": float, "mean_per_class_recall": float}},
     "retrieval": {"num_images": int, "num_texts": int,
                   "image_to_text_recall@{1,5,10}": float, "text_to_image_recall@{1,5,10}": float},
     "linear_probe": {"train_split": str, "train_samples": int, "validation_samples": int, "test_samples": int,
                      "weight_decay": float, "validation_accuracy": [{"weight_decay": float, "accuracy": float}],
                      "test_accuracy": float},
     "config": {every EvalConfig field}}
"""

import dataclasses
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import evaluate
import torch
from accelerate import Accelerator
from datasets import ClassLabel, Dataset, Image, load_dataset
from eval_metrics import linear_probe, mean_per_class_recall, retrieval_recall_at_k, top_k_accuracy
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, HfArgumentParser

import hf_clip  # noqa: F401  (registers HfClipModel with the Auto classes)
from hf_clip.zero_shot import ZeroShotClassifier, encode_images, encode_texts

TASKS = ("zero_shot", "retrieval", "linear_probe")
LABEL_COLUMNS = ("label", "cls")
CAPTION_COLUMNS = ("caption", "captions", "txt", "text")
CLIP_BENCHMARK_TEMPLATES = "en_zeroshot_classification_templates.json"
CLIP_BENCHMARK_CLASSNAMES = "en_classnames.json"


@dataclass
class EvalConfig:
    model: str = field(metadata={"help": "Folder with the model, tokenizer and image processor."})
    data_format: str = field(metadata={"help": "imagefolder | webdataset | parquet"})
    data_dir: str | None = None
    data_files: list[str] | None = field(default=None, metadata={"help": "Globs, each optionally 'split=glob'."})
    split: str = "test"
    train_split: str = field(default="train", metadata={"help": "Split the linear probe is trained on."})
    tasks: list[str] = field(default_factory=lambda: ["zero_shot"], metadata={"help": " ".join(TASKS)})
    dataset_name: str | None = field(default=None, metadata={"help": "clip-benchmark name for published lists."})
    classnames_file: str | None = None
    templates_file: str | None = None
    template_mode: str = field(default="both", metadata={"help": "single | ensemble | both"})
    single_template: str = "a photo of a {c}."
    image_column: str | None = None
    label_column: str | None = None
    caption_column: str | None = None
    batch_size: int = 64
    num_workers: int = 0
    max_samples: int | None = None
    probe_validation_fraction: float = 0.2
    probe_max_iter: int = 1000
    seed: int = 0
    output_file: str = "eval_results.json"

    def __post_init__(self) -> None:
        if self.data_format not in ("imagefolder", "webdataset", "parquet"):
            raise ValueError(f"data_format must be imagefolder, webdataset or parquet, got {self.data_format!r}.")
        if unknown := sorted(set(self.tasks) - set(TASKS)):
            raise ValueError(f"Unknown tasks {unknown}; choose from {TASKS}.")
        if self.template_mode not in ("single", "ensemble", "both"):
            raise ValueError(f"template_mode must be single, ensemble or both, got {self.template_mode!r}.")
        if self.data_dir is None and not self.data_files:
            raise ValueError("Pass --data_dir or --data_files.")


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


def resolve_classnames(config: EvalConfig, dataset: Dataset, label_column: str) -> list[str]:
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


def resolve_templates(config: EvalConfig) -> list[str]:
    if config.templates_file:
        return read_list(config.templates_file, config.dataset_name)
    if config.dataset_name:
        return clip_benchmark_list(CLIP_BENCHMARK_TEMPLATES, config.dataset_name)
    raise ValueError("Ensembling needs templates: pass --templates_file or a clip-benchmark --dataset_name.")


def load_splits(config: EvalConfig) -> dict[str, Dataset]:
    data_files: dict[str, list[str]] | None = None
    if config.data_files:
        data_files = {}
        for entry in config.data_files:
            split, _, pattern = entry.partition("=") if "=" in entry else (config.split, "", entry)
            data_files.setdefault(split, []).append(pattern)
    splits = load_dataset(config.data_format, data_dir=config.data_dir, data_files=data_files)
    needed = [config.split] + ([config.train_split] if "linear_probe" in config.tasks else [])
    if missing := [name for name in needed if name not in splits]:
        raise ValueError(f"Splits {missing} not found; the data has {sorted(splits)}.")
    result = {}
    for name in dict.fromkeys(needed):
        split = splits[name]
        result[name] = split.select(range(min(config.max_samples, len(split)))) if config.max_samples else split
    return result


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
        item = {"index": index, "image": row[self.image_column].convert("RGB")}
        if self.label_column:
            item["label"] = int(row[self.label_column])
        return item


def gather_in_order(batches: list[dict[str, torch.Tensor]], total: int) -> dict[str, torch.Tensor]:
    """Concatenate gathered batches, verify each dataset index appears exactly once, and sort by index."""
    merged = {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}
    order = merged["index"].argsort()
    merged = {key: value[order] for key, value in merged.items()}
    if not torch.equal(merged["index"], torch.arange(total)):
        raise RuntimeError(f"Gathered {len(order)} results for {total} samples: duplicates or losses across ranks.")
    return merged


@torch.no_grad()
def image_features(
    accelerator: Accelerator, model: Any, image_processor: Callable, samples: IndexedImages, config: EvalConfig
) -> dict[str, torch.Tensor]:
    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {"index": torch.tensor([item["index"] for item in items])}
        batch["pixel_values"] = image_processor(images=[item["image"] for item in items], return_tensors="pt")[
            "pixel_values"
        ]
        if "label" in items[0]:
            batch["label"] = torch.tensor([item["label"] for item in items])
        return batch

    loader = torch.utils.data.DataLoader(
        samples, batch_size=config.batch_size, collate_fn=collate, num_workers=config.num_workers
    )
    loader = accelerator.prepare(loader)
    batches = []
    for batch in tqdm(loader, desc="images", disable=not accelerator.is_local_main_process):
        embeds = encode_images(model, batch.pop("pixel_values"))
        batches.append(accelerator.gather_for_metrics({"embeds": embeds, **batch}))
    return gather_in_order(batches, len(samples))


@torch.no_grad()
def text_features(
    accelerator: Accelerator, model: Any, tokenizer: Callable, captions: list[str], config: EvalConfig
) -> torch.Tensor:
    def collate(items: list[tuple[int, str]]) -> dict[str, Any]:
        return {"index": torch.tensor([i for i, _ in items]), "text": [text for _, text in items]}

    loader = torch.utils.data.DataLoader(list(enumerate(captions)), batch_size=config.batch_size, collate_fn=collate)
    loader = accelerator.prepare(loader)
    batches = []
    for batch in tqdm(loader, desc="captions", disable=not accelerator.is_local_main_process):
        embeds = encode_texts(model, tokenizer, batch["text"])
        batches.append(accelerator.gather_for_metrics({"embeds": embeds, "index": batch["index"].to(embeds.device)}))
    return gather_in_order(batches, len(captions))["embeds"]


def caption_pairs(dataset: Dataset, caption_column: str) -> tuple[list[str], torch.Tensor]:
    """All captions, flattened, with the index of the image each belongs to (captions only: images stay encoded)."""
    captions, text_to_image = [], []
    for index, value in enumerate(dataset.select_columns([caption_column])[caption_column]):
        for caption in [value] if isinstance(value, str) else value:
            captions.append(caption)
            text_to_image.append(index)
    return captions, torch.tensor(text_to_image)


def zero_shot_scores(classifier: ZeroShotClassifier, embeds: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    logits = classifier.logits(embeds).cpu()
    return {
        "templates": classifier.templates,
        "top1": top_k_accuracy(logits, labels, 1),
        "top5": top_k_accuracy(logits, labels, 5),
        "mean_per_class_recall": mean_per_class_recall(logits.argmax(dim=1), labels),
    }


def build_classifier(
    accelerator: Accelerator, model: Any, tokenizer: Callable, classnames: list[str], templates: list[str]
) -> ZeroShotClassifier:
    bar = tqdm(total=len(classnames), desc=f"classes × {len(templates)} templates")
    bar.disable = not accelerator.is_local_main_process
    classifier = ZeroShotClassifier.from_model(model, tokenizer, classnames, templates, progress=bar.update)
    bar.close()
    return classifier


def evaluate_model(config: EvalConfig, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Runs the configured tasks; every process returns the same results."""
    accelerator = accelerator or Accelerator()
    model = AutoModel.from_pretrained(config.model, dtype=torch.float32).to(accelerator.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    image_processor = AutoImageProcessor.from_pretrained(config.model)
    splits = load_splits(config)
    dataset = splits[config.split]
    image_column = find_column(dataset, config.image_column, (), "image")
    results: dict[str, Any] = {
        "model": config.model,
        "num_processes": accelerator.num_processes,
        "dataset": {
            "name": config.dataset_name,
            "format": config.data_format,
            "split": config.split,
            "num_samples": len(dataset),
        },
    }
    needs_labels = "zero_shot" in config.tasks or "linear_probe" in config.tasks
    label_column = find_column(dataset, config.label_column, LABEL_COLUMNS, "label") if needs_labels else None
    samples = IndexedImages(dataset, image_column, label_column)
    features = image_features(accelerator, model, image_processor, samples, config)
    embeds = features["embeds"]

    if "zero_shot" in config.tasks:
        assert label_column is not None
        classnames = resolve_classnames(config, dataset, label_column)
        if int(features["label"].max()) >= len(classnames):
            raise ValueError(f"Labels reach {int(features['label'].max())} but there are {len(classnames)} classes.")
        section: dict[str, Any] = {"num_classes": len(classnames)}
        labels = features["label"].cpu()
        if config.template_mode in ("single", "both"):
            single = build_classifier(accelerator, model, tokenizer, classnames, [config.single_template])
            section["single"] = zero_shot_scores(single, embeds, labels)
        if config.template_mode in ("ensemble", "both"):
            ensemble = build_classifier(accelerator, model, tokenizer, classnames, resolve_templates(config))
            section["ensemble"] = zero_shot_scores(ensemble, embeds, labels)
        results["zero_shot"] = section

    if "retrieval" in config.tasks:
        caption_column = find_column(dataset, config.caption_column, CAPTION_COLUMNS, "caption")
        captions, text_to_image = caption_pairs(dataset, caption_column)
        text_embeds = text_features(accelerator, model, tokenizer, captions, config)
        recalls = retrieval_recall_at_k(embeds, text_embeds, text_to_image.to(embeds.device))
        results["retrieval"] = {"num_images": len(embeds), "num_texts": len(captions), **recalls}

    if "linear_probe" in config.tasks:
        assert label_column is not None
        train = splits[config.train_split]
        train_label_column = find_column(train, config.label_column, LABEL_COLUMNS, "label")
        train_samples = IndexedImages(train, find_column(train, config.image_column, (), "image"), train_label_column)
        train_features = image_features(accelerator, model, image_processor, train_samples, config)
        probe = linear_probe(
            train_features["embeds"],
            train_features["label"],
            embeds,
            features["label"],
            validation_fraction=config.probe_validation_fraction,
            max_iter=config.probe_max_iter,
            seed=config.seed,
        )
        results["linear_probe"] = {
            "train_split": config.train_split,
            "train_samples": probe.train_samples,
            "validation_samples": probe.validation_samples,
            "test_samples": probe.test_samples,
            "weight_decay": probe.weight_decay,
            "validation_accuracy": [
                {"weight_decay": wd, "accuracy": acc} for wd, acc in probe.validation_accuracy.items()
            ],
            "test_accuracy": probe.test_accuracy,
        }
    results["config"] = dataclasses.asdict(config)
    return results


def main() -> None:
    (config,) = HfArgumentParser(EvalConfig).parse_args_into_dataclasses()
    accelerator = Accelerator()
    results = evaluate_model(config, accelerator)
    if accelerator.is_main_process:
        Path(config.output_file).parent.mkdir(parents=True, exist_ok=True)
        path = evaluate.save(config.output_file, **results)
        print(json.dumps({key: results[key] for key in results if key != "config"}, indent=2))
        print(f"Results written to {path}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
