"""Configs: the published architectures, equivalence with transformers' CLIPConfig, validation."""

import math
from pathlib import Path

import open_clip
import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from open_clip.model import CLIP
from transformers import CLIPConfig, CLIPModel

from hf_clip import HfClipConfig, HfClipModel, HfClipTextConfig, HfClipVisionConfig
from hf_clip.foreign_configs import open_clip_model_cfg, transformers_clip_config
from hf_clip.testing_utils import TINY_TEXT, TINY_VIT, tiny_clip_config, tiny_config

# Config validators raise ValueError; huggingface_hub's strict dataclasses re-raise it wrapped, message included.
CONFIG_ERRORS = (ValueError, StrictDataclassClassValidationError)

# Parameter counts of OpenAI's released checkpoints.
PUBLISHED_PARAMETERS = {
    "RN50": 102_007_137,
    "RN101": 119_688_033,
    "RN50x4": 178_300_601,
    "RN50x16": 290_979_217,
    "RN50x64": 623_258_305,
    "ViT-B-32": 151_277_313,
    "ViT-B-16": 149_620_737,
    "ViT-L-14": 427_616_513,
    "ViT-L-14-336": 427_944_193,
}
# (embed dim, resolution, vision layers, width, heads, patch, text width, text heads): the OpenAI paper's Tables 19
# and 20.
PUBLISHED_VITS = {
    "ViT-B-32": (512, 224, 12, 768, 12, 32, 512, 8),
    "ViT-B-16": (512, 224, 12, 768, 12, 16, 512, 8),
    "ViT-L-14": (768, 224, 24, 1024, 16, 14, 768, 12),
    "ViT-L-14-336": (768, 336, 24, 1024, 16, 14, 768, 12),
}
# (embed dim, resolution, blocks per stage, stem width, text width, text heads), from the same tables.
PUBLISHED_RESNETS = {
    "RN50": (1024, 224, [3, 4, 6, 3], 64, 512, 8),
    "RN101": (512, 224, [3, 4, 23, 3], 64, 512, 8),
    "RN50x4": (640, 288, [4, 6, 10, 6], 80, 640, 10),
    "RN50x16": (768, 384, [6, 8, 18, 8], 96, 768, 12),
    "RN50x64": (1024, 448, [3, 15, 36, 10], 128, 1024, 16),
}


def test_the_package_ships_exactly_the_nine_published_architectures() -> None:
    assert HfClipConfig.architecture_names() == sorted(PUBLISHED_PARAMETERS)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_published_architecture_parameter_count(name: str) -> None:
    config = HfClipConfig.from_architecture(name)
    assert isinstance(config, HfClipConfig)
    with torch.device("meta"):
        model = HfClipModel(config)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]


def test_unknown_architecture_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="no published architecture named 'ViT-B-64'") as error:
        HfClipConfig.from_architecture("ViT-B-64")
    assert all(name in str(error.value) for name in PUBLISHED_PARAMETERS)
    # A name is a name, never a path into (or out of) the package's folder.
    with pytest.raises(ValueError, match="no published architecture"):
        HfClipConfig.from_architecture("../architectures/ViT-B-32")


def _assert_openai_text_tower(text: HfClipTextConfig, width: int, heads: int) -> None:
    assert (text.hidden_size, text.num_attention_heads, text.intermediate_size) == (width, heads, 4 * width)
    assert (text.num_hidden_layers, text.max_position_embeddings, text.vocab_size) == (12, 77, 49408)
    assert (text.bos_token_id, text.eos_token_id) == (49406, 49407)
    assert text.hidden_act == "quick_gelu" and text.layer_norm_eps == 1e-5


@pytest.mark.parametrize("name", sorted(PUBLISHED_VITS))
def test_published_vit_describes_the_architecture(name: str) -> None:
    embed, resolution, layers, width, heads, patch, text_width, text_heads = PUBLISHED_VITS[name]
    config = HfClipConfig.from_architecture(name)
    text, vision = config.tower_configs()
    assert (config.projection_dim, text.projection_dim, vision.projection_dim) == (embed, embed, embed)
    assert config.logit_scale_init_value == pytest.approx(math.log(1 / 0.07), abs=1e-12)
    assert vision.backbone == "vit"
    assert (vision.image_size, vision.num_hidden_layers, vision.hidden_size) == (resolution, layers, width)
    assert (vision.num_attention_heads, vision.patch_size, vision.intermediate_size) == (heads, patch, 4 * width)
    assert vision.hidden_act == "quick_gelu" and vision.layer_norm_eps == 1e-5
    _assert_openai_text_tower(text, text_width, text_heads)


