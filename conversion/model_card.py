"""Render `MODEL_CARD.md` into a checkpoint's README.md with `huggingface_hub.ModelCard`.

Every value comes from the objects being published (config, parameter count, processor settings, measured parity)
or from the results JSON the evaluation script writes; nothing is typed in. Results file schema (one object or a
list of them):

    {"dataset": {"name": "ImageNet-1k", "type": "imagenet-1k", "split": "validation"},  # or just the name
     "task": "zero-shot-image-classification",                                         # optional
     "metrics": {"top1": 0.6332, "top5": 0.8883}}

A template variable left without a value is an error, never an empty string in the card.
"""

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import jinja2
import jinja2.meta
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import PreTrainedModel

from hf_clip import HfClipConfig

from .checks import sub_configs

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "MODEL_CARD.md"
PIPELINE_TAG = "zero-shot-image-classification"
LIBRARY_NAME = "transformers"
BASE_TAGS = ("clip", "hf_clip", "zero-shot-image-classification", "image-text-retrieval")
DEFAULT_TASK = "zero-shot-image-classification"


def load_eval_results(path: str | Path, model_name: str) -> list[EvalResult]:
    """`EvalResult`s from a results JSON written by the evaluation scripts (schema in the module docstring)."""
    records = json.loads(Path(path).read_text(encoding="utf-8"))
    records = records if isinstance(records, list) else [records]
    results = []
    for record in records:
        if not isinstance(record, dict) or "dataset" not in record or not record.get("metrics"):
            raise ValueError(f"{path}: each result needs 'dataset' and a non-empty 'metrics' object, got {record!r}")
        dataset = record["dataset"] if isinstance(record["dataset"], dict) else {"name": record["dataset"]}
        for metric, value in record["metrics"].items():
            if not isinstance(value, (int, float)):
                raise ValueError(f"{path}: metric {metric!r} must be a number, got {value!r}")
            results.append(
                EvalResult(
                    task_type=record.get("task", DEFAULT_TASK),
                    dataset_type=str(dataset.get("type", dataset["name"])),
                    dataset_name=dataset["name"],
                    dataset_split=dataset.get("split"),
                    metric_type=metric,
                    metric_name=metric,
                    metric_value=value,
                )
            )
    return results


def describe_towers(config: HfClipConfig) -> tuple[str, str]:
    text, vision = sub_configs(config)
    if vision.backbone == "vit":
        vision_text = (
            f"ViT: {vision.num_hidden_layers} layers, width {vision.hidden_size}, {vision.num_attention_heads} heads, "
            f"patch {vision.patch_size}, {vision.image_size}x{vision.image_size} input, {vision.hidden_act}"
        )
    else:
        vision_text = (
            f"modified ResNet: stages {list(vision.layers or ())}, width {vision.width}, attention pool with "
            f"{vision.num_attention_heads} heads, {vision.image_size}x{vision.image_size} input"
        )
    text_text = (
        f"causal transformer: {text.num_hidden_layers} layers, width {text.hidden_size}, {text.num_attention_heads} "
        f"heads, {text.max_position_embeddings} tokens, vocabulary {text.vocab_size}, {text.hidden_act}"
    )
    return vision_text, text_text


def describe_image_preprocessing(image_processor: Any) -> str:
    size, crop = image_processor.size, image_processor.crop_size
    resize = (
        f"shortest side {size['shortest_edge']}" if "shortest_edge" in size else f"{size['height']}x{size['width']}"
    )
    resample = getattr(image_processor.resample, "name", str(image_processor.resample)).lower()
    return (
        f"resize ({resize}, {resample}), centre crop {crop['height']}x{crop['width']}, rescale by "
        f"{image_processor.rescale_factor:.6g}, normalise with mean {list(image_processor.image_mean)} and std "
        f"{list(image_processor.image_std)}"
    )


def describe_text_preprocessing(tokenizer: Any) -> str:
    return (
        f"{type(tokenizer).__name__}, vocabulary of {len(tokenizer)} tokens, {tokenizer.bos_token} … "
        f"{tokenizer.eos_token}, at most {tokenizer.model_max_length} tokens"
    )


def _evaluation_section(eval_results: Sequence[EvalResult]) -> str:
    if not eval_results:
        return "No evaluation results were supplied when this card was rendered."
    rows = [
        f"| {result.dataset_name} | {result.dataset_split or ''} | {result.metric_type} | {result.metric_value} |"
        for result in eval_results
    ]
    return "\n".join(["| dataset | split | metric | value |", "|---|---|---|---|", *rows])


def _provenance_section(source: str, parity: Mapping[str, float] | None) -> str:
    lines = [f"Converted from {source} by hf_clip's `conversion` scripts."]
    if parity:
        measured = ", ".join(f"{name} {value:.2e}" for name, value in parity.items())
        lines.append(
            f"Before saving, the converted model and the source implementation ran on the same random inputs; "
            f"maximum absolute differences (fp32): {measured}."
        )
    return " ".join(lines)


def render_model_card(
    model: PreTrainedModel,
    processor: Any,
    *,
    model_name: str,
    repo_id: str,
    license: str,
    source: str,
    architecture: str | None = None,
    base_model: str | None = None,
    datasets: Sequence[str] = (),
    tags: Sequence[str] = (),
    eval_results: Sequence[EvalResult] = (),
    parity: Mapping[str, float] | None = None,
    remote_code: bool = False,
    template_path: str | Path = TEMPLATE_PATH,
) -> ModelCard:
    """The README of a published checkpoint, rendered from `MODEL_CARD.md`."""
    config = cast(HfClipConfig, model.config)
    card_data = ModelCardData(
        model_name=model_name,
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        license=license,
        tags=sorted({*BASE_TAGS, *tags}),
        datasets=list(datasets) or None,
        base_model=base_model,
        eval_results=list(eval_results) or None,
    )
    vision_description, text_description = describe_towers(config)
    loading_note = (
        "Without hf_clip, load with `trust_remote_code=True`: the modelling code ships in this repository."
        if remote_code
        else "Loading needs hf_clip installed (`import hf_clip` registers the classes)."
    )
    values: dict[str, Any] = {
        "model_name": model_name,
        "repo_id": repo_id,
        "vision_description": vision_description,
        "text_description": text_description,
        "projection_dim": config.projection_dim,
        "num_parameters": f"{sum(parameter.numel() for parameter in model.parameters()):,}",
        "architecture": architecture or "custom",
        "image_preprocessing": describe_image_preprocessing(processor.image_processor),
        "text_preprocessing": describe_text_preprocessing(processor.tokenizer),
        "loading_note": loading_note,
        "evaluation": _evaluation_section(eval_results),
        "provenance": _provenance_section(source, parity),
    }
    template_text = Path(template_path).read_text(encoding="utf-8")
    needed = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template_text))
    missing = needed - set(values) - {"card_data"}
    if missing:
        raise ValueError(f"{template_path} uses variables this renderer does not fill: {sorted(missing)}")
    card = ModelCard.from_template(card_data, template_str=template_text, **values)
    if "{{" in card.content or "{%" in card.content:
        raise ValueError("the rendered model card still contains template syntax.")
    return card
