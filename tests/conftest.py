"""Shared fixtures: tiny configurations for fast CPU tests, and deterministic inputs."""

import pytest
import torch
from transformers import CLIPConfig

from hf_clip import HfClipConfig

TINY_TEXT = {
    "vocab_size": 99,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 16,
    "projection_dim": 16,
    "bos_token_id": 97,
    "eos_token_id": 98,
    "pad_token_id": 0,
}
TINY_VIT = {
    "backbone": "vit",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 16,
}
TINY_RESNET = {
    "backbone": "resnet",
    "layers": [1, 1, 1, 1],
    "width": 8,
    "num_attention_heads": 4,
    "image_size": 64,
    "projection_dim": 16,
}


def tiny_config(vision: dict | None = None, **overrides) -> HfClipConfig:
    return HfClipConfig(
        text_config=dict(TINY_TEXT), vision_config=dict(vision or TINY_VIT), projection_dim=16, **overrides
    )


def tiny_clip_config() -> CLIPConfig:
    """transformers' CLIPConfig with the same tiny architecture as `tiny_config()` (the reference for parity)."""
    vision_config = {key: value for key, value in TINY_VIT.items() if key != "backbone"}
    return CLIPConfig(text_config=dict(TINY_TEXT), vision_config=vision_config, projection_dim=16)


def random_text(batch_size: int, seq_len: int, lengths: list[int] | None = None, seed: int = 0) -> dict:
    """BOS, random tokens, EOS at `lengths[i] - 1`, zero padding after it; with the matching attention mask."""
    generator = torch.Generator().manual_seed(seed)
    lengths = lengths or [seq_len] * batch_size
    input_ids = torch.randint(1, TINY_TEXT["bos_token_id"], (batch_size, seq_len), generator=generator)
    input_ids[:, 0] = TINY_TEXT["bos_token_id"]
    positions = torch.arange(seq_len)[None]
    ends = torch.tensor(lengths)[:, None] - 1
    input_ids = torch.where(positions == ends, TINY_TEXT["eos_token_id"], input_ids)
    input_ids = torch.where(positions > ends, 0, input_ids)
    return {"input_ids": input_ids, "attention_mask": (positions <= ends).long()}


@pytest.fixture
def tiny_vit_config() -> HfClipConfig:
    return tiny_config()
