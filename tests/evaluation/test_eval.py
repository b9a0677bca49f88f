"""Evaluation: retrieval recall@k against a brute-force reference, linear probe, and the eval script end to end."""

import importlib.util
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from datasets import ClassLabel, Dataset, Features, Image, Value
from PIL import Image as PILImage
from transformers import HfArgumentParser

from hf_clip import HfClipImageProcessor, HfClipModel, ZeroShotClassifier
from hf_clip.evaluation.data import IndexedImages, clip_benchmark_list
from hf_clip.evaluation.metrics import (
    linear_probe,
    mean_per_class_recall,
    retrieval_recall_at_k,
    select_weight_decay,
    top_k_accuracy,
)
from hf_clip.evaluation.runner import EvalConfig, evaluate_model, gather_in_order
from hf_clip.testing_utils import tiny_clip_tokenizer, tiny_image_processor, tiny_models, two_cpu_processes_launch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

KS = (1, 5, 10)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: on a shared CPU, intra-op threads only add synchronisation (L-BFGS slows 40×)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def brute_force_recall(image_embeds, text_embeds, text_to_image, ks=KS):
    """Full score matrix; per query, candidates sorted best first with wrong ones ahead of right ones on ties."""
    scores = (text_embeds @ image_embeds.t()).tolist()
    results = {}
    directions = {
        "image_to_text": [
            [(scores[t][i], text_to_image[t] == i) for t in range(len(text_embeds))] for i in range(len(image_embeds))
        ],
        "text_to_image": [
            [(scores[t][i], text_to_image[t] == i) for i in range(len(image_embeds))] for t in range(len(text_embeds))
        ],
    }
    for direction, queries in directions.items():
        ranked = [sorted(candidates, key=lambda c: (-c[0], bool(c[1]))) for candidates in queries]
        for k in ks:
            hits = [any(bool(right) for _, right in candidates[:k]) for candidates in ranked]
            results[f"{direction}_recall@{k}"] = sum(hits) / len(hits)
    return results


def retrieval_problem(num_images=23, captions=(1, 3, 5), dim=4, integer=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    per_image = torch.tensor(captions)[torch.randint(len(captions), (num_images,), generator=generator)]
    text_to_image = torch.repeat_interleave(torch.arange(num_images), per_image)
    text_to_image = text_to_image[torch.randperm(len(text_to_image), generator=generator)]
    if integer:
        # Small integers: dot products are exact in any summation order and ties are everywhere.
        images = torch.randint(-1, 2, (num_images, dim), generator=generator).float()
        texts = images[text_to_image] + torch.randint(-1, 2, (len(text_to_image), dim), generator=generator)
        images[1] = images[0]  # duplicate candidates: exact ties between a right and a wrong image
    else:
        images = torch.nn.functional.normalize(torch.randn(num_images, dim, generator=generator), dim=-1)
        texts = images[text_to_image] + 0.8 * torch.randn(len(text_to_image), dim, generator=generator)
        texts = torch.nn.functional.normalize(texts, dim=-1)
    return images, texts, text_to_image


@pytest.mark.parametrize("integer", [True, False])
def test_retrieval_recall_equals_brute_force_chunked_and_unchunked(integer):
    images, texts, text_to_image = retrieval_problem(integer=integer, dim=4 if integer else 8)
    expected = brute_force_recall(images, texts, text_to_image)
    assert 0.0 < expected["text_to_image_recall@1"] < expected["text_to_image_recall@10"] < 1.0
    assert 0.0 < expected["image_to_text_recall@1"] < 1.0
    for query_chunk_size, candidate_chunk_size in [(10_000, 10_000), (7, 5), (1, 3), (4, 1)]:
        got = retrieval_recall_at_k(images, texts, text_to_image, KS, query_chunk_size, candidate_chunk_size)
        assert got == pytest.approx(expected, abs=1e-9), (query_chunk_size, candidate_chunk_size)


def test_retrieval_ties_count_against_the_query():
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # images 0 and 1 are identical
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # texts 0 and 2 as well
    results = retrieval_recall_at_k(images, texts, torch.tensor([0, 2, 1]), ks=(1, 2))
    # Texts 0 and 2 tie their image with the other copy: misses at 1, hits at 2; text 1 is a clean hit.
    # Likewise images 0 and 1 each tie their caption with the other's.
    assert results == {
        "image_to_text_recall@1": 1 / 3,
        "image_to_text_recall@2": 1.0,
        "text_to_image_recall@1": 1 / 3,
        "text_to_image_recall@2": 1.0,
    }


def test_retrieval_rejects_bad_input():
    images, texts, text_to_image = retrieval_problem()
    with pytest.raises(ValueError, match="no caption"):
        retrieval_recall_at_k(images, texts, torch.zeros_like(text_to_image))
    with pytest.raises(ValueError, match="one image index per text"):
        retrieval_recall_at_k(images, texts, text_to_image[:-1])


def test_top_k_and_mean_per_class_recall():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [3.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
    labels = torch.tensor([0, 2, 1, 2])
    assert top_k_accuracy(logits, labels, 1) == 0.5
    assert top_k_accuracy(logits, labels, 2) == 0.75
    assert top_k_accuracy(logits, labels, 5) == 1.0
    # Class 0: 1/1, class 1: 0/1, class 2: 1/2 → mean 0.5.
    assert mean_per_class_recall(logits.argmax(1), labels) == pytest.approx(0.5)
    # Unbalanced: accuracy 5/6, but the rare class is always missed → mean per-class recall (1 + 0) / 2.
    predictions, labels = torch.tensor([0, 0, 0, 0, 0, 1]), torch.tensor([0, 0, 0, 0, 0, 2])
    assert mean_per_class_recall(predictions, labels) == pytest.approx(0.5)


def separable_features(samples_per_class, num_classes=5, dim=16, noise=0.5, seed=0):
    """Gaussian clusters around fixed class means (the same for every seed); `seed` draws the noise."""
    means = 3.0 * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234))
    counts = [samples_per_class] * num_classes if isinstance(samples_per_class, int) else samples_per_class
    labels = torch.arange(num_classes).repeat_interleave(torch.tensor(counts))
    noise = noise * torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(seed))
    return means[labels] + noise, labels


