"""Tiny sources for the conversion, model-card and Hub tests (as `hf_clip.testing_utils` is for the package's
tests): open_clip models with random weights written in open_clip's file formats, and a tiny hf_clip checkpoint
(model + processor) whose vocabulary fits its text tower. Needs open_clip, like the converters."""

from pathlib import Path
from typing import Any, TypeVar

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP
from open_clip.push_to_hf_hub import save_config_for_hf
from safetensors.torch import save_file

from hf_clip import HfClipConfig, HfClipModel, HfClipProcessor, train_clip_bpe
from hf_clip.testing_utils import TINY_TEXT, TINY_VIT

from .processor_from_source import clip_image_processor

# OpenAI derives heads as width / 64, so the smallest multi-head towers are 128 wide.
TINY_TEXT_CFG = {"context_length": 16, "vocab_size": 99, "width": 128, "heads": 2, "layers": 2}
TINY_OPEN_CLIP_CONFIGS: dict[str, dict[str, Any]] = {
    "vit": {
        "embed_dim": 16,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},
        "text_cfg": TINY_TEXT_CFG,
    },
    "resnet": {
        "embed_dim": 16,
        "quick_gelu": True,
        # Stage 2 has two blocks so the stage counting is exercised; width 8 → feature width 256, 4 pool heads.
        "vision_cfg": {"image_size": 64, "layers": [1, 2, 1, 1], "width": 8},
        "text_cfg": TINY_TEXT_CFG,
    },
}
# The stock pipeline's prompt is "This is a photo of {label}.": training on it keeps tiny-vocabulary prompts short.
CAPTIONS = [
    f"this is a photo of a {c} {t}." for c in ("red", "blue", "green") for t in ("cat", "dog", "car", "tree")
] * 5
TINY_CONTEXT = 32

Module = TypeVar("Module", bound=torch.nn.Module)


def randomize_(model: Module, seed: int = 0) -> Module:
    """Give every constant-initialised tensor random values: open_clip zero-initialises the last BatchNorm of each
    bottleneck (which would hide every residual branch from a parity check), and biases, LayerNorms and BatchNorm
    statistics start constant. Randomly initialised weights keep their scale, so activations stay realistic."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point() or name.endswith("attn_mask") or name == "logit_scale":
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.numel() == 1 or bool((tensor == tensor.flatten()[0]).all()):
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.02)
    return model.eval()


def tiny_open_clip(family: str, quick_gelu: bool = True, seed: int = 0) -> tuple[CLIP, dict[str, Any]]:
    """A tiny open_clip `CLIP` ("vit" or "resnet" image tower) with random weights, and its model config."""
    model_cfg = {**TINY_OPEN_CLIP_CONFIGS[family], "quick_gelu": quick_gelu}
    torch.manual_seed(seed)
    return randomize_(CLIP(**model_cfg), seed), model_cfg


def save_training_checkpoint(model: CLIP, path: Path) -> Path:
    """open_clip's `epoch_N.pt` layout: DDP's `module.` prefix, with optimizer state beside the weights."""
    state_dict = {f"module.{key}": value for key, value in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters())
    torch.save({"epoch": 3, "name": "tiny-run", "state_dict": state_dict, "optimizer": optimizer.state_dict()}, path)
    return path


def save_hub_folder(model: CLIP, model_cfg: dict[str, Any], folder: Path) -> Path:
    """open_clip's Hub layout, its config written by open_clip's own `save_config_for_hf`."""
    folder.mkdir(parents=True, exist_ok=True)
    # open_clip's factory sets these on the tower; save_config_for_hf reads them into preprocess_cfg.
    model.visual.image_mean, model.visual.image_std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    save_file(
        {key: value.contiguous() for key, value in model.state_dict().items()}, folder / "open_clip_model.safetensors"
    )
    save_config_for_hf(model, folder / "open_clip_config.json", model_config=model_cfg)
    return folder


def tiny_processor(image_size: int = 32) -> HfClipProcessor:
    """An `HfClipProcessor` with a BPE vocabulary of about 600 tokens trained on `CAPTIONS`."""
    tokenizer = train_clip_bpe(CAPTIONS, vocab_size=600, min_frequency=1, model_max_length=TINY_CONTEXT)
    return HfClipProcessor(image_processor=clip_image_processor(image_size), tokenizer=tokenizer)


def tiny_config_for(processor: HfClipProcessor) -> HfClipConfig:
    """A tiny ViT architecture (`hf_clip.testing_utils` sizes) that fits `processor`: its vocabulary, special tokens,
    context and crop size."""
    tokenizer = processor.tokenizer
    text_config = {
        **TINY_TEXT,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": TINY_CONTEXT,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision_config = {**TINY_VIT, "image_size": processor.image_processor.crop_size["height"]}
    return HfClipConfig(text_config=text_config, vision_config=vision_config, projection_dim=16)


def tiny_model_for(processor: HfClipProcessor, seed: int = 0) -> HfClipModel:
    """A model of `tiny_config_for(processor)` with random weights (constant-initialised tensors perturbed)."""
    torch.manual_seed(seed)
    return randomize_(HfClipModel(tiny_config_for(processor)), seed)
