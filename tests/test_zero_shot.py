"""Prompt-ensembled class matrix, cached classifier, and the ensemble pipeline beside the stock one."""

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn
from transformers import pipeline

from hf_clip import ZeroShotClassifier, build_class_embeddings
from hf_clip.modeling_hf_clip import LOGIT_SCALE_MAX, logit_multiplier
from hf_clip.pipeline_zero_shot import ZERO_SHOT_ENSEMBLE_TASK
from hf_clip.testing_utils import random_images, tiny_clip_tokenizer, tiny_image_processor, tiny_models
from hf_clip.zero_shot import encode_texts, fill_template

BENCHMARKS = Path(__file__).resolve().parents[1] / "examples" / "benchmarks"
CLASS_NAMES = ["cat", "dog", "car", "tree", "boat"]
TEMPLATES = ["a photo of a {c}.", "a drawing of the {c}.", "{c}", "a big {c}, blurry."]


def test_ensembled_class_matrix_equals_per_template_computation():
    model, _ = tiny_models()
    tokenizer = tiny_clip_tokenizer()
    # Reference: one pass per template over all classes, then the mean over templates, renormalised.
    per_template = torch.stack(
        [encode_texts(model, tokenizer, [fill_template(t, name) for name in CLASS_NAMES]) for t in TEMPLATES]
    )
    expected = nn.functional.normalize(per_template.mean(dim=0), dim=-1)
    # 7 texts per batch → one class (4 templates) per batch; 9 → two classes with a remainder; 1000 → one batch.
    for texts_per_batch in (1, 9, 1000):
        ensembled = build_class_embeddings(model, tokenizer, CLASS_NAMES, TEMPLATES, texts_per_batch=texts_per_batch)
        assert ensembled.shape == (len(CLASS_NAMES), model.config.projection_dim)
        torch.testing.assert_close(ensembled, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(ensembled.norm(dim=-1), torch.ones(len(CLASS_NAMES)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("which", ["hf_clip", "transformers"])
def test_cached_classifier_equals_model_logits(which):
    hf_model, reference = tiny_models()
    model = hf_model if which == "hf_clip" else reference
    tokenizer, processor = tiny_clip_tokenizer(), tiny_image_processor()
    template = "a photo of a {c}."
    classifier = ZeroShotClassifier.from_model(model, tokenizer, CLASS_NAMES, [template])
    pixel_values = processor(images=random_images(6), return_tensors="pt")["pixel_values"]
    text = tokenizer([fill_template(template, c) for c in CLASS_NAMES], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**text, pixel_values=pixel_values).logits_per_image
    logits = classifier.classify(model, pixel_values)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    scores, indices = classifier.top_k(logits, k=3)
    assert torch.equal(indices, expected.topk(3).indices)
    torch.testing.assert_close(scores, expected.softmax(-1).topk(3).values, atol=1e-6, rtol=0)


class LookupTextModel(nn.Module):
    """A two-dimensional 'CLIP' whose text embedding is a table row per whole text and image embedding is the input."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.table[input_ids[:, 0]]

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values


def test_ensembling_changes_the_prediction():
    # Image embedding (1, 0). With "a photo of a {c}." alone "cat" (1, 0.1) beats "dog" (1, 0.3); but cat's second
    # prompt points away, (0, 1), while both dog prompts stay close, (1, ±0.3): the ensemble picks "dog".
    texts = ["a photo of a cat.", "art of a cat.", "a photo of a dog.", "art of a dog."]
    table = torch.tensor([[1.0, 0.1], [0.0, 1.0], [1.0, 0.3], [1.0, -0.3]])
    model = LookupTextModel(table)

    def tokenizer(text: list[str], **kwargs) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([[texts.index(t)] for t in text])}

    image = torch.tensor([[1.0, 0.0]])
    single = ZeroShotClassifier.from_model(model, tokenizer, ["cat", "dog"], ["a photo of a {c}."])
    ensemble = ZeroShotClassifier.from_model(model, tokenizer, ["cat", "dog"], ["a photo of a {c}.", "art of a {c}."])
    # No logit_scale on the model: the cap, the paper's 100 as the model computes it (exp of ln 100 in float32).
    cap = float(logit_multiplier(torch.tensor(LOGIT_SCALE_MAX)))
    assert single.logit_scale == ensemble.logit_scale == cap == pytest.approx(100.0, rel=1e-7)
    assert single.predict(single.classify(model, image), k=1)[0][0]["label"] == "cat"
    assert ensemble.predict(ensemble.classify(model, image), k=1)[0][0]["label"] == "dog"


def test_save_and_load_round_trip(tmp_path):
    model, _ = tiny_models()
    classifier = ZeroShotClassifier.from_model(model, tiny_clip_tokenizer(), CLASS_NAMES, TEMPLATES)
    classifier.save_pretrained(tmp_path / "classifier")
    loaded = ZeroShotClassifier.from_pretrained(tmp_path / "classifier")
    assert torch.equal(loaded.class_embeddings, classifier.class_embeddings)
    assert (loaded.class_names, loaded.templates, loaded.logit_scale) == (
        CLASS_NAMES,
        TEMPLATES,
        classifier.logit_scale,
    )
    with pytest.raises(FileNotFoundError, match=r"class_embeddings\.safetensors"):
        ZeroShotClassifier.from_pretrained(tmp_path)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="no class-name placeholder"):
        fill_template("a photo", "cat")
    with pytest.raises(ValueError, match="num_classes=2"):
        ZeroShotClassifier(torch.zeros(3, 4), ["a", "b"])
    with pytest.raises(ValueError, match="duplicates"):
        ZeroShotClassifier(torch.zeros(2, 4), ["a", "a"])


def test_ensemble_pipeline_matches_stock_pipeline_and_caches_the_class_matrix():
    model, reference = tiny_models()
    tokenizer, processor = tiny_clip_tokenizer(), tiny_image_processor()
    images = random_images(5)
    ensemble = pipeline(ZERO_SHOT_ENSEMBLE_TASK, model=model, tokenizer=tokenizer, image_processor=processor)
    stock = pipeline("zero-shot-image-classification", model=reference, tokenizer=tokenizer, image_processor=processor)
    assert type(stock).__name__ == "ZeroShotImageClassificationPipeline"  # the stock task is untouched

    # One template: the same scores as the stock pipeline on transformers' CLIPModel with the same weights.
    stock_results = stock(images, candidate_labels=CLASS_NAMES, hypothesis_template="a photo of a {}.")
    ours = ensemble(images, candidate_labels=CLASS_NAMES, templates=["a photo of a {}."], batch_size=2)
    for expected, got in zip(stock_results, ours, strict=True):
        assert [r["label"] for r in got] == [r["label"] for r in expected]
        np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in expected], atol=1e-5, rtol=0)

    # Several templates: the classifier's scores, built once and reused by later calls.
    classifier = ZeroShotClassifier.from_model(model, tokenizer, CLASS_NAMES, TEMPLATES)
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    expected = classifier.predict(classifier.classify(model, pixel_values), k=2)
    first = ensemble(images, candidate_labels=CLASS_NAMES, templates=TEMPLATES, top_k=2)
    with mock.patch.object(model, "get_text_features", side_effect=AssertionError("text re-encoded")):
        second = ensemble(images[0], candidate_labels=CLASS_NAMES, templates=TEMPLATES, top_k=2)
        from_saved = ensemble(images, classifier=classifier, top_k=2)
    for got in (first, from_saved):
        assert [[r["label"] for r in row] for row in got] == [[r["label"] for r in row] for row in expected]
        np.testing.assert_allclose(
            [[r["score"] for r in row] for row in got], [[r["score"] for r in row] for row in expected], atol=1e-6
        )
    assert second == first[0]
    with pytest.raises(ValueError, match="candidate_labels"):
        ensemble(images[0])


def test_stock_pipeline_runs_hf_clip_model():
    model, reference = tiny_models()
    tokenizer, processor = tiny_clip_tokenizer(), tiny_image_processor()
    images = random_images(2)
    results = [
        pipeline("zero-shot-image-classification", model=m, tokenizer=tokenizer, image_processor=processor)(
            images, candidate_labels=CLASS_NAMES, hypothesis_template="a {}."
        )
        for m in (model, reference)
    ]
    for ours, theirs in zip(*results, strict=True):
        assert [r["label"] for r in ours] == [r["label"] for r in theirs]
        np.testing.assert_allclose([r["score"] for r in ours], [r["score"] for r in theirs], atol=1e-5, rtol=0)


def test_throughput_benchmark_runs_and_both_sides_agree(tmp_path):
    """The zero-shot throughput benchmark (examples/benchmarks) end to end on a tiny model: every method measured,
    cached classifier and stock pipeline predict the same labels. Rates are not asserted: a timed test on a shared
    host proves nothing; the benchmark's own runs are the measurement (examples/benchmarks/RESULTS.md)."""
    output = tmp_path / "zero_shot.json"
    command = [
        sys.executable,
        str(BENCHMARKS / "zero_shot_throughput.py"),
        "--config",
        str(BENCHMARKS / "tiny-vit.json"),
    ]
    command += ["--num_images", "6", "--image_size", "40", "--batch_size", "3", "--repeats", "1", "--threads", "1"]
    subprocess.run([*command, "--output", str(output)], check=True, capture_output=True, timeout=300)
    results = json.loads(output.read_text())
    assert set(results["images_per_second"]) == {"stock", "stock_batched", "ensemble_pipeline", "cached"}
    assert all(rate > 0 for rate in results["images_per_second"].values())
    assert results["prediction_agreement_stock_vs_cached"] == 1.0
