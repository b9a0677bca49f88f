"""CLIP's symmetric contrastive loss and SigLIP's sigmoid loss.

Pure functions over a logits matrix, and `ClipLoss` / `SigLipLoss`, the training losses that gather features from
every rank with gradients so that N processes train exactly as one process on the global batch.

The training losses sit in one registry, `LOSSES`, by the name a run config gives (`loss="softmax"`): a new loss is a
`GlobalBatchLoss` subclass decorated with `@register_loss("name")`, built with `build_loss(name, **options)`. Every
loss takes the named `ContrastiveInputs` fields as keyword arguments (`loss(**inputs.arguments())`).
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import _functional_collectives as funcol

from .tiled_loss import check_tile_size, tiled_clip_loss, tiled_sigmoid_loss


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


def sigmoid_loss(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """SigLIP's loss (Zhai et al. 2023): -(1/rows) Σ_ij log σ(z_ij · logits_ij), z_ij = +1 where column j is row i's
    match (the diagonal unless `labels` gives each row's matching column), -1 elsewhere.

    `logits` already hold scale · similarity + bias. Every pair is an independent binary decision, so the loss is the
    same whether rows are texts or images; it is normalised by the number of rows (the paper's, and open_clip's).
    """
    if labels is None:
        labels = torch.arange(logits.shape[0], device=logits.device)
    # A comparison, not one_hot: one_hot checks its labels' range on the host.
    matched = labels[:, None] == torch.arange(logits.shape[1], device=logits.device)
    signs = 2 * matched.to(logits.dtype) - 1
    return -nn.functional.logsigmoid(signs * logits).sum() / logits.shape[0]


# An all-gather whose backward reduce-scatters the gradients; torch 2.14 renamed `all_gather_tensor_autograd`.
_all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def _distributed_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(features: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """Concatenate `features` of every rank in rank order (the local rows keep their gradient either way).

    With `with_grad` the all-gather is autograd-aware: its backward sums, over ranks, the gradient each rank's loss
    sends to this rank's rows (a reduce-scatter), so encoders also learn from being other ranks' negatives. Without
    it the other ranks' rows are constants and that part of the gradient is lost.
    """
    rank, world_size = _distributed_world()
    if world_size == 1:
        return features
    if with_grad:
        group = dist.group.WORLD
        assert group is not None  # initialised: world_size > 1
        return _all_gather_autograd(features.contiguous(), gather_dim=0, group=group)
    gathered = [torch.empty_like(features) for _ in range(world_size)]
    dist.all_gather(gathered, features.detach().contiguous())
    gathered[rank] = features
    return torch.cat(gathered, dim=0)


@dataclass
class ContrastiveInputs:
    """What a contrastive loss scores, by name: L2-normalised `image_embeds` and `text_embeds` (local batch × dim,
    row i of each a pair), `logit_scale` the multiplier `exp(clamped logit_scale parameter)`
    (`HfClipModel.logit_multiplier`), and `logit_bias` for a model that has one (SigLIP), else None.

    `hf_clip.training.steps.ClipEmbedder` returns it; a side the call did not embed is None.
    """

    image_embeds: torch.Tensor | None
    text_embeds: torch.Tensor | None
    logit_scale: torch.Tensor | float
    logit_bias: torch.Tensor | float | None = None

    def arguments(self) -> dict[str, Any]:
        """The fields that are set, by name: a loss's keyword arguments (a CLIP model has no `logit_bias`, so
        `ClipLoss` takes none and `SigLipLoss` requires one)."""
        return {
            field.name: getattr(self, field.name) for field in fields(self) if getattr(self, field.name) is not None
        }


class GlobalBatchLoss(nn.Module):
    """What the losses over the global batch of all ranks share: the input check, the fp32 cast and the check that
    every rank passes the same local batch size (`ClipLoss` states the contract).

    A subclass states whether it scores with the model's `logit_bias` (`uses_logit_bias`): the run config gives the
    model a bias exactly when its loss uses one.
    """

    uses_logit_bias: ClassVar[bool] = False

    def __init__(self):
        super().__init__()
        self.checked_local_batch: int | None = None

    def local_inputs(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """`(image_embeds, text_embeds, rank, world_size)`, the embeddings in fp32, after checking their shapes and
        (across ranks) their batch size."""
        if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
            raise ValueError(
                f"image_embeds {tuple(image_embeds.shape)} and text_embeds {tuple(text_embeds.shape)} must be "
                "matching (local batch, dim) matrices."
            )
        rank, world_size = _distributed_world()
        if world_size > 1:
            self.check_equal_batches(image_embeds.shape[0], world_size, image_embeds.device)
        # Under mixed precision the embeddings arrive in bf16/fp16; the logits and the loss need fp32 (as autocast
        # gives open_clip's loss). Batch × dim tensors: the cast is cheap.
        return image_embeds.float(), text_embeds.float(), rank, world_size

    def check_equal_batches(self, local_batch: int, world_size: int, device: torch.device) -> None:
        """A clear error instead of a hang or silently wrong labels when the ranks' local batches differ."""
        name = type(self).__name__
        if self.checked_local_batch is None:
            # One tiny collective, on the first call only: its read-back would stall every step.
            sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size)]
            dist.all_gather(sizes, torch.tensor([local_batch], device=device))
            sizes_list = [int(size) for size in sizes]
            if len(set(sizes_list)) != 1:
                raise ValueError(
                    f"{name} needs the same local batch size on every rank, got {sizes_list} (use drop_last)."
                )
            self.checked_local_batch = local_batch
        elif local_batch != self.checked_local_batch:
            # Checked locally: a collective now would pair with the other ranks' feature all-gather.
            raise ValueError(
                f"{name} needs the same local batch size on every rank and every call: the ranks were compared at "
                f"{self.checked_local_batch}, this call has {local_batch} (use drop_last)."
            )


