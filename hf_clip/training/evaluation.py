"""Zero-shot top-1 accuracy during training, computed on all ranks through the prepared (DDP / FSDP) model.

Class embeddings come from `hf_clip.zero_shot.build_class_embeddings` (mean of the normalised template embeddings,
renormalised); text and images go through the prepared model's forward, so FSDP gathers the weights as usual and
every rank makes the same number of forward calls (ranks with fewer evaluation batches run padding batches).
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from ..zero_shot import build_class_embeddings


class _TextFeatures(nn.Module):
    """What `build_class_embeddings` needs (`get_text_features`), answered by the prepared embedder's forward."""

    def __init__(self, embedder: nn.Module):
        super().__init__()
        self.embedder = embedder

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.embedder(input_ids=input_ids, attention_mask=attention_mask).text_embeds


@torch.no_grad()
def zero_shot_accuracy(
    accelerator: Accelerator,
    embedder: nn.Module,
    tokenizer: Callable[..., Any],
    class_names: Sequence[str],
    templates: Sequence[str],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> float:
    """Top-1 accuracy over the evaluation batches of all ranks (each rank passes its own share)."""
    class_embeddings = build_class_embeddings(_TextFeatures(embedder), tokenizer, class_names, templates)
    num_batches = int(accelerator.gather(torch.tensor([len(batches)], device=accelerator.device)).max())
    counts = torch.zeros(2, dtype=torch.long, device=accelerator.device)  # correct, total
    for index in range(num_batches):
        labels: torch.Tensor | None
        if index < len(batches):
            pixel_values, labels = batches[index]
        elif batches:  # padding call: keeps FSDP's collectives in step, counts nothing
            pixel_values, labels = batches[0][0][:1], None
        else:
            continue
        image_embeds = embedder(pixel_values=pixel_values.to(accelerator.device)).image_embeds.float()
        if labels is None:
            continue
        predictions = (image_embeds @ class_embeddings.t()).argmax(dim=-1).cpu()
        counts += torch.tensor([(predictions == labels).sum(), len(labels)], device=accelerator.device)
    correct, total = accelerator.reduce(counts, "sum").tolist()
    if total == 0:
        raise ValueError("the evaluation split yielded no decodable labelled image.")
    return correct / total
