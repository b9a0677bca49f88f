"""`HfClipConfig` → the configs of the reference implementations: open_clip's model config and transformers'
`CLIPConfig`. One copy of each translation, for the converters, the benchmarks and the tests.

Neither library's classes are needed to build these: open_clip's config is a plain dict (what
`open_clip.model.CLIP(**model_cfg)` takes), so this module does not import open_clip.
"""

from typing import Any

from transformers import CLIPConfig

from .configuration_hf_clip import HfClipConfig

# Fields that size a transformer tower (text or ViT); hf_clip and transformers' CLIP configs name them alike.
TRANSFORMER_ARCHITECTURE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "projection_dim",
    "hidden_act",
    "layer_norm_eps",
)
# Every field transformers' CLIP tower configs share with hf_clip's: the architecture plus dropout and initialisation.
TRANSFORMERS_TOWER_FIELDS = (
    *TRANSFORMER_ARCHITECTURE_FIELDS,
    "attention_dropout",
    "initializer_range",
    "initializer_factor",
)
TRANSFORMERS_TEXT_FIELDS = (
    *TRANSFORMERS_TOWER_FIELDS,
    "vocab_size",
    "max_position_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
TRANSFORMERS_VISION_FIELDS = (*TRANSFORMERS_TOWER_FIELDS, "num_channels", "image_size", "patch_size")
TRANSFORMERS_JOINT_FIELDS = ("projection_dim", "logit_scale_init_value", "initializer_factor")
# open_clip's LayerNorm eps, which it does not let a config change.
OPEN_CLIP_LAYER_NORM_EPS = 1e-5
OPEN_CLIP_ACTIVATIONS = ("gelu", "quick_gelu")


def open_clip_model_cfg(config: HfClipConfig) -> dict[str, Any]:
    """The open_clip model config (`open_clip.model.CLIP(**model_cfg)`) describing the same architecture as `config`.

    Raises `ValueError` for what open_clip cannot express: a LayerNorm eps other than 1e-5, an activation other
    than GELU or QuickGELU, or different activations in the two towers.
    """
    text_config, vision_config = config.tower_configs()
    for sub_config in (text_config, vision_config):
        if sub_config.layer_norm_eps != OPEN_CLIP_LAYER_NORM_EPS:
            raise ValueError(
                f"open_clip uses LayerNorm eps {OPEN_CLIP_LAYER_NORM_EPS}, got {sub_config.layer_norm_eps}."
            )
    if text_config.hidden_act not in OPEN_CLIP_ACTIVATIONS:
        raise ValueError(f"open_clip has no {text_config.hidden_act!r} activation.")
    if vision_config.backbone == "vit":
        if vision_config.hidden_act != text_config.hidden_act:
            raise ValueError("open_clip uses one activation for both towers.")
        vision_cfg: dict[str, Any] = {
            "image_size": vision_config.image_size,
            "layers": vision_config.num_hidden_layers,
            "width": vision_config.hidden_size,
            "head_width": vision_config.hidden_size // vision_config.num_attention_heads,
            "mlp_ratio": vision_config.intermediate_size / vision_config.hidden_size,
            "patch_size": vision_config.patch_size,
        }
    else:
        vision_cfg = {
            "image_size": vision_config.image_size,
            "layers": list(vision_config.layers or ()),
            "width": vision_config.width,
            "head_width": vision_config.width * 32 // vision_config.num_attention_heads,
        }
    return {
        "embed_dim": config.projection_dim,
        "quick_gelu": text_config.hidden_act == "quick_gelu",
        "vision_cfg": vision_cfg,
        "text_cfg": {
            "context_length": text_config.max_position_embeddings,
            "vocab_size": text_config.vocab_size,
            "width": text_config.hidden_size,
            "heads": text_config.num_attention_heads,
            "layers": text_config.num_hidden_layers,
            "mlp_ratio": text_config.intermediate_size / text_config.hidden_size,
        },
    }


def transformers_clip_config(config: HfClipConfig) -> CLIPConfig:
    """The transformers `CLIPConfig` of an hf_clip ViT config (same weights, same names).

    Raises `ValueError` for a ResNet image tower, which transformers' `CLIPModel` does not have.
    """
    text_config, vision_config = config.tower_configs()
    if vision_config.backbone != "vit":
        raise ValueError(
            f"transformers' CLIPModel has only a ViT image tower; this model's is {vision_config.backbone!r}. "
            "Publish it in hf_clip format (optionally with remote code) instead."
        )
    return CLIPConfig(
        text_config={name: getattr(text_config, name) for name in TRANSFORMERS_TEXT_FIELDS},
        vision_config={name: getattr(vision_config, name) for name in TRANSFORMERS_VISION_FIELDS},
        **{name: getattr(config, name) for name in TRANSFORMERS_JOINT_FIELDS},
    )
