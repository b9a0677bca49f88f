"""Fine-tuning controls: layer groups of each tower, locking (LiT, Zhai et al. 2022), and layer-wise learning-rate
decay.

A tower is a stack of layer groups, bottom to top, which each tower states itself (`layer_groups()` of
`HfClipVisionTransformer`, `HfClipResNetModel` and `HfClipTextModel`); the joint model's projection into the shared
space joins the top group (the ResNet's attention pool ends in its own). For example:

- ViT image tower: the embeddings (patch, class token, positions) with the pre-LayerNorm, one group per block, and
  the head (post-LayerNorm and the projection);
- ResNet image tower: the stem, the four stages, and the attention pool;
- text tower: the embeddings (token, positions), one group per block, and the head (final LayerNorm and the
  projection).

`lock_tower` freezes a tower except its top `unlocked_groups` groups; the BatchNorm layers of frozen groups also
keep their running statistics (`frozen_batchnorms` lists them; `hf_clip.training.steps.ClipEmbedder` holds them in
eval mode). `layer_decay_scales` gives each group the learning-rate factor `decay ** (groups above it)`, so the top
group trains at the base rate and the embeddings at `decay ** (num_groups - 1)` of it. The temperature (and a
SigLIP bias) is its own group: full rate, lockable with `lock_logit_scale`.
"""

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from ..modeling_hf_clip import HfClipModel

TOWERS = ("image", "text")


def layer_groups(model: HfClipModel, tower: str) -> list[list[nn.Module]]:
    """The tower's layer groups, bottom (input) to top (projection), as the modules that own their parameters."""
    projection: nn.Module
    if tower == "text":
        groups, projection = model.text_model.layer_groups(), model.text_projection
    elif tower == "image":
        groups, projection = model.vision_model.layer_groups(), model.visual_projection
    else:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}.")
    return [*groups[:-1], [*groups[-1], projection]]


def group_parameters(group: list[nn.Module]) -> Iterator[nn.Parameter]:
    for module in group:
        yield from module.parameters()


def lock_tower(model: HfClipModel, tower: str, unlocked_groups: int = 0) -> list[nn.BatchNorm2d]:
    """Freeze `tower` except its top `unlocked_groups` layer groups; returns the frozen groups' BatchNorm layers,
    whose running statistics must stay as they are (keep them in eval mode)."""
    groups = layer_groups(model, tower)
    if not 0 <= unlocked_groups <= len(groups):
        raise ValueError(
            f"{tower} tower: unlocked_groups must be between 0 and its {len(groups)} layer groups, "
            f"got {unlocked_groups}."
        )
    frozen = groups[: len(groups) - unlocked_groups]
    for group in frozen:
        for param in group_parameters(group):
            param.requires_grad_(False)
    return [
        module for group in frozen for root in group for module in root.modules() if isinstance(module, nn.BatchNorm2d)
    ]


def logit_parameters(model: HfClipModel) -> list[nn.Parameter]:
    """The model's own scalars outside both towers: the temperature and, for a SigLIP model, the bias."""
    return list(model.parameters(recurse=False))


def lock_logit_parameters(model: HfClipModel) -> None:
    """Freeze the temperature (and a SigLIP bias)."""
    for param in logit_parameters(model):
        param.requires_grad_(False)


@dataclass
class ParameterScale:
    """A parameter's learning-rate factor and the group it belongs to (for optimizer groups and logs)."""

    group: str
    scale: float


def layer_decay_scales(
    model: HfClipModel, image_decay: float = 1.0, text_decay: float = 1.0
) -> dict[int, ParameterScale]:
    """Every parameter's (by `id`) layer group name and learning-rate factor: `decay ** (groups above it)` within
    its tower; the temperature and bias are `logit` at factor 1."""
    scales: dict[int, ParameterScale] = {}
    for tower, decay in (("image", image_decay), ("text", text_decay)):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"layer decay of the {tower} tower must be in (0, 1], got {decay}.")
        groups = layer_groups(model, tower)
        for index, group in enumerate(groups):
            scale = ParameterScale(f"{tower}.{index}", decay ** (len(groups) - 1 - index))
            for param in group_parameters(group):
                scales[id(param)] = scale
    for param in logit_parameters(model):
        scales[id(param)] = ParameterScale("logit", 1.0)
    unassigned = [name for name, param in model.named_parameters() if id(param) not in scales]
    if unassigned:  # a new module outside every group would otherwise train at an arbitrary rate
        raise ValueError(f"parameters outside every layer group: {unassigned}")
    return scales