LossClass = TypeVar("LossClass", bound=type[GlobalBatchLoss])
# The training losses by the name a run config gives them (`TrainConfig.loss`); filled by `register_loss`.
LOSSES: dict[str, type[GlobalBatchLoss]] = {}


def register_loss(name: str) -> Callable[[LossClass], LossClass]:
    """Class decorator: make a `GlobalBatchLoss` subclass the training loss called `name`."""

    def register(loss_class: LossClass) -> LossClass:
        if name in LOSSES:
            raise ValueError(f"a loss named {name!r} is registered already ({LOSSES[name].__name__}).")
        LOSSES[name] = loss_class
        return loss_class

    return register


def build_loss(name: str, **options: Any) -> GlobalBatchLoss:
    """The registered loss `name`, constructed with `options` (its constructor's keyword arguments)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; the registered losses are {', '.join(LOSSES)}.")
    return LOSSES[name](**options)


@register_loss("softmax")
class ClipLoss(GlobalBatchLoss):
    """Symmetric contrastive loss over the global batch of all ranks.

    Only `torch.distributed` is used (no process group: the plain single-process loss), so it runs unchanged under
    accelerate, torchrun or one process.

    Args:
        local_loss: score only this rank's rows against the gathered columns, with labels offset by
            `rank * local_batch` (memory O(local × global) instead of O(global²)). With `False` every rank scores
            the whole global matrix. Both give the same gradients.
        gather_with_grad: gather with an autograd all-gather. Keep it `True`: a detached gather drops the
            gradient each rank's rows receive as negatives of the other ranks, so training no longer matches the
            single-process run on the global batch (tests/test_loss.py shows the mismatch).
        tile_size: compute the loss in (tile_size × tile_size) blocks of logits (`hf_clip.tiled_loss`): the same
            value and gradients in memory O(batch · dim + tile_size²) instead of O(local × global). `None`: the
            dense matrices.

    Scaling: with `local_loss=True` each rank returns its own share of the loss; the mean over ranks of the returned
    values is the global-batch loss, and the mean over ranks of the gradients (what DDP, FSDP and
    `accelerator.backward` do) is exactly the global-batch gradient. Do not rescale the loss by the world size;
    average it over ranks only for logging (`accelerator.reduce(loss, "mean")`). Every rank must pass the same
    local batch size (use `drop_last=True`): the first call compares the ranks' sizes (one collective and one read
    back from the device per run) and raises on a mismatch; later calls only check that this rank's size stays the
    one compared, so a training step never waits on the host.
    """

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True, tile_size: int | None = None):
        super().__init__()
        if tile_size is not None:
            check_tile_size(tile_size)
            if not gather_with_grad:
                raise ValueError("the tiled ClipLoss (tile_size) gathers with gradients: use gather_with_grad=True.")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.tile_size = tile_size

    def forward(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float
    ) -> torch.Tensor:
        """Loss of L2-normalised `image_embeds` and `text_embeds` (local batch × dim, row i of each a pair).

        `logit_scale` is the multiplier itself, `exp(clamped logit_scale parameter)` (`HfClipModel.logit_multiplier`),
        not the raw log-scale parameter.
        """
        image_embeds, text_embeds, rank, world_size = self.local_inputs(image_embeds, text_embeds)
        local_batch = image_embeds.shape[0]
        if local_batch * world_size < 2:
            raise ValueError("the contrastive loss needs a global batch of at least 2 pairs (1 has no negatives).")

        all_image = gather_features(image_embeds, self.gather_with_grad)
        if self.tile_size is not None and self.local_loss:
            # The image→text direction comes from the column statistics of this rank's block (see tiled_clip_loss).
            gather_column_lse = functools.partial(gather_features, with_grad=True) if world_size > 1 else None
            offset = rank * local_batch
            return tiled_clip_loss(text_embeds, all_image, logit_scale, self.tile_size, offset, gather_column_lse)
        all_text = gather_features(text_embeds, self.gather_with_grad)
        if self.tile_size is not None:
            return tiled_clip_loss(all_text, all_image, logit_scale, self.tile_size)
        if not self.local_loss:
            return clip_loss(logit_scale * all_text @ all_image.t())
        labels = torch.arange(local_batch, device=image_embeds.device) + rank * local_batch
        logits_per_text = logit_scale * text_embeds @ all_image.t()
        logits_per_image = logit_scale * image_embeds @ all_text.t()
        return (contrastive_loss(logits_per_text, labels) + contrastive_loss(logits_per_image, labels)) / 2


@register_loss("sigmoid")
class SigLipLoss(GlobalBatchLoss):
    """SigLIP's sigmoid loss over the global batch of all ranks.

    Each rank scores its own images against the texts of every rank, gathered with an autograd all-gather
    (`gather_features`), with each image's matching text at `rank * local_batch` + its row. Scaling and batch sizes
    follow `ClipLoss`'s contract: the mean over ranks of the returned losses is the global-batch loss, the mean over
    ranks of the gradients (what DDP and `accelerator.backward` do) the global-batch gradient; every rank passes the
    same local batch size. `tile_size` as in `ClipLoss`.
    """

    uses_logit_bias = True

    def __init__(self, tile_size: int | None = None):
        super().__init__()
        if tile_size is not None:
            check_tile_size(tile_size)
        self.tile_size = tile_size

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float,
    ) -> torch.Tensor:
        """Loss of L2-normalised `image_embeds` and `text_embeds` (local batch × dim, row i of each a pair).

        `logit_scale` is the multiplier `exp(clamped logit_scale parameter)` (`HfClipModel.logit_multiplier`),
        `logit_bias` the bias itself (as `HfClipModel` holds it).
        """
        image_embeds, text_embeds, rank, _ = self.local_inputs(image_embeds, text_embeds)
        local_batch = image_embeds.shape[0]
        all_text = gather_features(text_embeds, with_grad=True)
        if self.tile_size is not None:
            offset = rank * local_batch
            return tiled_sigmoid_loss(image_embeds, all_text, logit_scale, logit_bias, self.tile_size, offset)
        labels = torch.arange(local_batch, device=image_embeds.device) + rank * local_batch
        return sigmoid_loss(logit_scale * image_embeds @ all_text.t() + logit_bias, labels)
