"""The implementations `benchmark.py` times, all built from one hf_clip config so they do the same math.

- `hf_clip`: hf_clip's training path: the text batch trimmed to its longest caption with the padding mask left out
  (`hf_clip.data.text_batching.trim_to_longest`, done on the data-loader side), channels-last ResNets on CUDA.
- `hf_clip-checkpointed`: `hf_clip` with activation checkpointing (opt-in: memory for larger batches).
- `hf_clip-plain`: the same model called exactly as transformers' `CLIPModel` is (77 tokens, padding mask, NCHW):
  the unoptimised reference the exactness check compares against.
- `transformers`: `transformers.CLIPModel` with sdpa attention (ViT only: transformers has no ResNet CLIP).
- `open_clip`: `open_clip.CLIP` with QuickGELU and open_clip's `ClipLoss`, as the peers' anchor figures were taken.
"""

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hf_clip import HfClipConfig, HfClipModel
from hf_clip.data.text_batching import trim_to_longest
from hf_clip.foreign_configs import open_clip_model_cfg, transformers_clip_config

# Loss of one batch: (pixel_values, input_ids, attention_mask or None) -> scalar.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class ImplementationUnavailable(RuntimeError):
    """The implementation cannot run this architecture or is not installed; recorded as a row error, not fatal."""


@dataclass
class Implementation:
    name: str
    model: nn.Module
    loss: LossFn
    encode: Callable[[torch.Tensor], torch.Tensor]
    # Data-loader side preparation (not timed, as in a real input pipeline): the batch the step receives.
    prepare_text: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    prepare_pixels: Callable[[torch.Tensor], torch.Tensor]


def _unchanged_text(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return input_ids, attention_mask


def _unchanged_pixels(pixel_values: torch.Tensor) -> torch.Tensor:
    return pixel_values


def _trimmed_text(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, None]:
    # Exact for the pooled embeddings (causal tower, EOS pooling); the mask-free batch takes sdpa's is_causal path.
    return trim_to_longest(input_ids, attention_mask)[0], None


def _channels_last(pixel_values: torch.Tensor) -> torch.Tensor:
    return pixel_values.contiguous(memory_format=torch.channels_last)


def _clip_model_calls(model: Any) -> tuple[LossFn, Callable[[torch.Tensor], torch.Tensor]]:
    """Loss and image encoding of a model with transformers' `CLIPModel` API (HfClipModel or CLIPModel itself)."""

    def loss(pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, return_loss=True
        ).loss

    def encode(pixel_values: torch.Tensor) -> torch.Tensor:
        return model.get_image_features(pixel_values=pixel_values).pooler_output

    return loss, encode


def build_hf_clip(
    config: HfClipConfig, device: torch.device, optimised: bool = True, checkpointing: bool = False
) -> Implementation:
    model = HfClipModel._from_config(config, attn_implementation="sdpa").to(device)
    if checkpointing:
        # Recompute each encoder layer / ResNet block in the backward pass: activations of one layer at a time.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    channels_last = optimised and model.vision_model.prefers_channels_last and device.type == "cuda"
    if channels_last:
        model.vision_model.to(memory_format=torch.channels_last)

    loss, encode = _clip_model_calls(model)
    return Implementation(
        name=("hf_clip-checkpointed" if checkpointing else "hf_clip") if optimised else "hf_clip-plain",
        model=model,
        loss=loss,
        encode=encode,
        prepare_text=_trimmed_text if optimised else _unchanged_text,
        prepare_pixels=_channels_last if channels_last else _unchanged_pixels,
    )


def build_transformers(config: HfClipConfig, device: torch.device) -> Implementation:
    from transformers import CLIPModel

    if config.tower_configs()[1].backbone != "vit":
        raise ImplementationUnavailable("transformers' CLIPModel has no ResNet image tower")
    model = CLIPModel._from_config(transformers_clip_config(config), attn_implementation="sdpa").to(device)

    loss, encode = _clip_model_calls(model)
    return Implementation("transformers", model, loss, encode, _unchanged_text, _unchanged_pixels)


def build_open_clip(config: HfClipConfig, device: torch.device) -> Implementation:
    if importlib.util.find_spec("open_clip") is None:
        raise ImplementationUnavailable("open_clip is not installed (pip install open_clip_torch)")
    import open_clip
    from open_clip.loss import ClipLoss

    model = open_clip.CLIP(**open_clip_model_cfg(config), output_dict=True).to(device)
    clip_loss = ClipLoss()

    def loss(pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        # open_clip pools at the argmax token id (EOS, the largest id) and takes no mask.
        out = model(pixel_values, input_ids)
        return clip_loss(out["image_features"], out["text_features"], out["logit_scale"])

    def encode(pixel_values: torch.Tensor) -> torch.Tensor:
        return model.encode_image(pixel_values)

    return Implementation("open_clip", model, loss, encode, _unchanged_text, _unchanged_pixels)


BUILDERS: dict[str, Callable[[HfClipConfig, torch.device], Implementation]] = {
    "hf_clip": build_hf_clip,
    "hf_clip-plain": lambda config, device: build_hf_clip(config, device, optimised=False),
    "hf_clip-checkpointed": lambda config, device: build_hf_clip(config, device, checkpointing=True),
    "transformers": build_transformers,
    "open_clip": build_open_clip,
}
