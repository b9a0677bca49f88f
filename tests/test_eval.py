"""Evaluation: retrieval recall@k against a brute-force reference, linear probe, and the eval script end to end."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from eval_metrics import (
    linear_probe,
    mean_per_class_recall,
    retrieval_recall_at_k,
    select_weight_decay,
    top_k_accuracy,
)

KS = (1, 5, 10)


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
