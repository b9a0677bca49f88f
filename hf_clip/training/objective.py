"""The training objective: the model's embeddings, by name, scored by the run's loss.

`ClipObjective` puts the two behind one call, as open_clip's `TrainingTask` does: `objective(batch)` embeds a
training batch through the embedder (`hf_clip.training.steps.ClipEmbedder`, the module accelerate prepares) and
scores the named `ContrastiveInputs` with the loss, which a run builds once from the registry
(`ClipObjective.from_name(embedder, config.loss)`, `hf_clip.loss.LOSSES`). The accumulation modes of
`hf_clip.training.steps` call its two halves, `embed` and `score`, separately.
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..loss import ContrastiveInputs, GlobalBatchLoss, build_loss


@dataclass
class ObjectiveOutput:
    """A training batch's loss and the named embeddings it was computed from."""

    loss: torch.Tensor
    inputs: ContrastiveInputs


def text_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A training batch's text as `ClipEmbedder` takes it: the packed layout of `device_text`, or padded `input_ids`
    alone (the attention mask is left out: see `ClipEmbedder`)."""
    return {name: batch[name] for name in ("input_ids", "position_ids", "cu_seqlens") if name in batch}


class ClipObjective:
    """`embedder` (returning `ContrastiveInputs`) and `loss` behind one call: `objective(batch).loss`.

    `embedder` is the module training goes through (`ClipEmbedder`, or accelerate's wrapper of it), so DDP's gradient
    hooks and FSDP's parameter gathering see every use of the weights; the loss owns no parameters.
    """

    def __init__(self, embedder: nn.Module, loss: GlobalBatchLoss):
        self.embedder = embedder
        self.loss = loss

    @classmethod
    def from_name(cls, embedder: nn.Module, loss_name: str, **loss_options: Any) -> "ClipObjective":
        """With the registered loss `loss_name` (`hf_clip.loss.LOSSES`), built with `loss_options`."""
        return cls(embedder, build_loss(loss_name, **loss_options))

    def embed(self, batch: dict[str, torch.Tensor]) -> ContrastiveInputs:
        return self.embedder(batch["pixel_values"], **text_inputs(batch))

    def score(self, inputs: ContrastiveInputs) -> torch.Tensor:
        return self.loss(**inputs.arguments())

    def __call__(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        inputs = self.embed(batch)
        return ObjectiveOutput(self.score(inputs), inputs)
