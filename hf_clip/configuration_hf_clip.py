"""Configurations for hf_clip: text tower, image tower (ViT or modified ResNet) and the joint model.

Fields shared with transformers' `CLIPTextConfig` / `CLIPVisionConfig` keep transformers' names, so a `CLIPConfig`
dictionary builds the equivalent `HfClipConfig`. OpenAI's published architectures ship as JSON files in the package
(`hf_clip/architectures/`) and load by name: `HfClipConfig.from_architecture("ViT-B-32")`.
"""

import dataclasses
import importlib.resources
import json
import logging
import math
from difflib import get_close_matches
from typing import Any, TypeVar

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

BACKBONES = ("vit", "resnet")
# Package data: one `<name>.json` per published architecture, in this folder of the installed hf_clip package.
ARCHITECTURES_PACKAGE = "hf_clip"
ARCHITECTURES_FOLDER = "architectures"
ARCHITECTURE_SUFFIX = ".json"

SubConfig = TypeVar("SubConfig", bound=PreTrainedConfig)
# Keys a saved config.json carries besides the dataclass fields (what `to_dict` adds, and a remote-code export's map).
SAVED_KEYS = {"_name_or_path", "model_type", "output_attentions", "auto_map"}

logger = logging.getLogger(__name__)


def _check_positive(tower: str, config: PreTrainedConfig, names: tuple[str, ...]) -> None:
    """Sizes are positive integers (a zero or negative one would only fail deep inside torch)."""
    bad = {name: getattr(config, name) for name in names if getattr(config, name) <= 0}
    if bad:
        raise ValueError(f"{tower} config sizes must be positive, got {bad}.")


@strict
class HfClipTowerConfig(PreTrainedConfig):
    """The fields both towers share, under the names transformers' CLIP tower configs give them.

    Each tower declares its own widths; the rest defaults to OpenAI's values for every published model.
    """

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    projection_dim: int = 512
    num_hidden_layers: int = 12
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0

    def _check_heads_divide_width(self, tower: str) -> None:
        """A transformer splits `hidden_size` evenly between its attention heads."""
        _check_positive(tower, self, ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers"))
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"{tower} hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )


@strict
class HfClipTextConfig(HfClipTowerConfig):
    """Causal text transformer pooled at the first end-of-text token."""

    model_type = "hf_clip_text_model"
    base_config_key = "text_config"

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    # OpenAI pads with 0; transformers' CLIP configs say 1. Features do not depend on it (causal tower, EOS pooling).
    pad_token_id: int | None = 0
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407

    def validate_architecture(self) -> None:
        _check_positive("text", self, ("vocab_size", "max_position_embeddings", "projection_dim", "layer_norm_eps"))
        self._check_heads_divide_width("text")
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(
                f"text eos_token_id ({self.eos_token_id}) must be an id below vocab_size ({self.vocab_size})."
            )


@strict
class HfClipVisionConfig(HfClipTowerConfig):
    """Image tower. `backbone="vit"` is the paper's ViT; `backbone="resnet"` its modified ResNet.

    ResNet fields: `layers` (bottleneck blocks per stage, four stages), `width` (stem width; stage i has
    `width * 2**i` channels, the final feature map `width * 32`), and `num_attention_heads` (heads of the attention
    pool, `width * 32 / 64` in every published model). ViT fields follow transformers' `CLIPVisionConfig`, plus
    `patch_dropout`, a training option (FLIP) that leaves the weights and the eval-mode model unchanged.
    """

    model_type = "hf_clip_vision_model"
    base_config_key = "vision_config"

    backbone: str = "vit"
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    layers: list[int] | None = None
    width: int = 64
    # FLIP (Li et al. 2023): the fraction of a ViT's patch tokens dropped per image in training (0: none).
    patch_dropout: float = 0.0

    def validate_architecture(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"vision backbone must be one of {BACKBONES}, got {self.backbone!r}.")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(
                f"patch_dropout is the fraction of patches dropped: 0 <= p < 1, got {self.patch_dropout}."
            )
        _check_positive("vision", self, ("num_channels", "image_size", "projection_dim", "layer_norm_eps"))
        if self.patch_dropout > 0 and self.backbone != "vit":
            raise ValueError(f"patch_dropout drops ViT patch tokens; a {self.backbone!r} image tower has none.")
        if self.backbone == "vit":
            if self.layers is not None:
                raise ValueError("`layers` is a ResNet field; a ViT is sized by num_hidden_layers.")
            self._check_heads_divide_width("vision")
            _check_positive("vision", self, ("patch_size",))
            if self.image_size % self.patch_size != 0:
                raise ValueError(
                    f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})."
                )
        else:
            if self.layers is None or len(self.layers) != 4 or any(n < 1 for n in self.layers):
                raise ValueError(f"a ResNet needs `layers`: four positive block counts, got {self.layers}.")
            _check_positive("vision", self, ("width", "num_attention_heads"))
            if (self.width * 32) % self.num_attention_heads != 0:
                raise ValueError(
                    f"ResNet feature width ({self.width * 32} = width * 32) must be a multiple of the attention-pool "
                    f"heads ({self.num_attention_heads})."
                )
            if self.image_size % 32 != 0:
                raise ValueError(
                    f"a ResNet downsamples by 32: image_size ({self.image_size}) must be a multiple of 32."
                )


