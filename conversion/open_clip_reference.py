"""open_clip as the reference implementation: its model config → `HfClipConfig`, and its model's outputs.

OpenAI's checkpoints and open_clip's `-quickgelu` models share one layout (open_clip's `CLIP` class), so open_clip
is the oracle every OpenAI-layout conversion is checked against. Only the subset of open_clip's options that
describes OpenAI's architecture converts; any other option set in a config is refused by name. The other direction,
`HfClipConfig` → open_clip model config, is `hf_clip.foreign_configs.open_clip_model_cfg`.
"""

import dataclasses
from typing import Any

import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from hf_clip import HfClipConfig
from hf_clip.modeling_hf_clip import LOGIT_SCALE_MAX

from .checks import ParityInputs, load_strict, logits_from_features

# open_clip options either tower has that change the architecture away from OpenAI's; each must keep its default.
TOWER_FIXED_FIELDS = (
    "ls_init_value",
    "final_ln_after_pool",
    "pool_type",
    "act_kwargs",
    "norm_kwargs",
    "block_type",
    "qk_norm",
    "scaled_cosine_attn",
    "scale_heads",
    "scale_attn_inner",
    "scale_attn",
    "scale_fc",
)
VISION_FIXED_FIELDS = (*TOWER_FIXED_FIELDS, "attentional_pool", "no_ln_pre", "pos_embed_type", "timm_model_name")
TEXT_FIXED_FIELDS = (*TOWER_FIXED_FIELDS, "embed_cls", "no_causal_mask", "proj_bias", "proj_type", "hf_model_name")
# Model-level keys open_clip's `CLIP` accepts and that describe OpenAI's architecture at these values.
MODEL_FIXED_VALUES: dict[str, Any] = {"custom_text": False, "init_logit_bias": None, "nonscalar_logit_scale": False}


def _check_fixed(cfg: Any, defaults: Any, fields: tuple[str, ...], where: str) -> None:
    changed = [name for name in fields if getattr(cfg, name) != getattr(defaults, name)]
    if changed:
        raise ValueError(
            f"open_clip {where} sets {changed}, which OpenAI's CLIP architecture (and hf_clip) does not have; "
            "only OpenAI-layout open_clip models convert."
        )


def hf_clip_config_from_open_clip(model_cfg: dict[str, Any]) -> HfClipConfig:
    """The `HfClipConfig` of an open_clip model config (`model_cfg` of `open_clip_config.json` or a named config)."""
    unknown = {key: value for key, value in model_cfg.items() if key in MODEL_FIXED_VALUES}
    for key, value in unknown.items():
        if value != MODEL_FIXED_VALUES[key]:
            raise ValueError(f"open_clip model config sets {key}={value!r}; only OpenAI-layout models convert.")
    vision = CLIPVisionCfg(**model_cfg["vision_cfg"])
    text = CLIPTextCfg(**model_cfg["text_cfg"])
    _check_fixed(vision, CLIPVisionCfg(), VISION_FIXED_FIELDS, "vision_cfg")
    _check_fixed(text, CLIPTextCfg(), TEXT_FIXED_FIELDS, "text_cfg")
    activation = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    embed_dim = model_cfg["embed_dim"]

    text_config = {
        "vocab_size": text.vocab_size,
        "hidden_size": text.width,
        "intermediate_size": int(text.width * text.mlp_ratio),
        "num_hidden_layers": text.layers,
        "num_attention_heads": text.heads,
        "max_position_embeddings": text.context_length,
        "projection_dim": embed_dim,
        "hidden_act": activation,
        # open_clip pools at the highest token id: the end-of-text token must be the last vocabulary entry.
        "eos_token_id": text.vocab_size - 1,
        "bos_token_id": text.vocab_size - 2,
        "pad_token_id": text.pad_id,
    }
    vision_config: dict[str, Any] = {"image_size": _square(vision.image_size), "projection_dim": embed_dim}
    if isinstance(vision.layers, (tuple, list)):
        vision_config.update(
            backbone="resnet",
            layers=list(vision.layers),
            width=vision.width,
            num_attention_heads=vision.width * 32 // vision.head_width,
        )
    else:
        vision_config.update(
            backbone="vit",
            hidden_size=vision.width,
            intermediate_size=int(vision.width * vision.mlp_ratio),
            num_hidden_layers=vision.layers,
            num_attention_heads=vision.width // vision.head_width,
            patch_size=vision.patch_size,
            hidden_act=activation,
        )
    return HfClipConfig(text_config=text_config, vision_config=vision_config, projection_dim=embed_dim)


def _square(image_size: int | tuple[int, int] | list[int]) -> int:
    if isinstance(image_size, int):
        return image_size
    height, width = image_size
    if height != width:
        raise ValueError(f"hf_clip models take square images; the open_clip config says {image_size}.")
    return height


def build_open_clip_model(model_cfg: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> CLIP:
    """An fp32 open_clip `CLIP` in eval mode holding `state_dict` (loaded strictly)."""
    arguments = {key: value for key, value in model_cfg.items() if key not in MODEL_FIXED_VALUES}
    known = {field.name for field in dataclasses.fields(CLIPVisionCfg)}
    arguments["vision_cfg"] = {key: value for key, value in model_cfg["vision_cfg"].items() if key in known}
    model = CLIP(**arguments)
    load_strict(model, {key: value.float() for key, value in state_dict.items()}, "open_clip reference")
    return model.float().eval()


@torch.no_grad()
def open_clip_outputs(model: CLIP, inputs: ParityInputs) -> dict[str, torch.Tensor]:
    """open_clip's un-normalised features and logits for `inputs` (open_clip takes no attention mask: it is causal
    and pools at the highest token id, so the padding after EOS cannot change the result)."""
    image_features = model.encode_image(inputs.pixel_values)
    text_features = model.encode_text(inputs.input_ids)
    logits = logits_from_features(image_features, text_features, model.logit_scale)
    if model.logit_scale.item() <= LOGIT_SCALE_MAX:
        logits = model.get_logits(inputs.pixel_values, inputs.input_ids)[0]
    return {"image_features": image_features, "text_features": text_features, "logits_per_image": logits}
