"""Which published architecture a config describes: the fields that shape the weights, compared field by field.

Converters name a checkpoint's architecture (for the model card and the console) by comparing the config read from
its weights with each of hf_clip's published architectures (`HfClipConfig.from_architecture`). Initialisation,
dropout and token ids do not shape the weights, so they are not compared.
"""

from typing import Any

from hf_clip import HfClipConfig
from hf_clip.foreign_configs import TRANSFORMER_ARCHITECTURE_FIELDS

TEXT_ARCHITECTURE_FIELDS = (*TRANSFORMER_ARCHITECTURE_FIELDS, "vocab_size", "max_position_embeddings")
VIT_ARCHITECTURE_FIELDS = ("backbone", *TRANSFORMER_ARCHITECTURE_FIELDS, "image_size", "patch_size")
RESNET_ARCHITECTURE_FIELDS = ("backbone", "layers", "width", "num_attention_heads", "image_size", "projection_dim")


def architecture_of(config: HfClipConfig) -> dict[str, Any]:
    """The fields of `config` that shape the weights and the computation, as a comparable (and printable) dict."""
    text_config, vision_config = config.tower_configs()
    vision_fields = VIT_ARCHITECTURE_FIELDS if vision_config.backbone == "vit" else RESNET_ARCHITECTURE_FIELDS
    return {
        "projection_dim": config.projection_dim,
        "text": {name: getattr(text_config, name) for name in TEXT_ARCHITECTURE_FIELDS},
        "vision": {name: getattr(vision_config, name) for name in vision_fields},
    }


def published_architecture(config: HfClipConfig) -> str | None:
    """The name of the published architecture equal to `config`'s (`HfClipConfig.from_architecture(name)`), or None
    for a custom one."""
    wanted = architecture_of(config)
    for name in HfClipConfig.architecture_names():
        if architecture_of(HfClipConfig.from_architecture(name)) == wanted:
            return name
    return None
