"""OpenAI / open_clip CLIP state-dict names ↔ hf_clip names (which equal transformers' `CLIPModel` names).

The renames are data: ordered (old, new) tables, expanded per block index from the config, so a conversion is exact
(every key accounted for, nothing matched by accident) and runs both ways. What is not a rename is a named special
case: the fused attention in-projection (split into q/k/v) and the two projection matrices (OpenAI computes
`x @ proj`; a Linear stores the transpose).

Each tower has one converter per direction taking `(remaining, tower_config)`: it moves the tower's entries out of
`remaining` and returns them renamed. A new image tower (the ResNet) adds its pair of converters to
`OPENAI_VISION_CONVERTERS` and `HF_CLIP_TO_OPENAI_VISION_CONVERTERS`, keyed by `vision_config.backbone`.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hf_clip import HfClipConfig, HfClipTextConfig, HfClipVisionConfig

StateDict = dict[str, torch.Tensor]
TowerConverter = Callable[[StateDict, HfClipVisionConfig], StateDict]

# Hyper-parameters OpenAI's archives store as tensors beside the weights; the config carries them instead.
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")

# One residual attention block, relative to the block's prefix (OpenAI, hf_clip).
OPENAI_BLOCK_KEYS: tuple[tuple[str, str], ...] = (
    ("ln_1.weight", "layer_norm1.weight"),
    ("ln_1.bias", "layer_norm1.bias"),
    ("attn.out_proj.weight", "self_attn.out_proj.weight"),
    ("attn.out_proj.bias", "self_attn.out_proj.bias"),
    ("ln_2.weight", "layer_norm2.weight"),
    ("ln_2.bias", "layer_norm2.bias"),
    ("mlp.c_fc.weight", "mlp.fc1.weight"),
    ("mlp.c_fc.bias", "mlp.fc1.bias"),
    ("mlp.c_proj.weight", "mlp.fc2.weight"),
    ("mlp.c_proj.bias", "mlp.fc2.bias"),
)

# nn.MultiheadAttention's fused projection, stacked q, k, v along dim 0 (OpenAI, (hf_clip q, k, v)).
OPENAI_IN_PROJ_KEYS: tuple[tuple[str, tuple[str, str, str]], ...] = (
    ("attn.in_proj_weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
    ("attn.in_proj_bias", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")),
)

# Entries of the joint model outside both towers.
OPENAI_JOINT_KEYS: tuple[tuple[str, str], ...] = (("logit_scale", "logit_scale"),)


@dataclass(frozen=True)
class TransformerTowerKeys:
    """Names of one OpenAI transformer tower (text or ViT) and their hf_clip counterparts."""

    renames: tuple[tuple[str, str], ...]
    # Prefix of residual block `{}` in each layout.
    block_prefix: tuple[str, str]
    # OpenAI's (width, embed_dim) matrix and the hf_clip Linear weight holding its transpose.
    projection: tuple[str, str]


OPENAI_TEXT_KEYS = TransformerTowerKeys(
    renames=(
        ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
        ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
        ("ln_final.weight", "text_model.final_layer_norm.weight"),
        ("ln_final.bias", "text_model.final_layer_norm.bias"),
    ),
    block_prefix=("transformer.resblocks.{}.", "text_model.encoder.layers.{}."),
    projection=("text_projection", "text_projection.weight"),
)

OPENAI_VIT_KEYS = TransformerTowerKeys(
    renames=(
        ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
        ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
        ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
        ("visual.ln_pre.weight", "vision_model.pre_layrnorm.weight"),
        ("visual.ln_pre.bias", "vision_model.pre_layrnorm.bias"),
        ("visual.ln_post.weight", "vision_model.post_layernorm.weight"),
        ("visual.ln_post.bias", "vision_model.post_layernorm.bias"),
    ),
    block_prefix=("visual.transformer.resblocks.{}.", "vision_model.encoder.layers.{}."),
    projection=("visual.proj", "visual_projection.weight"),
)


def tower_renames(tower: TransformerTowerKeys, num_layers: int) -> list[tuple[str, str]]:
    """Every plain (OpenAI, hf_clip) rename of a tower with `num_layers` blocks, in order."""
    renames = list(tower.renames)
    old_prefix, new_prefix = tower.block_prefix
    for index in range(num_layers):
        renames += [(old_prefix.format(index) + old, new_prefix.format(index) + new) for old, new in OPENAI_BLOCK_KEYS]
    return renames


def _take(remaining: StateDict, key: str) -> torch.Tensor:
    if key not in remaining:
        raise KeyError(f"the state dict has no {key!r}, which the config's architecture needs.")
    return remaining.pop(key)


def _openai_tower_to_hf_clip(remaining: StateDict, tower: TransformerTowerKeys, num_layers: int) -> StateDict:
    converted = {new: _take(remaining, old) for old, new in tower_renames(tower, num_layers)}
    old_prefix, new_prefix = tower.block_prefix
    for index in range(num_layers):
        for fused_key, split_keys in OPENAI_IN_PROJ_KEYS:
            # Clones: three views of one tensor would share storage, which safetensors refuses to save.
            parts = _take(remaining, old_prefix.format(index) + fused_key).chunk(3, dim=0)
            for key, part in zip(split_keys, parts, strict=True):
                converted[new_prefix.format(index) + key] = part.clone()
    old_projection, new_projection = tower.projection
    converted[new_projection] = _take(remaining, old_projection).t().contiguous()
    return converted


def _hf_clip_tower_to_openai(remaining: StateDict, tower: TransformerTowerKeys, num_layers: int) -> StateDict:
    converted = {old: _take(remaining, new) for old, new in tower_renames(tower, num_layers)}
    old_prefix, new_prefix = tower.block_prefix
    for index in range(num_layers):
        for fused_key, split_keys in OPENAI_IN_PROJ_KEYS:
            parts = [_take(remaining, new_prefix.format(index) + key) for key in split_keys]
            converted[old_prefix.format(index) + fused_key] = torch.cat(parts, dim=0)
    old_projection, new_projection = tower.projection
    converted[old_projection] = _take(remaining, new_projection).t().contiguous()
    return converted


def convert_openai_text_keys(remaining: StateDict, config: HfClipTextConfig) -> StateDict:
    """Text tower and its projection, OpenAI layout → hf_clip; consumes the tower's entries of `remaining`."""
    return _openai_tower_to_hf_clip(remaining, OPENAI_TEXT_KEYS, config.num_hidden_layers)