def test_linear_probe_separable_and_chooses_on_validation():
    train_x, train_y = separable_features(60, seed=0)
    test_x, test_y = separable_features(40, seed=1)
    grid = [1e-6, 1e-3, 1e-1, 1e1, 1e3]
    result = linear_probe(train_x, train_y, test_x, test_y, validation_fraction=0.25, grid=grid, max_iter=200)
    assert result.test_accuracy >= 0.9
    assert (result.train_samples, result.validation_samples, result.test_samples) == (225, 75, 200)
    # The choice is the validation argmax (ties to the larger decay); strong decay collapses the probe.
    best = max(result.validation_accuracy.values())
    assert result.weight_decay == max(wd for wd, acc in result.validation_accuracy.items() if acc == best)
    assert result.validation_accuracy[1e3] < 0.5 < best

    # Test data cannot move the choice: scrambled test labels change the test score, not the selection.
    scrambled_y = test_y[torch.randperm(len(test_y), generator=torch.Generator().manual_seed(0))]
    scrambled = linear_probe(train_x, train_y, test_x, scrambled_y, validation_fraction=0.25, grid=grid, max_iter=200)
    assert scrambled.weight_decay == result.weight_decay
    assert scrambled.validation_accuracy == result.validation_accuracy
    assert scrambled.test_accuracy < 0.5


def test_weight_decay_selection_follows_the_validation_split():
    # Train on 2:1 imbalanced separable clusters. A weak decay separates the classes; the strongest decay zeroes
    # the weights and predicts the majority class. True validation labels pick the weak decay; all-majority
    # validation labels pick the strong one.
    train_x, train_y = separable_features([40, 20], num_classes=2)
    val_x, val_y = separable_features(10, num_classes=2, seed=5)
    grid = [1e-4, 1e2]
    chosen_true, _ = select_weight_decay(train_x, train_y, val_x, val_y, 2, grid, max_iter=200)
    chosen_majority, accuracies = select_weight_decay(train_x, train_y, val_x, torch.zeros_like(val_y), 2, grid, 200)
    assert (chosen_true, chosen_majority) == (1e-4, 1e2)
    assert accuracies == {1e-4: 0.5, 1e2: 1.0}


# --- the evaluation script end to end ---------------------------------------------------------------------------

CLASSES = ["cat", "dog", "car"]
TEST_LABELS = [0, 1, 2, 0, 1, 2, 0]  # 7 samples: not divisible by 2 processes or the batch size of 2
TRAIN_LABELS = [0, 1, 2] * 4
CAPTION_COUNTS = [1, 2, 1, 2, 2, 1, 2]  # 11 captions over the 7 test images


def make_image(label, index):
    rng = np.random.default_rng(100 * label + index)
    color = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]][label])
    pixels = np.clip(color + rng.integers(-60, 60, (36, 36, 3)), 0, 255).astype(np.uint8)
    return PILImage.fromarray(pixels)


