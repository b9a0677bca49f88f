"""Evaluation metrics on embeddings: top-k accuracy, mean per-class recall, chunked retrieval recall@k, linear probe.

Pure torch on tensors already gathered on one process; `zero_shot_eval.py` feeds them.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the `k` highest logits (k capped at the number of classes)."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1).double().mean().item()


def mean_per_class_recall(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the classes present in `labels` of the fraction of their samples predicted correctly."""
    classes, inverse = labels.unique(return_inverse=True)
    correct = torch.zeros(len(classes), dtype=torch.float64).index_add_(0, inverse, (predictions == labels).double())
    return (correct / torch.bincount(inverse, minlength=len(classes))).mean().item()


def _wrong_ahead_counts(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    query_groups: torch.Tensor,
    candidate_groups: torch.Tensor,
    keep: int,
    query_chunk_size: int,
    candidate_chunk_size: int,
) -> torch.Tensor:
    """Per query, the number of wrong candidates scoring at least as high as its best right one, capped at `keep`.

    A candidate is right for a query when their groups match. Only the `keep` best scores per query are carried
    across candidate chunks, so memory is O(query_chunk × (candidate_chunk + keep)), never queries × candidates.
    With `keep = max_k + most right candidates per query`, every count below `max_k` is exact: if the best right
    candidate falls out of the kept list, at least `max_k` wrong ones score at least as high; if ties with it are cut
    off, the kept list is all ties or better and already holds `max_k` wrong ones.
    """
    counts = []
    for q_start in range(0, len(queries), query_chunk_size):
        query = queries[q_start : q_start + query_chunk_size]
        best_scores = query.new_empty(len(query), 0)
        best_indices = torch.empty(len(query), 0, dtype=torch.long, device=query.device)
        for c_start in range(0, len(candidates), candidate_chunk_size):
            chunk = candidates[c_start : c_start + candidate_chunk_size]
            scores = torch.cat([best_scores, query @ chunk.t()], dim=1)
            indices = torch.arange(c_start, c_start + len(chunk), device=query.device).expand(len(query), -1)
            indices = torch.cat([best_indices, indices], dim=1)
            top = scores.topk(min(keep, scores.shape[1]), dim=1)
            best_scores, best_indices = top.values, indices.gather(1, top.indices)
        right = candidate_groups[best_indices] == query_groups[q_start : q_start + query_chunk_size, None]
        best_right = torch.where(right, best_scores, float("-inf")).max(dim=1).values
        count = (~right & (best_scores >= best_right[:, None])).sum(dim=1)
        counts.append(torch.where(right.any(dim=1), count, keep))
    return torch.cat(counts)


def retrieval_recall_at_k(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    query_chunk_size: int = 1024,
    candidate_chunk_size: int = 16384,
) -> dict[str, float]:
    """Image→text and text→image recall@k; each text (caption) belongs to the image `text_to_image[i]`.

    A query is a hit at k when fewer than k wrong candidates score at least as high as its best right candidate:
    ties count against the query, so the result is deterministic (no arbitrary top-k tie-breaking). Image→text has
    several right captions per image. Scores are dot products: pass normalised embeddings for cosine similarity.
    Returns `{"image_to_text_recall@k": ..., "text_to_image_recall@k": ...}` for each k.
    """
    if text_to_image.shape != (len(text_embeds),):
        raise ValueError(f"text_to_image must have one image index per text ({len(text_embeds)}).")
    if text_to_image.min() < 0 or text_to_image.max() >= len(image_embeds):
        raise ValueError(f"text_to_image holds indices outside the {len(image_embeds)} images.")
    captions_per_image = torch.bincount(text_to_image, minlength=len(image_embeds))
    if (captions_per_image == 0).any():
        raise ValueError(f"{int((captions_per_image == 0).sum())} images have no caption; recall is undefined.")
    image_ids = torch.arange(len(image_embeds), device=text_to_image.device)
    max_k = max(ks)
    chunks = (query_chunk_size, candidate_chunk_size)
    image_to_text = _wrong_ahead_counts(
        image_embeds, text_embeds, image_ids, text_to_image, max_k + int(captions_per_image.max()), *chunks
    )
    text_to_image_counts = _wrong_ahead_counts(text_embeds, image_embeds, text_to_image, image_ids, max_k + 1, *chunks)
    results = {}
    for direction, counts in (("image_to_text", image_to_text), ("text_to_image", text_to_image_counts)):
        for k in ks:
            results[f"{direction}_recall@{k}"] = (counts < k).sum().item() / len(counts)
    return results


