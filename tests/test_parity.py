"""Numerical parity (fp32, atol 1e-5) against the references: transformers' CLIPModel and open_clip's OpenAI CLIP.

Weights are random and every parameter (LayerNorm gains, biases included) is perturbed, so a swapped q/k, a lost bias
or a wrong activation cannot hide behind OpenAI's ones/zeros initialisation.
"""

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from torch import nn
from transformers import CLIPModel

from conversion.key_mappings import OPENAI_METADATA_KEYS, hf_clip_to_openai, openai_to_hf_clip
from hf_clip import HfClipConfig, HfClipModel
from hf_clip.synthetic import random_captions
from hf_clip.testing_utils import TINY_TEXT, TINY_VIT, random_text, tiny_clip_config, tiny_config

ATOL = 1e-5
# Three captions of different lengths (full, short, very short) so padding and per-row EOS pooling are exercised.
TEXT_LENGTHS = [16, 9, 3]


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def perturb_parameters(model: nn.Module, seed: int = 0, scale: float = 0.05, max_dims: int = 4) -> None:
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        if parameter.ndim <= max_dims:
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def random_pixels(batch_size: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))


def transformers_pair(attn_implementation: str) -> tuple[HfClipModel, CLIPModel]:
    torch.manual_seed(0)
    model = HfClipModel(tiny_config())
    perturb_parameters(model)
    reference = CLIPModel(tiny_clip_config())
    reference.load_state_dict(model.state_dict(), strict=True)
    model.set_attn_implementation(attn_implementation)
    reference.set_attn_implementation(attn_implementation)
    return model.eval(), reference.eval()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@torch.no_grad()
def test_matches_transformers_clip_model(attn_implementation: str) -> None:
    model, reference = transformers_pair(attn_implementation)
    text = random_text(3, 16, TEXT_LENGTHS)
    inputs = {**text, "pixel_values": random_pixels(3, TINY_VIT["image_size"]), "output_hidden_states": True}
    ours, theirs = model(**inputs, return_loss=True), reference(**inputs, return_loss=True)

    for field in ("loss", "logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        assert_close(getattr(ours, field), getattr(theirs, field))
    for tower in ("text_model_output", "vision_model_output"):
        ours_tower, theirs_tower = getattr(ours, tower), getattr(theirs, tower)
        # Every position of the padded text rows, padding included: both mask padded keys the same way.
        assert_close(ours_tower.last_hidden_state, theirs_tower.last_hidden_state)
        assert_close(ours_tower.pooler_output, theirs_tower.pooler_output)
        assert len(ours_tower.hidden_states) == len(theirs_tower.hidden_states) == 3
        for ours_state, theirs_state in zip(ours_tower.hidden_states, theirs_tower.hidden_states, strict=True):
            assert_close(ours_state, theirs_state)


@torch.no_grad()
def test_attention_maps_match_transformers() -> None:
    model, reference = transformers_pair("eager")
    text = random_text(3, 16, TEXT_LENGTHS)
    inputs = {**text, "pixel_values": random_pixels(3, TINY_VIT["image_size"]), "output_attentions": True}
    ours, theirs = model(**inputs), reference(**inputs)
    for tower in ("text_model_output", "vision_model_output"):
        ours_maps, theirs_maps = getattr(ours, tower).attentions, getattr(theirs, tower).attentions
        assert len(ours_maps) == len(theirs_maps) == 2
        for ours_map, theirs_map in zip(ours_maps, theirs_maps, strict=True):
            assert_close(ours_map, theirs_map)


@torch.no_grad()
def test_feature_methods_match_transformers() -> None:
    model, reference = transformers_pair("sdpa")
    text = random_text(3, 16, TEXT_LENGTHS)
    pixels = random_pixels(3, TINY_VIT["image_size"])
    assert_close(model.get_text_features(**text).pooler_output, reference.get_text_features(**text).pooler_output)
    assert_close(model.get_image_features(pixels).pooler_output, reference.get_image_features(pixels).pooler_output)


@torch.no_grad()
def test_interpolated_positions_match_transformers() -> None:
    model, reference = transformers_pair("sdpa")
    text = random_text(2, 16, [16, 5])
    # 48 px with 8-px patches: a 6x6 grid from the trained 4x4 one.
    inputs = {**text, "pixel_values": random_pixels(2, 48), "interpolate_pos_encoding": True}
    ours, theirs = model(**inputs), reference(**inputs)
    assert_close(ours.image_embeds, theirs.image_embeds)
    assert_close(ours.logits_per_image, theirs.logits_per_image)
    assert ours.vision_model_output.last_hidden_state.shape[1] == 6 * 6 + 1


def open_clip_inputs(batch_size: int, context: int, vocab_size: int, image_size: int) -> dict[str, torch.Tensor]:
    """Padded text whose EOS is the highest id (open_clip pools at argmax(ids)), from full length down to 3 tokens,
    with images."""
    input_ids, attention_mask = random_captions(
        batch_size,
        context,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        lengths=torch.linspace(context, 3, batch_size).long(),
        generator=torch.Generator().manual_seed(1),
    )
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": random_pixels(batch_size, image_size, seed=2),
    }


