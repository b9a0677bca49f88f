"""Configs: the published architecture files, equivalence with transformers' CLIPConfig, validation."""

import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT, TINY_VIT, tiny_clip_config, tiny_config
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import CLIPConfig, CLIPModel

from hf_clip import HfClipConfig, HfClipModel, HfClipTextConfig, HfClipVisionConfig

# Config validators raise ValueError; huggingface_hub's strict dataclasses re-raise it wrapped, message included.
CONFIG_ERRORS = (ValueError, StrictDataclassClassValidationError)
CONFIG_DIR = Path(__file__).resolve().parents[1] / "conversion" / "configs"

# (embed dim, resolution, vision layers, width, heads, patch, text width, text heads, parameters) from DESIGN §9,
# i.e. the OpenAI paper's Table 19 / 20 and the parameter counts of OpenAI's released checkpoints.
PUBLISHED_VITS = {
    "ViT-B-32": (512, 224, 12, 768, 12, 32, 512, 8, 151_277_313),
    "ViT-B-16": (512, 224, 12, 768, 12, 16, 512, 8, 149_620_737),
    "ViT-L-14": (768, 224, 24, 1024, 16, 14, 768, 12, 427_616_513),
    "ViT-L-14-336": (768, 336, 24, 1024, 16, 14, 768, 12, 427_944_193),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_VITS))
def test_published_config_describes_the_architecture(name: str) -> None:
    embed, resolution, layers, width, heads, patch, text_width, text_heads, _ = PUBLISHED_VITS[name]
    config = HfClipConfig.from_json_file(CONFIG_DIR / f"{name}.json")
    text, vision = config.text_config, config.vision_config
    assert isinstance(text, HfClipTextConfig) and isinstance(vision, HfClipVisionConfig)

    assert (config.projection_dim, text.projection_dim, vision.projection_dim) == (embed, embed, embed)
    assert config.logit_scale_init_value == pytest.approx(math.log(1 / 0.07), abs=1e-12)
    assert vision.backbone == "vit"
    assert (vision.image_size, vision.num_hidden_layers, vision.hidden_size) == (resolution, layers, width)
    assert (vision.num_attention_heads, vision.patch_size, vision.intermediate_size) == (heads, patch, 4 * width)
    assert (text.hidden_size, text.num_attention_heads) == (text_width, text_heads)
    assert text.intermediate_size == 4 * text_width
    assert (text.num_hidden_layers, text.max_position_embeddings, text.vocab_size) == (12, 77, 49408)
    assert (text.bos_token_id, text.eos_token_id) == (49406, 49407)
    for tower in (text, vision):
        assert tower.hidden_act == "quick_gelu"
        assert tower.layer_norm_eps == 1e-5


@pytest.mark.parametrize("name", sorted(PUBLISHED_VITS))
def test_published_config_parameter_count(name: str) -> None:
    config = HfClipConfig.from_json_file(CONFIG_DIR / f"{name}.json")
    with torch.device("meta"):
        model = HfClipModel(config)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_VITS[name][-1]


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
    published = HfClipConfig.from_json_file(CONFIG_DIR / "ViT-B-32.json")
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