def captions_for(index, label):
    return [f"{CLASSES[label]} number {index}", f"a {CLASSES[label]}"][: CAPTION_COUNTS[index]]


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model, _ = tiny_models()
    model.save_pretrained(root / "model")
    tiny_clip_tokenizer().save_pretrained(root / "model")
    tiny_image_processor().save_pretrained(root / "model")
    (root / "templates.txt").write_text("a photo of a {c}.\na {c}.\nart of the {c}.\n")
    for split, labels in (("train", TRAIN_LABELS), ("test", TEST_LABELS)):
        rows = {"image": [], "label": [], "caption": []}
        for index, label in enumerate(labels):
            image = make_image(label, index + (1000 if split == "train" else 0))
            (root / "folder" / split / CLASSES[label]).mkdir(parents=True, exist_ok=True)
            image.save(root / "folder" / split / CLASSES[label] / f"{index}.png")
            rows["image"].append(image)
            rows["label"].append(label)
            rows["caption"].append(captions_for(index, label) if split == "test" else [CLASSES[label]])
        features = Features({"image": Image(), "label": ClassLabel(names=CLASSES), "caption": [Value("string")]})
        Dataset.from_dict(rows, features=features).to_parquet(str(root / f"{split}.parquet"))
    with tarfile.open(root / "test-000000.tar", "w") as tar:
        for index, label in enumerate(TEST_LABELS):
            image_bytes = io.BytesIO()
            make_image(label, index).save(image_bytes, format="PNG")
            members = {
                "png": image_bytes.getvalue(),
                "cls": str(label).encode(),
                "txt": f"a {CLASSES[label]}".encode(),
            }
            for extension, payload in members.items():
                info = tarfile.TarInfo(f"{index:04d}.{extension}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return root


def reference_zero_shot(root, templates):
    """Zero-shot top-1 computed directly: no datasets, dataloader or accelerate."""
    model = HfClipModel.from_pretrained(root / "model").eval()
    images = [make_image(label, index) for index, label in enumerate(TEST_LABELS)]
    pixel_values = tiny_image_processor()(images=images, return_tensors="pt")["pixel_values"]
    classifier = ZeroShotClassifier.from_model(model, tiny_clip_tokenizer(), CLASSES, templates)
    predictions = classifier.classify(model, pixel_values).argmax(dim=1)
    return (predictions == torch.tensor(TEST_LABELS)).float().mean().item()


def test_imagefolder_zero_shot_and_linear_probe_single_process(eval_setup):
    config = EvalConfig(
        model=str(eval_setup / "model"),
        data_format="imagefolder",
        data_dir=str(eval_setup / "folder"),
        tasks=["zero_shot", "linear_probe"],
        templates_file=str(eval_setup / "templates.txt"),
        batch_size=2,
        probe_max_iter=100,
    )
    results = evaluate_model(config, Accelerator(cpu=True))
    assert results["dataset"]["num_samples"] == 7
    zero_shot = results["zero_shot"]
    assert zero_shot["num_classes"] == 3  # class names from the folder names
    templates = ["a photo of a {c}.", "a {c}.", "art of the {c}."]
    assert zero_shot["ensemble"]["templates"] == templates
    assert zero_shot["single"]["top1"] == pytest.approx(reference_zero_shot(eval_setup, ["a photo of a {c}."]))
    assert zero_shot["ensemble"]["top1"] == pytest.approx(reference_zero_shot(eval_setup, templates))
    assert zero_shot["ensemble"]["top5"] == 1.0  # 3 classes
    probe = results["linear_probe"]
    assert (probe["train_samples"] + probe["validation_samples"], probe["test_samples"]) == (12, 7)
    assert probe["test_accuracy"] == 1.0  # the classes are distinct colours: separable even through random features


def test_webdataset_zero_shot_and_retrieval(eval_setup):
    config = EvalConfig(
        model=str(eval_setup / "model"),
        data_format="webdataset",
        data_files=[f"test={eval_setup / 'test-000000.tar'}"],
        tasks=["zero_shot", "retrieval"],
        classnames_file=None,
        template_mode="single",
        batch_size=3,
    )
    with pytest.raises(ValueError, match="No class names"):
        evaluate_model(config, Accelerator(cpu=True))
    (eval_setup / "classes.json").write_text(json.dumps(CLASSES))
    config.classnames_file = str(eval_setup / "classes.json")
    results = evaluate_model(config, Accelerator(cpu=True))
    assert results["zero_shot"]["single"]["top1"] == pytest.approx(
        reference_zero_shot(eval_setup, ["a photo of a {c}."])
    )
    assert "ensemble" not in results["zero_shot"]
    assert (results["retrieval"]["num_images"], results["retrieval"]["num_texts"]) == (7, 7)


def test_clip_benchmark_lists_are_read_from_the_installed_package():
    path = Path(importlib.util.find_spec("clip_benchmark").origin).parent / "datasets"
    published = json.loads((path / "en_zeroshot_classification_templates.json").read_text())
    assert clip_benchmark_list("en_zeroshot_classification_templates.json", "imagenet1k") == published["imagenet1k"]
    assert len(published["imagenet1k"]) == 80
    classnames = json.loads((path / "en_classnames.json").read_text())["imagenet1k"]
    assert clip_benchmark_list("en_classnames.json", "imagenet1k") == classnames and len(classnames) == 1000
    with pytest.raises(ValueError, match="'no-such-dataset' is not among"):
        clip_benchmark_list("en_classnames.json", "no-such-dataset")


def test_two_processes_return_exactly_the_dataset(eval_setup, tmp_path):
    args = [
        "--model", str(eval_setup / "model"), "--data_format", "parquet",
        "--data_files", f"train={eval_setup / 'train.parquet'}", f"test={eval_setup / 'test.parquet'}",
        "--tasks", "zero_shot", "retrieval", "linear_probe", "--templates_file", str(eval_setup / "templates.txt"),
        "--batch_size", "2", "--probe_max_iter", "100",
    ]  # fmt: skip
    launch = [*two_cpu_processes_launch(), str(EXAMPLES / "zero_shot_eval.py")]
    output_file = tmp_path / "results.json"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [*launch, *args, "--output_file", str(output_file)], env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    distributed = json.loads(output_file.read_text())
    assert "_timestamp" in distributed and "_evaluate_version" in distributed  # written through evaluate.save

    parsed = HfArgumentParser(EvalConfig).parse_args_into_dataclasses([*args, "--output_file", "unused"])[0]
    single = evaluate_model(parsed, Accelerator(cpu=True))
    assert (distributed["num_processes"], single["num_processes"]) == (2, 1)
    # 7 samples in batches of 2 over 2 ranks: accelerate pads the last step; gather_for_metrics drops the padding.
    assert distributed["dataset"]["num_samples"] == single["dataset"]["num_samples"] == 7
    assert (distributed["retrieval"]["num_images"], distributed["retrieval"]["num_texts"]) == (7, 11)
    assert distributed["linear_probe"]["test_samples"] == 7
    for section in ("zero_shot", "retrieval", "linear_probe"):
        assert_nested_close(distributed[section], single[section])


def assert_nested_close(actual, expected):
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_nested_close(actual[key], expected[key])
    elif isinstance(expected, list):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_nested_close(a, e)
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, abs=1e-6)
    else:
        assert actual == expected