@strict
class HfClipConfig(PreTrainedConfig):
    """Joint CLIP configuration: a text config, a vision config and the shared embedding size.

    `logit_bias_init_value` makes a SigLIP model (Zhai et al. 2023): a learned logit bias added to the scaled
    similarities, and the sigmoid loss instead of the softmax one. `None` (CLIP) leaves the model without the bias.
    """

    model_type = "hf_clip"
    sub_configs = {"text_config": HfClipTextConfig, "vision_config": HfClipVisionConfig}

    text_config: dict | HfClipTextConfig | None = None
    vision_config: dict | HfClipVisionConfig | None = None
    projection_dim: int = 512
    # ln(1 / 0.07): the paper's initial temperature.
    logit_scale_init_value: float = math.log(1 / 0.07)
    # Set, the model has a learned logit bias and trains with the sigmoid loss (SigLIP: scale ln 10, bias -10).
    logit_bias_init_value: float | None = None
    initializer_factor: float = 1.0

    def __post_init__(self, **kwargs) -> None:
        self.text_config = _sub_config(HfClipTextConfig, self.text_config)
        self.vision_config = _sub_config(HfClipVisionConfig, self.vision_config)
        # A transformers `CLIPConfig` dict says model_type "clip"; kept, it would shadow the class attribute.
        kwargs.pop("model_type", None)
        super().__post_init__(**kwargs)

    def validate_architecture(self) -> None:
        _check_positive("joint", self, ("projection_dim",))
        vision_config = self.vision_config
        # The ResNet's attention pool projects into the joint space itself, so both sizes must be the same number.
        if (
            isinstance(vision_config, HfClipVisionConfig)
            and vision_config.backbone == "resnet"
            and vision_config.projection_dim != self.projection_dim
        ):
            raise ValueError(
                f"a ResNet's attention pool outputs vision_config.projection_dim ({vision_config.projection_dim}), "
                f"which must equal projection_dim ({self.projection_dim})."
            )

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """transformers' `from_dict` (behind `from_pretrained`), warning about keys this version does not know: a
        folder saved by a newer version loads (the extra keys stay attributes, unused); a user-written
        architecture goes through the strict `from_user_dict` instead."""
        unknown = unknown_config_keys(config_dict)
        if unknown:
            logger.warning("config keys this version of hf_clip does not use (a newer version's?): %s", unknown)
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_user_dict(cls, values: dict[str, Any]) -> "HfClipConfig":
        """An architecture a user wrote (a JSON file): an unknown or misspelt key, at the top or in a tower, is an
        error naming it, since it would otherwise be ignored and train a default-sized tower."""
        unknown = unknown_config_keys(values)
        if unknown:
            hints = []
            for name in unknown:
                tower, _, key = name.rpartition(".")
                known = known_keys(cls.sub_configs[tower] if tower else cls)
                hints += [
                    f"{name} -> {tower + '.' if tower else ''}{match}?" for match in get_close_matches(key, known, 1)
                ]
            raise ValueError(
                f"unknown model config keys {unknown}{' (' + ', '.join(hints) + ')' if hints else ''}: no field of "
                "HfClipConfig, its text_config (HfClipTextConfig) or vision_config (HfClipVisionConfig) reads them."
            )
        return cls.from_dict(values)

    def tower_configs(self) -> tuple[HfClipTextConfig, HfClipVisionConfig]:
        """`(text_config, vision_config)`, typed: `__post_init__` turns both fields into config objects (the field
        annotations also admit the dicts and None that construction accepts)."""
        text_config, vision_config = self.text_config, self.vision_config
        if not isinstance(text_config, HfClipTextConfig) or not isinstance(vision_config, HfClipVisionConfig):
            raise TypeError("text_config and vision_config must be HfClipTextConfig and HfClipVisionConfig objects.")
        return text_config, vision_config

    @classmethod
    def from_architecture(cls, name: str) -> "HfClipConfig":
        """One of OpenAI's published CLIP architectures by name ("RN50" … "ViT-L-14-336", see
        `architecture_names()`): the configuration its released weights load into.

        The JSON is read from the installed package, so this works from a wheel as from a checkout. (A remote-code
        copy of this module, which ships without the package data, imports fine but has no architectures to read.)
        """
        names = cls.architecture_names()
        if name not in names:
            raise ValueError(f"no published architecture named {name!r}; the known names are {', '.join(names)}.")
        path = importlib.resources.files(ARCHITECTURES_PACKAGE) / ARCHITECTURES_FOLDER / (name + ARCHITECTURE_SUFFIX)
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    @staticmethod
    def architecture_names() -> list[str]:
        """The names `from_architecture` accepts, sorted: OpenAI's nine published CLIP models."""
        folder = importlib.resources.files(ARCHITECTURES_PACKAGE) / ARCHITECTURES_FOLDER
        return sorted(
            entry.name.removesuffix(ARCHITECTURE_SUFFIX)
            for entry in folder.iterdir()
            if entry.name.endswith(ARCHITECTURE_SUFFIX)
        )


def known_keys(config_class: type[PreTrainedConfig]) -> list[str]:
    return sorted({field.name for field in dataclasses.fields(config_class)} | SAVED_KEYS)


def unknown_config_keys(values: dict[str, Any]) -> list[str]:
    """The keys of an `HfClipConfig` dict (top level, `text_config.*`, `vision_config.*`) no config field reads."""
    unknown = sorted(set(values) - set(known_keys(HfClipConfig)))
    for key, config_class in HfClipConfig.sub_configs.items():
        if isinstance(values.get(key), dict):
            unknown += [f"{key}.{name}" for name in sorted(set(values[key]) - set(known_keys(config_class)))]
    return unknown


def _sub_config(config_class: type[SubConfig], value: dict | SubConfig | None) -> SubConfig:
    """`value` as a `config_class` object: None gives the defaults; a dict (a transformers `CLIPConfig`'s too, whose
    own `model_type` is dropped: the hf_clip sub-config sets its own) is parsed."""
    if value is None:
        return config_class()
    if isinstance(value, dict):
        return config_class(**{key: item for key, item in value.items() if key != "model_type"})
    return value