def convert_openai_vit_keys(remaining: StateDict, config: HfClipVisionConfig) -> StateDict:
    """ViT image tower and its projection, OpenAI layout → hf_clip; consumes the tower's entries of `remaining`."""
    return _openai_tower_to_hf_clip(remaining, OPENAI_VIT_KEYS, config.num_hidden_layers)


def convert_hf_clip_text_keys_to_openai(remaining: StateDict, config: HfClipTextConfig) -> StateDict:
    """Inverse of `convert_openai_text_keys`."""
    return _hf_clip_tower_to_openai(remaining, OPENAI_TEXT_KEYS, config.num_hidden_layers)


def convert_hf_clip_vit_keys_to_openai(remaining: StateDict, config: HfClipVisionConfig) -> StateDict:
    """Inverse of `convert_openai_vit_keys`."""
    return _hf_clip_tower_to_openai(remaining, OPENAI_VIT_KEYS, config.num_hidden_layers)


# --- Modified ResNet image tower -------------------------------------------------------------------------------------
# The ResNet's entries are plain renames: its attention pool already keeps q/k/v/c as separate Linears, and c_proj is
# the projection into the joint space (hf_clip's `visual_projection` is an Identity for a ResNet).

# Entries of one layer kind, relative to the layer's name.
CONV_KEYS = ("weight",)
BATCH_NORM_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# (OpenAI layer, hf_clip layer, entries). OpenAI keeps the stem's layers directly under `visual.`.
OPENAI_RESNET_STEM_LAYERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("visual.conv1", "vision_model.stem.conv1", CONV_KEYS),
    ("visual.bn1", "vision_model.stem.bn1", BATCH_NORM_KEYS),
    ("visual.conv2", "vision_model.stem.conv2", CONV_KEYS),
    ("visual.bn2", "vision_model.stem.bn2", BATCH_NORM_KEYS),
    ("visual.conv3", "vision_model.stem.conv3", CONV_KEYS),
    ("visual.bn3", "vision_model.stem.bn3", BATCH_NORM_KEYS),
)

# Prefix of block `{1}` of stage `{0}` (stages count from 1) in each layout.
OPENAI_RESNET_BLOCK_PREFIX = ("visual.layer{}.{}.", "vision_model.layer{}.{}.")

# One bottleneck, relative to its block prefix.
OPENAI_BOTTLENECK_LAYERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("conv1", "conv1", CONV_KEYS),
    ("bn1", "bn1", BATCH_NORM_KEYS),
    ("conv2", "conv2", CONV_KEYS),
    ("bn2", "bn2", BATCH_NORM_KEYS),
    ("conv3", "conv3", CONV_KEYS),
    ("bn3", "bn3", BATCH_NORM_KEYS),
)

# The shortcut projection, present in the first block of every stage (it changes the width, and from stage 2 on the
# resolution). OpenAI's Sequential is (-1: AvgPool, 0: conv, 1: BatchNorm); the pool has no entries.
OPENAI_DOWNSAMPLE_LAYERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("downsample.0", "downsample.conv", CONV_KEYS),
    ("downsample.1", "downsample.bn", BATCH_NORM_KEYS),
)