def test_gathering_rejects_duplicates_and_losses():
    batches = [{"index": torch.tensor([2, 0]), "embeds": torch.tensor([2.0, 0.0])}, {"index": torch.tensor([1])}]
    batches[1]["embeds"] = torch.tensor([1.0])
    assert torch.equal(gather_in_order(batches, 3)["embeds"], torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(RuntimeError, match="duplicates or losses"):
        gather_in_order([*batches, {"index": torch.tensor([0]), "embeds": torch.tensor([0.0])}], 3)
    with pytest.raises(RuntimeError, match="duplicates or losses"):
        gather_in_order(batches, 4)


def test_evaluation_images_reach_the_model_through_the_processor_input_policy():
    """No conversion of its own on the way: a transparent image is composited onto white by the processor, as the
    pipeline and training see it (a `.convert("RGB")` first would drop the alpha and show the hidden colour)."""
    hidden_red = PILImage.new("RGBA", (40, 36), (255, 0, 0, 0))
    features = Features({"image": Image(), "label": ClassLabel(names=["thing"])})
    dataset = Dataset.from_dict({"image": [hidden_red], "label": [0]}, features=features)
    sample = IndexedImages(dataset, "image", "label")[0]
    processor = HfClipImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pixel_values = processor(images=[sample["image"]], return_tensors="pt")["pixel_values"]
    white = processor(images=[PILImage.new("RGB", (40, 36), (255, 255, 255))], return_tensors="pt")["pixel_values"]
    assert torch.equal(pixel_values, white)
