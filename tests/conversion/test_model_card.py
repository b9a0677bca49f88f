"""The model card renders from MODEL_CARD.md with measured values only, and its metadata parses back."""

import json

import evaluate
import pytest
from huggingface_hub import metadata_load

from conversion.model_card import TEMPLATE_PATH, CardFacts, load_eval_results, render_model_card
from conversion.testing_utils import tiny_model_for, tiny_processor

RESULTS = {
    "model": "tiny",
    "num_processes": 1,
    "dataset": {"name": "fashion_mnist", "format": "imagefolder", "split": "test", "num_samples": 100},
    "zero_shot": {
        "num_classes": 10,
        "single": {"templates": ["a photo of a {c}."], "top1": 0.61, "top5": 0.93, "mean_per_class_recall": 0.6},
        "ensemble": {"templates": ["a photo of a {c}.", "a {c}."], "top1": 0.64, "top5": 0.95},
    },
    "retrieval": {"num_images": 100, "num_texts": 500, "image_to_text_recall@1": 0.4, "text_to_image_recall@5": 0.7},
    "linear_probe": {"train_split": "train", "test_accuracy": 0.81},
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    folder = tmp_path_factory.mktemp("card")
    # Written the way examples/zero_shot_eval.py writes its results.
    results_path = evaluate.save(str(folder / "eval_results.json"), **RESULTS)
    processor = tiny_processor(image_size=32)
    model = tiny_model_for(processor)
    facts = CardFacts(
        source="a unit test",
        license="mit",
        base_model="openai/clip-vit-base-patch32",
        datasets=["fashion_mnist"],
        eval_results=load_eval_results([results_path]),
        parity={"image_features": 1e-7, "text_features": 2e-7, "logits_per_image": 3e-6},
    )
    card = render_model_card(model, processor, facts, repo_id="org/tiny-clip")
    card.save(folder / "README.md")
    return model, processor, folder / "README.md"


def test_metadata_parses_back_with_every_required_field(rendered):
    _, _, readme = rendered
    metadata = metadata_load(readme)
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "zero-shot-image-classification"
    assert metadata["license"] == "mit"
    assert {"clip", "hf_clip"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["fashion_mnist"]
    assert metadata["base_model"] == "openai/clip-vit-base-patch32"
    (entry,) = metadata["model-index"]
    assert entry["name"] == "tiny-clip"
    measured = {
        (result["task"]["type"], metric["type"]): metric["value"]
        for result in entry["results"]
        for metric in result["metrics"]
    }
    assert measured[("zero-shot-image-classification", "zero-shot top1 (ensemble template)")] == 0.64
    assert measured[("zero-shot-image-classification", "zero-shot mean_per_class_recall (single template)")] == 0.6
    assert measured[("image-text-retrieval", "text_to_image_recall@5")] == 0.7
    assert measured[("image-classification", "linear-probe accuracy")] == 0.81
    assert len(measured) == 8
    assert all(result["dataset"]["split"] == "test" for result in entry["results"])


def test_body_has_measured_values_and_no_placeholder(rendered):
    model, processor, readme = rendered
    text = readme.read_text()
    assert "{{" not in text and "}}" not in text and "{%" not in text
    assert f"| parameters | {sum(p.numel() for p in model.parameters()):,} |" in text
    assert "centre crop 32x32" in text and str(list(processor.image_processor.image_mean)) in text
    assert f"vocabulary of {len(processor.tokenizer)} tokens" in text
    assert "org/tiny-clip" in text and "3.00e-06" in text
    assert "| published architecture | custom |" in text  # tiny: no published architecture matches


def test_template_variable_without_a_value_is_an_error(rendered, tmp_path):
    model, processor, _ = rendered
    template = tmp_path / "card.md"
    template.write_text(TEMPLATE_PATH.read_text() + "\n{{ typed_in_number }}\n")
    with pytest.raises(ValueError, match="typed_in_number"):
        render_model_card(model, processor, CardFacts("s", "mit"), repo_id="o/m", template_path=template)


def test_results_without_a_dataset_name_are_refused(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({**RESULTS, "dataset": {"name": None, "split": "test"}}))
    with pytest.raises(ValueError, match="--dataset_name"):
        load_eval_results([path])
