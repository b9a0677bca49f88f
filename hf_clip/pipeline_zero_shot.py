"""A zero-shot image-classification pipeline that ensembles prompt templates and caches the class matrix.

transformers' stock "zero-shot-image-classification" pipeline fills one template and re-encodes every label's text
for every image. This one builds a `ZeroShotClassifier` (mean of normalised template embeddings per class) once per
(labels, templates) pair, keeps it across calls, and then runs only the image tower and one matmul per batch.
`import hf_clip` registers it under the task name `ZERO_SHOT_ENSEMBLE_TASK`; the stock task is left untouched:

    >>> classifier = pipeline("zero-shot-image-classification-ensemble", model=model, tokenizer=tokenizer,
    ...                       image_processor=image_processor)
    >>> classifier(images, candidate_labels=["cat", "dog"], templates=["a photo of a {c}.", "a drawing of a {c}."])
"""

from collections.abc import Sequence
from typing import Any

from transformers.image_utils import load_image
from transformers.pipelines import Pipeline

from .zero_shot import ZeroShotClassifier

ZERO_SHOT_ENSEMBLE_TASK = "zero-shot-image-classification-ensemble"
# The paper's single best default prompt; pass `templates` to ensemble.
DEFAULT_TEMPLATES = ("a photo of a {c}.",)


class ZeroShotEnsembleImageClassificationPipeline(Pipeline):
    """Zero-shot classification with prompt ensembling and a class-embedding matrix cached across calls.

    Call arguments: `candidate_labels` (list of class names), `templates` (list of templates with a "{c}" or "{}"
    placeholder; defaults to `DEFAULT_TEMPLATES`), or instead of both a prebuilt `classifier`
    (`ZeroShotClassifier`, e.g. loaded with `ZeroShotClassifier.from_pretrained`); `top_k` (default: all labels);
    `timeout` for fetching images. Returns, per image, `[{"score", "label"}, ...]` best first, as the stock
    pipeline does.
    """

    # Pipeline declares these as None; transformers is not type-checked, hence the ignores here and below.
    _load_processor = False  # type: ignore[assignment]
    _load_image_processor = True  # type: ignore[assignment]
    _load_feature_extractor = False  # type: ignore[assignment]
    _load_tokenizer = True  # type: ignore[assignment]

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._cache_key: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._cached_classifier: ZeroShotClassifier | None = None

    def classifier_for(self, candidate_labels: Sequence[str], templates: Sequence[str]) -> ZeroShotClassifier:
        """The classifier for these labels and templates: built on first use, then reused until they change."""
        key = (tuple(candidate_labels), tuple(templates))
        if self._cached_classifier is None or key != self._cache_key:
            if self.tokenizer is None:
                raise ValueError(f"The {ZERO_SHOT_ENSEMBLE_TASK} pipeline needs a tokenizer to encode the labels.")
            self._cached_classifier = ZeroShotClassifier.from_model(self.model, self.tokenizer, *key)
            self._cache_key = key
        return self._cached_classifier

    def _sanitize_parameters(
        self,
        candidate_labels: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        classifier: ZeroShotClassifier | None = None,
        top_k: int | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        if kwargs:
            raise TypeError(f"Unexpected arguments for the {ZERO_SHOT_ENSEMBLE_TASK} pipeline: {sorted(kwargs)}.")
        preprocess_params: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        if classifier is not None and (candidate_labels is not None or templates is not None):
            raise ValueError("Pass either `classifier` or `candidate_labels`/`templates`, not both.")
        if classifier is None and candidate_labels is not None:
            classifier = self.classifier_for(candidate_labels, templates or DEFAULT_TEMPLATES)
        elif classifier is None and templates is not None:
            raise ValueError("`templates` given without `candidate_labels`.")
        # __init__ calls this without labels; a call without labels or classifier is rejected in `_forward`.
        forward_params = {} if classifier is None else {"classifier": classifier}
        postprocess_params: dict[str, Any] = {} if classifier is None else {"classifier": classifier, "top_k": top_k}
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, image: Any, timeout: float | None = None) -> dict[str, Any]:  # type: ignore[override]
        if self.image_processor is None:
            raise ValueError(f"The {ZERO_SHOT_ENSEMBLE_TASK} pipeline needs an image processor.")
        inputs = self.image_processor(images=[load_image(image, timeout=timeout)], return_tensors="pt")
        return {"pixel_values": inputs["pixel_values"].to(self.dtype)}

    def _forward(  # type: ignore[override]
        self, model_inputs: dict[str, Any], classifier: ZeroShotClassifier | None = None
    ) -> dict[str, Any]:
        if classifier is None:
            raise ValueError(f"The {ZERO_SHOT_ENSEMBLE_TASK} pipeline needs `candidate_labels` or a `classifier`.")
        return {"logits": classifier.classify(self.model, model_inputs["pixel_values"])}

    def postprocess(  # type: ignore[override]
        self, model_outputs: dict[str, Any], classifier: ZeroShotClassifier, top_k: int | None = None
    ) -> list[dict[str, Any]]:
        return classifier.predict(model_outputs["logits"], k=top_k or classifier.num_classes)[0]
