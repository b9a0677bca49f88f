"""CLIP's symmetric contrastive loss.

Pure functions over a logits matrix; the distributed training loss (features gathered across ranks with gradients)
builds on them.
"""

import torch
from torch import nn


def contrastive_loss(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of each row against its matching column (the diagonal unless `labels` says otherwise)."""
    if labels is None:
        labels = torch.arange(logits.shape[0], device=logits.device)
    return nn.functional.cross_entropy(logits, labels)


def clip_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """Mean of the text→image and image→text cross-entropies over a square batch (the paper's Figure 3)."""
    if logits_per_text.shape[0] != logits_per_text.shape[1]:
        raise ValueError(f"the contrastive loss needs matched pairs, got a {tuple(logits_per_text.shape)} matrix.")
    if logits_per_text.shape[0] < 2:
        raise ValueError("the contrastive loss needs a batch of at least 2 pairs (with 1 there are no negatives).")
    return (contrastive_loss(logits_per_text) + contrastive_loss(logits_per_text.t())) / 2