def fit_logistic_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    max_iter: int = 1000,
    init: nn.Linear | None = None,
) -> nn.Linear:
    """Multinomial logistic regression by full-batch L-BFGS: minimises mean cross-entropy + weight_decay · ‖W‖².

    Starts from zeros, or from `init` (a warm start: the objective is strictly convex, so only the time changes).
    """
    classifier = nn.Linear(features.shape[1], num_classes).to(features.device, features.dtype)
    with torch.no_grad():
        classifier.weight.copy_(init.weight if init is not None else torch.zeros_like(classifier.weight))
        classifier.bias.copy_(init.bias if init is not None else torch.zeros_like(classifier.bias))
    optimizer = torch.optim.LBFGS(
        classifier.parameters(), lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(classifier(features), labels)
        loss = loss + weight_decay * classifier.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return classifier


def _accuracy(classifier: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (classifier(features).argmax(dim=1) == labels).double().mean().item()


def select_weight_decay(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    validation_features: torch.Tensor,
    validation_labels: torch.Tensor,
    num_classes: int,
    grid: Sequence[float],
    max_iter: int = 1000,
) -> tuple[float, dict[float, float]]:
    """Fits one probe per weight decay in `grid` on train and scores it on validation; ties go to the larger decay.

    Returns the chosen weight decay and every validation accuracy. It never sees test data. The grid is walked from
    strong to weak decay, each fit warm-started from the previous solution (a regularisation path).
    """
    accuracies = {}
    probe = None
    for weight_decay in sorted(grid, reverse=True):
        probe = fit_logistic_regression(train_features, train_labels, num_classes, weight_decay, max_iter, probe)
        accuracies[weight_decay] = _accuracy(probe, validation_features, validation_labels)
    best = max(accuracies.items(), key=lambda item: (item[1], item[0]))[0]
    return best, accuracies


@dataclass
class LinearProbeResult:
    test_accuracy: float
    weight_decay: float
    validation_accuracy: dict[float, float] = field(default_factory=dict)
    train_samples: int = 0
    validation_samples: int = 0
    test_samples: int = 0


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    validation_fraction: float = 0.2,
    grid: Sequence[float] | None = None,
    max_iter: int = 1000,
    seed: int = 0,
) -> LinearProbeResult:
    """The paper's linear probe: logistic regression on frozen features, L2 strength chosen on a held-out split.

    A random `validation_fraction` of the training set picks the weight decay from `grid` (default: the paper's
    range 10^-6 … 10^6, one value per half-decade); the probe is then refitted on train + validation with it and
    scored on test once.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
    grid = list(grid) if grid is not None else torch.logspace(-6, 6, 25).tolist()
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    permutation = torch.randperm(len(train_features), generator=torch.Generator().manual_seed(seed))
    num_validation = max(1, round(validation_fraction * len(train_features)))
    validation_ids, fit_ids = permutation[:num_validation], permutation[num_validation:]
    weight_decay, accuracies = select_weight_decay(
        train_features[fit_ids],
        train_labels[fit_ids],
        train_features[validation_ids],
        train_labels[validation_ids],
        num_classes,
        grid,
        max_iter,
    )
    probe = fit_logistic_regression(train_features, train_labels, num_classes, weight_decay, max_iter)
    return LinearProbeResult(
        test_accuracy=_accuracy(probe, test_features, test_labels),
        weight_decay=weight_decay,
        validation_accuracy=accuracies,
        train_samples=len(fit_ids),
        validation_samples=len(validation_ids),
        test_samples=len(test_features),
    )
