"""The run's text context (`TrainConfig.text_context_length`): the length a new model is built with, or the length a
saved model is stretched to before fine-tuning (Long-CLIP's rule, `HfClipModel.stretch_text_positions`).

The model config the run builds its processor from carries the new length (so the tokenizer truncates there);
the saved weights are loaded at their own length and stretched once loaded.
"""

import copy
from typing import cast

import torch

from ..configuration_hf_clip import HfClipConfig, HfClipTextConfig
from ..modeling_hf_clip import HfClipModel
from ..modeling_long_text import check_stretch


def text_config(model_config: HfClipConfig) -> HfClipTextConfig:
    return cast(HfClipTextConfig, model_config.text_config)


def apply_text_context_length(model_config: HfClipConfig, length: int | None, fine_tuning: bool) -> None:
    """Set the text context of `model_config` to `length` (None: keep it). Fine-tuning, the saved context can only
    grow (`check_stretch`: a shorter one is a clear error before any weight is loaded)."""
    if length is None:
        return
    if length < 1:
        raise ValueError(f"text_context_length must be a positive number of tokens, got {length}.")
    if fine_tuning:
        check_stretch(text_config(model_config).max_position_embeddings, length)
    text_config(model_config).max_position_embeddings = length


def load_at_text_context(path: str, model_config: HfClipConfig) -> HfClipModel:
    """The saved model of `path` with `model_config` (float32), its position embeddings stretched to the context
    `model_config` names when that is longer than the saved one."""
    saved_length = text_config(HfClipConfig.from_pretrained(path)).max_position_embeddings
    wanted_length = text_config(model_config).max_position_embeddings
    if wanted_length == saved_length:
        return HfClipModel.from_pretrained(path, config=model_config, dtype=torch.float32)
    loading_config = copy.deepcopy(model_config)
    text_config(loading_config).max_position_embeddings = saved_length
    model = HfClipModel.from_pretrained(path, config=loading_config, dtype=torch.float32)
    model.stretch_text_positions(wanted_length)
    return model
