"""Evaluate a CLIP model: zero-shot classification, image↔text retrieval and a linear probe, written as JSON.

    accelerate launch examples/zero_shot_eval.py --model path/to/model --data_format imagefolder \\
        --data_dir path/to/data --dataset_name cifar10 --tasks zero_shot linear_probe --output_file results.json

`--model` is a folder with the model (HfClipModel or transformers' CLIPModel), tokenizer and image processor.
Data is read with `datasets` (`hf_clip.data.formats`, `load_split`) from local files:
"imagefolder" (class folders), "webdataset" (tar shards: image + `cls` and/or `txt`), "parquet" (an image column
and a label and/or caption column), "arrow" (a `save_to_disk` folder) or "csv" (image paths and captions; see
`hf_clip.data.formats`). Columns are detected (first Image feature; `label`/`cls`; `caption`/
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
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import evaluate
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, HfArgumentParser
from transformers.hf_argparser import DataClassType

from ..data.formats import LABEL_COLUMNS, TEXT_COLUMNS, DataFormatName, data_format
from ..saved_folders import check_model_folder
from ..zero_shot import ZeroShotClassifier, encode_images, encode_texts
from .data import (
    IndexedImages,
    caption_pairs,
    find_column,
    load_splits,
    resolve_classnames,
    resolve_templates,
)
from .metrics import linear_probe, mean_per_class_recall, retrieval_recall_at_k, top_k_accuracy

TASKS = ("zero_shot", "retrieval", "linear_probe")


@dataclass
class EvalConfig:
    model: str = field(metadata={"help": "Folder with the model, tokenizer and image processor."})
    data_format: DataFormatName = field(metadata={"help": "imagefolder | webdataset | parquet | arrow | csv"})
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
        data_format(self.data_format)  # a known format, or a clear error
        if unknown := sorted(set(self.tasks) - set(TASKS)):
            raise ValueError(f"Unknown tasks {unknown}; choose from {TASKS}.")
        if self.template_mode not in ("single", "ensemble", "both"):
            raise ValueError(f"template_mode must be single, ensemble or both, got {self.template_mode!r}.")
        if self.data_dir is None and not self.data_files:
            raise ValueError("Pass --data_dir or --data_files.")


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

    # A list of (index, caption) pairs is a map-style dataset.
    indexed = cast(torch.utils.data.Dataset[tuple[int, str]], list(enumerate(captions)))
    loader = accelerator.prepare(
        torch.utils.data.DataLoader(indexed, batch_size=config.batch_size, collate_fn=collate)
    )
    batches = []
    for batch in tqdm(loader, desc="captions", disable=not accelerator.is_local_main_process):
        embeds = encode_texts(model, tokenizer, batch["text"])
        batches.append(accelerator.gather_for_metrics({"embeds": embeds, "index": batch["index"].to(embeds.device)}))
    return gather_in_order(batches, len(captions))["embeds"]


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
    check_model_folder(config.model, "--model")
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
        caption_column = find_column(dataset, config.caption_column, TEXT_COLUMNS, "caption")
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
    (config,) = HfArgumentParser(DataClassType(EvalConfig)).parse_args_into_dataclasses()
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
