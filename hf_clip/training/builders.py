"""The model, tokenizer and processor a run config names: from scratch (an architecture name or JSON) or from a saved
folder, with the text tower fitted to the tokenizer and the SigLIP bias added or refused by the loss."""

import json
import math
from pathlib import Path

import torch
from transformers import AutoTokenizer, TokenizersBackend

from ..configuration_hf_clip import HfClipConfig
from ..image_processing_hf_clip import HfClipImageProcessor
from ..loss import LOSSES
from ..modeling_hf_clip import HfClipModel
from ..onnx.folders import check_trainable
from ..processing_hf_clip import HfClipProcessor
from ..saved_folders import check_model_folder
from ..tokenization_hf_clip import HfClipTokenizer, check_tokenizer
from .config import TrainConfig

# SigLIP's initial temperature (ln 10) and bias (Zhai et al. 2023).
SIGLIP_LOGIT_SCALE_INIT = math.log(10)
SIGLIP_LOGIT_BIAS_INIT = -10.0


def build_tokenizer(config: TrainConfig) -> TokenizersBackend:
    """The saved tokenizer of `tokenizer_name_or_path` (else of the model folder), or OpenAI's BPE for a new model."""
    source = config.tokenizer_name_or_path or config.model_name_or_path
    if source is None:
        return HfClipTokenizer.from_clip_bpe()
    tokenizer = AutoTokenizer.from_pretrained(source)
    if not isinstance(tokenizer, TokenizersBackend):
        raise TypeError(f"{source} holds a {type(tokenizer).__name__}; CLIP needs a byte-level BPE tokenizer.")
    return tokenizer


def architecture(config: TrainConfig, tokenizer: TokenizersBackend) -> HfClipConfig:
    """The model's configuration with the run's loss and patch dropout applied; from scratch, the text vocabulary
    and special ids come from the tokenizer."""
    if config.model_name_or_path is not None:
        check_trainable(config.model_name_or_path)  # an ONNX (int8) folder has a config but nothing to train
        check_model_folder(config.model_name_or_path, "model_name_or_path")
        model_config = HfClipConfig.from_pretrained(config.model_name_or_path)
    else:
        name_or_path = str(config.model_config)
        if name_or_path.endswith(".json"):
            values = json.loads(Path(name_or_path).read_text())
        else:
            values = HfClipConfig.from_architecture(name_or_path).to_dict()
        values["text_config"].update(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
        )
        if LOSSES[config.loss].uses_logit_bias and values.get("logit_bias_init_value") is None:
            values.update(logit_scale_init_value=SIGLIP_LOGIT_SCALE_INIT, logit_bias_init_value=SIGLIP_LOGIT_BIAS_INIT)
        model_config = HfClipConfig.from_user_dict(values)
    has_bias, uses_bias = model_config.logit_bias_init_value is not None, LOSSES[config.loss].uses_logit_bias
    if has_bias and not uses_bias:
        raise ValueError(f"this model has a SigLIP bias (logit_bias), which loss={config.loss!r} does not use.")
    if uses_bias and not has_bias:
        # A softmax checkpoint fine-tuned with the sigmoid loss: from_pretrained adds the bias at its initial value.
        model_config.logit_bias_init_value = SIGLIP_LOGIT_BIAS_INIT
    if config.patch_dropout is not None:
        vision_config = model_config.tower_configs()[1]
        vision_config.patch_dropout = config.patch_dropout
        vision_config.validate_architecture()
    return model_config


def build_processor(model_config: HfClipConfig, tokenizer: TokenizersBackend) -> HfClipProcessor:
    """The tokenizer (checked against the text tower once per run, so the compiled step needs no per-batch check;
    truncating at the tower's context length) and an image processor at the model's resolution."""
    check_tokenizer(tokenizer, model_config)
    size = model_config.tower_configs()[1].image_size
    image_processor = HfClipImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return HfClipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_model(config: TrainConfig, model_config: HfClipConfig) -> HfClipModel:
    """A new model (OpenAI initialisation) or the saved one with `model_config` (`architecture`'s), in float32
    (autocast handles mixed precision)."""
    if config.model_name_or_path is not None:
        return HfClipModel.from_pretrained(config.model_name_or_path, config=model_config, dtype=torch.float32)
    return HfClipModel(model_config)
