"""Prompt-ensembled zero-shot classification (CLIP paper §3.1.4) with a cached class-embedding matrix.

A class embedding is the mean of the L2-normalised text embeddings of every template filled with the class name,
renormalised. The matrix is computed once (batched over classes, so 1,000 classes × 80 templates fits in memory),
can be saved and reloaded, and classifies a batch of images with one matmul: text is never re-encoded per image.

Works with any model exposing `get_text_features` / `get_image_features` (HfClipModel, transformers' CLIPModel),
whether they return a tensor or a ModelOutput whose `pooler_output` is the projected embedding.
"""

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .modeling_hf_clip import LOGIT_SCALE_MAX, logit_multiplier

CLASS_EMBEDDINGS_FILE = "class_embeddings.safetensors"
CLASSIFIER_CONFIG_FILE = "zero_shot_classifier.json"
# Placeholders understood in templates: clip-benchmark's "{c}" and transformers' "{}".
TEMPLATE_PLACEHOLDERS = ("{c}", "{}")


def fill_template(template: str, class_name: str) -> str:
    """`template` with its placeholder ("{c}" or "{}") replaced by `class_name`."""
    for placeholder in TEMPLATE_PLACEHOLDERS:
        if placeholder in template:
            return template.replace(placeholder, class_name)
    raise ValueError(f"Template {template!r} has no class-name placeholder; expected one of {TEMPLATE_PLACEHOLDERS}.")


def pooled_features(output: Any) -> torch.Tensor:
    """The projected embedding from a `get_*_features` result: a tensor, or a ModelOutput's `pooler_output`."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"Expected a tensor or an output with `pooler_output`, got {type(output).__name__}.")
    return pooled


def model_logit_scale(model: nn.Module | None) -> float:
    """The model's multiplier exp(logit_scale) under hf_clip's cap (`logit_multiplier`: at most the paper's 100); the
    cap's for a model without a `logit_scale` (or none)."""
    logit_scale = getattr(model, "logit_scale", None)
    if logit_scale is None:
        logit_scale = torch.tensor(LOGIT_SCALE_MAX)
    return float(logit_multiplier(logit_scale.detach().float()))


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _feature_method(model: nn.Module, name: str) -> Callable[..., Any]:
    method = getattr(model, name, None)
    if not callable(method):
        raise TypeError(f"{type(model).__name__} has no `{name}`; zero-shot classification needs a CLIP-style model.")
    return method


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer: Callable[..., Any], texts: list[str]) -> torch.Tensor:
    """Normalised text embeddings (float32) of `texts`; `tokenizer` is a tokenizer or a processor."""
    tokens = tokenizer(text=texts, padding=True, truncation=True, return_tensors="pt")
    device = _model_device(model)
    inputs = {name: tokens[name].to(device) for name in ("input_ids", "attention_mask") if name in tokens}
    features = pooled_features(_feature_method(model, "get_text_features")(**inputs)).float()
    return nn.functional.normalize(features, dim=-1)