@torch.no_grad()
def assert_matches_open_clip(reference: CLIP, config: HfClipConfig, inputs: dict[str, torch.Tensor]) -> None:
    model = HfClipModel(config).eval()
    model.load_state_dict(openai_to_hf_clip(reference.state_dict(), config), strict=True)
    # open_clip applies only its causal mask and ignores padding; the causal tower makes EOS features independent
    # of what follows, so the pooled features still agree.
    reference_image = reference.encode_image(inputs["pixel_values"])
    reference_text = reference.encode_text(inputs["input_ids"])
    # open_clip's forward: normalised features, scaled by exp(logit_scale).
    image_features = nn.functional.normalize(reference_image, dim=-1)
    text_features = nn.functional.normalize(reference_text, dim=-1)
    reference_logits_per_image = reference.logit_scale.exp() * image_features @ text_features.t()

    output = model(**inputs)
    # The towers' pooler_output is the projected, un-normalised embedding (get_*_features).
    assert_close(output.vision_model_output.pooler_output, reference_image)
    assert_close(output.text_model_output.pooler_output, reference_text)
    assert_close(output.image_embeds, image_features)
    assert_close(output.text_embeds, text_features)
    assert_close(output.logits_per_image, reference_logits_per_image)
    assert_close(output.logits_per_text, reference_logits_per_image.t())


def test_matches_open_clip_tiny() -> None:
    text_cfg = CLIPTextCfg(context_length=16, vocab_size=99, width=32, heads=4, layers=2, mlp_ratio=2.0)
    vision_cfg = CLIPVisionCfg(layers=2, width=32, head_width=8, mlp_ratio=2.0, patch_size=8, image_size=32)
    torch.manual_seed(0)
    reference = CLIP(embed_dim=16, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=True).eval()
    perturb_parameters(reference)
    inputs = open_clip_inputs(4, context=16, vocab_size=99, image_size=32)
    assert_matches_open_clip(reference, tiny_config(), inputs)


def test_matches_open_clip_vit_b_32_full_size() -> None:
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
    # open_clip's init already randomises the matrices; perturb the ones/zeros (gains, biases) cheaply.
    perturb_parameters(reference, max_dims=1)
    config = HfClipConfig.from_architecture("ViT-B-32")
    inputs = open_clip_inputs(2, context=77, vocab_size=49408, image_size=224)
    assert_matches_open_clip(reference, config, inputs)


def tiny_open_clip_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = HfClipModel(tiny_config())
    return hf_clip_to_openai(model.state_dict(), model.config)


def test_key_mapping_round_trip_is_exact() -> None:
    config = tiny_config()
    torch.manual_seed(0)
    state_dict = HfClipModel(config).state_dict()
    openai_state_dict = hf_clip_to_openai(state_dict, config)
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in openai_state_dict
    assert openai_state_dict["visual.proj"].shape == (TINY_VIT["hidden_size"], 16)
    back = openai_to_hf_clip(openai_state_dict, config)
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert torch.equal(back[key], value), key


def test_key_mapping_drops_openai_metadata() -> None:
    state_dict = tiny_open_clip_state_dict()
    with_metadata = {**state_dict, **{key: torch.tensor(0) for key in OPENAI_METADATA_KEYS}}
    expected = openai_to_hf_clip(state_dict, tiny_config())
    assert openai_to_hf_clip(with_metadata, tiny_config()).keys() == expected.keys()


def test_key_mapping_rejects_unmapped_and_missing_keys() -> None:
    state_dict = tiny_open_clip_state_dict()
    with pytest.raises(ValueError, match=r"have no mapping: \['visual.attnpool.c_proj.weight'\]"):
        openai_to_hf_clip({**state_dict, "visual.attnpool.c_proj.weight": torch.zeros(1)}, tiny_config())
    # A checkpoint with more blocks than the config says leaves the extra block unmapped.
    with pytest.raises(ValueError, match=r"transformer\.resblocks\.1\."):
        shallow_text = HfClipConfig(text_config={**TINY_TEXT, "num_hidden_layers": 1}, vision_config=dict(TINY_VIT))
        openai_to_hf_clip(state_dict, shallow_text)
    del state_dict["ln_final.bias"]
    with pytest.raises(KeyError, match=r"ln_final\.bias"):
        openai_to_hf_clip(state_dict, tiny_config())


def test_key_mapping_names_an_unknown_backbone() -> None:
    config = tiny_config()
    config.vision_config.backbone = "convnext"
    with pytest.raises(ValueError, match="no key mapping for vision backbone 'convnext'"):
        openai_to_hf_clip(tiny_open_clip_state_dict(), config)
