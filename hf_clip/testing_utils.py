"""Tiny configurations and reference objects for fast CPU tests (as `transformers.testing_utils` is for
transformers): the package's tests import them from here, so every test file sees the same tiny models."""

import os
import socket
import string
import sys

import numpy as np
import PIL.Image
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from .configuration_hf_clip import HfClipConfig
from .modeling_hf_clip import HfClipModel
from .synthetic import random_captions

# Prepended to a subprocess script: makes torchvision unfindable there, as on a machine without it.
HIDE_TORCHVISION = """
import importlib.machinery, sys

class HideTorchvision(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] == "torchvision":
            return None
        return super().find_spec(name, path, target)

sys.meta_path = [HideTorchvision if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
"""
TINY_BOS_TOKEN_ID, TINY_EOS_TOKEN_ID, TINY_CONTEXT_LENGTH, TINY_IMAGE_SIZE = 97, 98, 16, 32
TINY_TEXT = {
    "vocab_size": 99,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": TINY_CONTEXT_LENGTH,
    "projection_dim": 16,
    "bos_token_id": TINY_BOS_TOKEN_ID,
    "eos_token_id": TINY_EOS_TOKEN_ID,
    "pad_token_id": 0,
}
TINY_VIT = {
    "backbone": "vit",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": TINY_IMAGE_SIZE,
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
    """Tiny-vocabulary `random_captions` as model inputs: `lengths[i]` tokens per row (default: all `seq_len`)."""
    input_ids, attention_mask = random_captions(
        batch_size,
        seq_len,
        TINY_BOS_TOKEN_ID,
        TINY_EOS_TOKEN_ID,
        lengths=lengths or [seq_len] * batch_size,
        generator=torch.Generator().manual_seed(seed),
    )
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer whose BOS/EOS ids match the tiny text config (97/98)."""
    vocab: dict[str, int] = {}
    for char in string.ascii_lowercase + string.digits + ".,'-":
        vocab[char] = len(vocab) + 1
        vocab[char + "</w>"] = len(vocab) + 1
    vocab["<|startoftext|>"] = TINY_BOS_TOKEN_ID
    vocab["<|endoftext|>"] = TINY_EOS_TOKEN_ID
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TINY_CONTEXT_LENGTH)


def tiny_image_processor() -> CLIPImageProcessor:
    size = TINY_IMAGE_SIZE
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def tiny_models(seed: int = 0) -> tuple[HfClipModel, CLIPModel]:
    """A tiny HfClipModel and a transformers CLIPModel holding the same weights."""
    torch.manual_seed(seed)
    model = HfClipModel(tiny_config()).eval()
    reference = CLIPModel(tiny_clip_config()).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    return model, reference


def random_images(count: int, seed: int = 0, size: tuple[int, int] = (48, 40)) -> list[PIL.Image.Image]:
    """`count` RGB noise images of `size` (width, height)."""
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


def save_tiny_clip_folder(folder: "os.PathLike[str] | str", seed: int = 0) -> None:
    """A tiny HfClipModel with its tokenizer and image processor saved in `folder`, as a trained run leaves them."""
    torch.manual_seed(seed)
    HfClipModel(tiny_config()).save_pretrained(folder)
    tiny_clip_tokenizer().save_pretrained(folder)
    tiny_image_processor().save_pretrained(folder)


def free_port() -> int:
    """A loopback port nobody listens on now (for the rendezvous of a multi-process test run)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def two_cpu_processes_launch() -> list[str]:
    """`accelerate launch` of two gloo CPU processes (with ACCELERATE_USE_CPU=1 in the environment: `--cpu
    --num_processes 2` starts one process, `--multi_gpu` alone independent copies) on a port of their own, so test
    runs side by side (pytest-xdist) do not meet on accelerate's default port."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    options = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*launch, *options, "--main_process_port", str(free_port())]