OPENAI_ATTENTION_POOL_KEYS: tuple[tuple[str, str], ...] = (
    ("visual.attnpool.positional_embedding", "vision_model.attention_pool.position_embedding.weight"),
    ("visual.attnpool.q_proj.weight", "vision_model.attention_pool.q_proj.weight"),
    ("visual.attnpool.q_proj.bias", "vision_model.attention_pool.q_proj.bias"),
    ("visual.attnpool.k_proj.weight", "vision_model.attention_pool.k_proj.weight"),
    ("visual.attnpool.k_proj.bias", "vision_model.attention_pool.k_proj.bias"),
    ("visual.attnpool.v_proj.weight", "vision_model.attention_pool.v_proj.weight"),
    ("visual.attnpool.v_proj.bias", "vision_model.attention_pool.v_proj.bias"),
    ("visual.attnpool.c_proj.weight", "vision_model.attention_pool.c_proj.weight"),
    ("visual.attnpool.c_proj.bias", "vision_model.attention_pool.c_proj.bias"),
)


def resnet_renames(config: HfClipVisionConfig) -> list[tuple[str, str]]:
    """Every (OpenAI, hf_clip) rename of a ResNet image tower with `config.layers` blocks per stage, in order."""
    if config.layers is None:
        raise ValueError("a ResNet key mapping needs vision_config.layers.")
    layers = list(OPENAI_RESNET_STEM_LAYERS)
    old_prefix, new_prefix = OPENAI_RESNET_BLOCK_PREFIX
    for stage, num_blocks in enumerate(config.layers, start=1):
        for block in range(num_blocks):
            block_layers = OPENAI_BOTTLENECK_LAYERS + (OPENAI_DOWNSAMPLE_LAYERS if block == 0 else ())
            old_block, new_block = old_prefix.format(stage, block), new_prefix.format(stage, block)
            layers += [(old_block + old, new_block + new, keys) for old, new, keys in block_layers]
    renames = [(f"{old}.{key}", f"{new}.{key}") for old, new, keys in layers for key in keys]
    return renames + list(OPENAI_ATTENTION_POOL_KEYS)


def convert_openai_resnet_keys(remaining: StateDict, config: HfClipVisionConfig) -> StateDict:
    """ResNet image tower (with its attention pool), OpenAI layout → hf_clip; consumes the tower's entries."""
    return {new: _take(remaining, old) for old, new in resnet_renames(config)}


def convert_hf_clip_resnet_keys_to_openai(remaining: StateDict, config: HfClipVisionConfig) -> StateDict:
    """Inverse of `convert_openai_resnet_keys`."""
    return {old: _take(remaining, new) for old, new in resnet_renames(config)}


# Image-tower converters by `vision_config.backbone`; the ResNet mapping registers here.
OPENAI_VISION_CONVERTERS: dict[str, TowerConverter] = {
    "vit": convert_openai_vit_keys,
    "resnet": convert_openai_resnet_keys,
}
HF_CLIP_TO_OPENAI_VISION_CONVERTERS: dict[str, TowerConverter] = {
    "vit": convert_hf_clip_vit_keys_to_openai,
    "resnet": convert_hf_clip_resnet_keys_to_openai,
}


def _vision_converter(converters: dict[str, TowerConverter], backbone: str) -> TowerConverter:
    if backbone not in converters:
        raise ValueError(f"no key mapping for vision backbone {backbone!r}; known: {sorted(converters)}.")
    return converters[backbone]


def _check_consumed(remaining: StateDict, source: str) -> None:
    if remaining:
        raise ValueError(f"{len(remaining)} {source} entries have no mapping: {sorted(remaining)[:10]}")


def openai_to_hf_clip(state_dict: StateDict, config: HfClipConfig) -> StateDict:
    """Convert an OpenAI-layout CLIP state dict (OpenAI's archives, open_clip's OpenAI-style models) to hf_clip.

    Every source entry must be mapped: a key left over means the config does not describe the checkpoint.
    """
    remaining = {key: value for key, value in state_dict.items() if key not in OPENAI_METADATA_KEYS}
    text_config, vision_config = config.tower_configs()
    vision_converter = _vision_converter(OPENAI_VISION_CONVERTERS, vision_config.backbone)
    converted = convert_openai_text_keys(remaining, text_config)
    converted.update(vision_converter(remaining, vision_config))
    converted.update({new: _take(remaining, old) for old, new in OPENAI_JOINT_KEYS})
    _check_consumed(remaining, "OpenAI state-dict")
    return converted


def hf_clip_to_openai(state_dict: StateDict, config: HfClipConfig) -> StateDict:
    """Convert an hf_clip `HfClipModel` state dict to the OpenAI layout (without OpenAI's metadata entries)."""
    remaining = dict(state_dict)
    text_config, vision_config = config.tower_configs()
    vision_converter = _vision_converter(HF_CLIP_TO_OPENAI_VISION_CONVERTERS, vision_config.backbone)
    converted = convert_hf_clip_text_keys_to_openai(remaining, text_config)
    converted.update(vision_converter(remaining, vision_config))
    converted.update({old: _take(remaining, new) for old, new in OPENAI_JOINT_KEYS})
    _check_consumed(remaining, "hf_clip state-dict")
    return converted