@torch.no_grad()
def encode_images(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Normalised image embeddings (float32) of a preprocessed batch."""
    dtype = next(model.parameters()).dtype
    get_image_features = _feature_method(model, "get_image_features")
    features = pooled_features(get_image_features(pixel_values=pixel_values.to(_model_device(model), dtype)))
    return nn.functional.normalize(features.float(), dim=-1)


@torch.no_grad()
def _check_names(names: Sequence[str], what: str) -> None:
    # A bare string is a Sequence[str] too: it would silently become one class (or template) per character.
    if isinstance(names, str):
        raise TypeError(f"`{what}` must be a list of strings, got the single string {names!r}.")
    if not names:
        raise ValueError(f"`{what}` is empty.")


def build_class_embeddings(
    model: nn.Module,
    tokenizer: Callable[..., Any],
    class_names: Sequence[str],
    templates: Sequence[str],
    texts_per_batch: int = 1024,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """(num_classes, dim) float32 matrix: per class, the renormalised mean of its normalised template embeddings.

    Classes are encoded in groups of about `texts_per_batch` texts (at least one class's templates at a time), so
    memory does not grow with the number of classes. `progress(n)` is called with the number of classes done per
    group.
    """
    _check_names(class_names, "class_names")
    _check_names(templates, "templates")
    classes_per_batch = max(1, texts_per_batch // len(templates))
    class_embeddings = []
    for start in range(0, len(class_names), classes_per_batch):
        names = class_names[start : start + classes_per_batch]
        texts = [fill_template(template, name) for name in names for template in templates]
        embeddings = encode_texts(model, tokenizer, texts).view(len(names), len(templates), -1)
        class_embeddings.append(nn.functional.normalize(embeddings.mean(dim=1), dim=-1))
        if progress is not None:
            progress(len(names))
    return torch.cat(class_embeddings)


class ZeroShotClassifier:
    """A cached class-embedding matrix: `logits = logit_scale · normalise(image_embeds) @ class_embeddingsᵀ`.

    Build it once with `from_model`, keep it (`save_pretrained` / `from_pretrained`), then classify any number of
    image batches with one matmul each.
    """

    def __init__(
        self,
        class_embeddings: torch.Tensor,
        class_names: Sequence[str],
        templates: Sequence[str] = (),
        logit_scale: float | None = None,
    ):
        _check_names(class_names, "class_names")
        if class_embeddings.ndim != 2 or class_embeddings.shape[0] != len(class_names):
            raise ValueError(
                f"class_embeddings must be (num_classes={len(class_names)}, dim); got {tuple(class_embeddings.shape)}."
            )
        if len(set(class_names)) != len(class_names):
            raise ValueError("class_names contains duplicates; labels would be ambiguous.")
        self.class_embeddings = class_embeddings
        self.class_names = list(class_names)
        self.templates = list(templates)
        # None: the cap's multiplier, as for a model without a temperature.
        self.logit_scale = model_logit_scale(None) if logit_scale is None else float(logit_scale)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        tokenizer: Callable[..., Any],
        class_names: Sequence[str],
        templates: Sequence[str],
        logit_scale: float | None = None,
        texts_per_batch: int = 1024,
        progress: Callable[[int], None] | None = None,
    ) -> "ZeroShotClassifier":
        """Encode `class_names` × `templates`; `logit_scale` defaults to the model's own (100 for CLIP checkpoints)."""
        class_embeddings = build_class_embeddings(model, tokenizer, class_names, templates, texts_per_batch, progress)
        scale = model_logit_scale(model) if logit_scale is None else logit_scale
        return cls(class_embeddings, class_names, templates, scale)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to(self, device: torch.device | str) -> "ZeroShotClassifier":
        self.class_embeddings = self.class_embeddings.to(device)
        return self

    def logits(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(batch, num_classes) logits from image embeddings (normalised here; any scale accepted)."""
        image_embeds = nn.functional.normalize(image_embeds.float(), dim=-1)
        return self.logit_scale * image_embeds @ self.class_embeddings.to(image_embeds.device).t()

    def classify(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """(batch, num_classes) logits for a preprocessed image batch: one image-tower pass and one matmul."""
        return self.logits(encode_images(model, pixel_values))

    def top_k(self, logits: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax probabilities and class indices of the `k` best classes per row (k capped at num_classes)."""
        return logits.softmax(dim=-1).topk(min(k, self.num_classes), dim=-1)

    def predict(self, logits: torch.Tensor, k: int = 5) -> list[list[dict[str, Any]]]:
        """Per row, the `k` best classes as `{"score", "label"}` dicts, best first (the pipelines' format)."""
        scores, indices = self.top_k(logits, k)
        return [
            [{"score": s, "label": self.class_names[i]} for s, i in zip(row_scores, row_indices, strict=True)]
            for row_scores, row_indices in zip(scores.tolist(), indices.tolist(), strict=True)
        ]

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Writes the matrix as safetensors and class names, templates and scale as json."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {"class_embeddings": self.class_embeddings.detach().cpu().contiguous()}, directory / CLASS_EMBEDDINGS_FILE
        )
        config = {"class_names": self.class_names, "templates": self.templates, "logit_scale": self.logit_scale}
        (directory / CLASSIFIER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "ZeroShotClassifier":
        directory = Path(directory)
        missing = [
            name for name in (CLASS_EMBEDDINGS_FILE, CLASSIFIER_CONFIG_FILE) if not (directory / name).is_file()
        ]
        if missing:
            raise FileNotFoundError(f"{directory} is not a saved ZeroShotClassifier: missing {', '.join(missing)}.")
        config = json.loads((directory / CLASSIFIER_CONFIG_FILE).read_text())
        class_embeddings = load_file(directory / CLASS_EMBEDDINGS_FILE)["class_embeddings"]
        return cls(class_embeddings, config["class_names"], config.get("templates", []), config["logit_scale"])
