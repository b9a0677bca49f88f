"""Render `MODEL_CARD.md` into a checkpoint's README.md with `huggingface_hub.ModelCard`.

Every value comes from the objects being published (config, parameter count, processor settings, measured parity)
or from results files written by `examples/zero_shot_eval.py` (via `evaluate.save`); nothing is typed in. The parts
of that schema read here:

    {"dataset": {"name": "cifar10", "split": "test", ...},
     "zero_shot": {"single": {"top1": ..., "top5": ..., "mean_per_class_recall": ...}, "ensemble": {...}},
     "retrieval": {"image_to_text_recall@1": ..., "text_to_image_recall@5": ..., ...},
     "linear_probe": {"test_accuracy": ...}}

A template variable left without a value is an error, never an empty string in the card.
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import jinja2
import jinja2.meta
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import PreTrainedModel

from hf_clip import HfClipConfig

from .architectures import published_architecture

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "MODEL_CARD.md"
PIPELINE_TAG = "zero-shot-image-classification"
LIBRARY_NAME = "transformers"
BASE_TAGS = ("clip", "hf_clip", "zero-shot-image-classification", "image-text-retrieval")
ZERO_SHOT_METRICS = ("top1", "top5", "mean_per_class_recall")


@dataclass(frozen=True)
class CardFacts:
    """What a card says that the model and processor cannot tell: where the weights come from, their license, the
    Hub ids they derive from, and what was measured on them (evaluation results, parity with the source)."""

    source: str
    license: str
    base_model: str | None = None
    datasets: Sequence[str] = ()
    eval_results: Sequence[EvalResult] = ()
    parity: Mapping[str, float] | None = None


def _eval_result(task: str, dataset: Mapping[str, Any], metric: str, value: Any, source: Path) -> EvalResult:
    if not isinstance(value, (int, float)):
        raise ValueError(f"{source}: {task} metric {metric!r} must be a number, got {value!r}")
    return EvalResult(
        task_type=task,
        dataset_type=str(dataset["name"]),
        dataset_name=str(dataset["name"]),
        dataset_split=dataset.get("split"),
        metric_type=metric,
        metric_name=metric,
        metric_value=value,
    )


def load_eval_results(paths: Sequence[str | Path]) -> list[EvalResult]:
    """`EvalResult`s from results files of `examples/zero_shot_eval.py` (schema in the module docstring)."""
    results = []
    for path in map(Path, paths):
        record = json.loads(path.read_text(encoding="utf-8"))
        dataset = record.get("dataset") or {}
        if not dataset.get("name"):
            raise ValueError(f"{path}: the results name no dataset (run the evaluation with --dataset_name).")
        found = []
        for mode, scores in (record.get("zero_shot") or {}).items():
            if isinstance(scores, dict):
                found += [
                    _eval_result(PIPELINE_TAG, dataset, f"zero-shot {metric} ({mode} template)", scores[metric], path)
                    for metric in ZERO_SHOT_METRICS
                    if metric in scores
                ]
        for metric, value in (record.get("retrieval") or {}).items():
            if "recall@" in metric:
                found.append(_eval_result("image-text-retrieval", dataset, metric, value, path))
        if "linear_probe" in record:
            accuracy = record["linear_probe"]["test_accuracy"]
            found.append(_eval_result("image-classification", dataset, "linear-probe accuracy", accuracy, path))
        if not found:
            raise ValueError(f"{path} holds no zero-shot, retrieval or linear-probe results.")
        results += found
    return results


def describe_towers(config: HfClipConfig) -> tuple[str, str]:
    text, vision = config.tower_configs()
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
    facts: CardFacts,
    *,
    repo_id: str,
    remote_code: bool = False,
    template_path: str | Path = TEMPLATE_PATH,
) -> ModelCard:
    """The README of the checkpoint `repo_id` (ORG/NAME; NAME titles the card), rendered from `MODEL_CARD.md`."""
    config = cast(HfClipConfig, model.config)
    model_name = repo_id.rsplit("/", 1)[-1]
    card_data = ModelCardData(
        model_name=model_name,
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        license=facts.license,
        tags=sorted(BASE_TAGS),
        datasets=list(facts.datasets) or None,
        base_model=facts.base_model,
        eval_results=list(facts.eval_results) or None,
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
        "architecture": published_architecture(config) or "custom",
        "image_preprocessing": describe_image_preprocessing(processor.image_processor),
        "text_preprocessing": describe_text_preprocessing(processor.tokenizer),
        "loading_note": loading_note,
        "evaluation": _evaluation_section(facts.eval_results),
        "provenance": _provenance_section(facts.source, facts.parity),
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