@pytest.mark.parametrize("name", sorted(PUBLISHED_RESNETS))
def test_published_resnet_describes_the_architecture(name: str) -> None:
    embed, resolution, layers, width, text_width, text_heads = PUBLISHED_RESNETS[name]
    config = HfClipConfig.from_architecture(name)
    text, vision = config.tower_configs()
    assert (config.projection_dim, text.projection_dim, vision.projection_dim) == (embed, embed, embed)
    assert vision.backbone == "resnet"
    assert (vision.image_size, vision.layers, vision.width) == (resolution, layers, width)
    # The attention pool has width * 32 / 64 heads in every published ResNet.
    assert vision.num_attention_heads == width * 32 // 64
    _assert_openai_text_tower(text, text_width, text_heads)


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_open_clip_model_cfg_builds_open_clip_s_own_architecture(name: str) -> None:
    """open_clip's `<name>-quickgelu` config and the translated one build models with the same tensors."""
    with torch.device("meta"):
        ours = CLIP(**open_clip_model_cfg(HfClipConfig.from_architecture(name)))
        reference = CLIP(**open_clip.get_model_config(f"{name}-quickgelu"))
    assert _shapes(ours) == _shapes(reference)
    # The activation holds no weights: compare the modules (QuickGELU for every published model).
    assert type(ours.transformer.resblocks[0].mlp.gelu) is type(reference.transformer.resblocks[0].mlp.gelu)


@pytest.mark.parametrize("name", sorted(PUBLISHED_VITS))
def test_transformers_clip_config_builds_the_same_tensors(name: str) -> None:
    config = HfClipConfig.from_architecture(name)
    clip_config = transformers_clip_config(config)
    with torch.device("meta"):
        assert _shapes(CLIPModel(clip_config)) == _shapes(HfClipModel(config))
    assert clip_config.text_config.hidden_act == clip_config.vision_config.hidden_act == "quick_gelu"
    assert clip_config.text_config.eos_token_id == 49407


def test_foreign_configs_refuse_what_the_other_library_cannot_build() -> None:
    with pytest.raises(ValueError, match="only a ViT image tower"):
        transformers_clip_config(HfClipConfig.from_architecture("RN50"))
    config = tiny_config()
    config.text_config.layer_norm_eps = 1e-6
    with pytest.raises(ValueError, match="LayerNorm eps"):
        open_clip_model_cfg(config)


def test_config_from_transformers_clip_config_builds_the_same_architecture() -> None:
    clip_config = tiny_clip_config()
    config = HfClipConfig.from_dict(clip_config.to_dict())
    assert config.model_type == config.to_dict()["model_type"] == "hf_clip"
    assert config.text_config.model_type == "hf_clip_text_model"
    assert config.vision_config.backbone == "vit"
    with torch.device("meta"):
        ours = HfClipModel(config).state_dict()
        reference = CLIPModel(clip_config).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}


def test_default_transformers_clip_config_is_vit_b_32() -> None:
    """transformers' CLIPConfig defaults are OpenAI's ViT-B/32: the converted config equals our published file."""
    converted = HfClipConfig.from_dict(CLIPConfig().to_dict())
    published = HfClipConfig.from_architecture("ViT-B-32")
    architecture_fields = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "hidden_act",
        "layer_norm_eps",
        "projection_dim",
    )
    for field in (*architecture_fields, "vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(converted.text_config, field) == getattr(published.text_config, field), field
    for field in (*architecture_fields, "image_size", "patch_size", "num_channels", "backbone"):
        assert getattr(converted.vision_config, field) == getattr(published.vision_config, field), field
    assert converted.projection_dim == published.projection_dim
    # transformers stores ln(1/0.07) rounded to 2.6592.
    assert converted.logit_scale_init_value == pytest.approx(published.logit_scale_init_value, abs=1e-4)


def test_config_save_and_load_round_trip(tmp_path: Path) -> None:
    config = tiny_config()
    config.save_pretrained(tmp_path)
    loaded = HfClipConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert isinstance(loaded.text_config, HfClipTextConfig)
    assert isinstance(loaded.vision_config, HfClipVisionConfig)


def test_defaults_are_the_paper_values() -> None:
    config = HfClipConfig()
    assert config.logit_scale_init_value == pytest.approx(math.log(1 / 0.07))
    assert config.text_config.hidden_act == config.vision_config.hidden_act == "quick_gelu"
    assert config.vision_config.backbone == "vit"


@pytest.mark.parametrize(
    ("text", "vision", "message"),
    [
        ({"hidden_size": 30}, {}, "num_attention_heads"),
        ({"eos_token_id": 99}, {}, "eos_token_id"),
        ({}, {"hidden_size": 30}, "num_attention_heads"),
        ({}, {"image_size": 36}, "multiple of patch_size"),
        ({}, {"backbone": "convnext"}, "backbone"),
        ({}, {"layers": [1, 1, 1, 1]}, "ResNet field"),
    ],
)
def test_invalid_config_raises_a_clear_error(text: dict, vision: dict, message: str) -> None:
    with pytest.raises(CONFIG_ERRORS, match=message):
        HfClipConfig(text_config={**TINY_TEXT, **text}, vision_config={**TINY_VIT, **vision})


def test_resnet_config_needs_four_stages() -> None:
    with pytest.raises(CONFIG_ERRORS, match="four positive block counts"):
        HfClipVisionConfig(backbone="resnet", layers=[3, 4, 6], width=64, num_attention_heads=32, image_size=224)
