"""Parity checks run by every converter before it writes anything.

A converted model and its source run on the same random inputs; image features, text features (projected, not
normalised) and `logits_per_image` must agree at fp32 `atol=1e-5`. Shape-preserving mistakes (gelu ↔ quick_gelu,
head count, q/k swapped, LayerNorm eps) move logits by only 2.5e-4…2.9e-3, so a looser gate would miss them.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hf_clip import HfClipConfig
from hf_clip.modeling_hf_clip import LOGIT_SCALE_MAX, logit_multiplier
from hf_clip.synthetic import random_captions

PARITY_ATOL = 1e-5
OUTPUT_NAMES = ("image_features", "text_features", "logits_per_image")


class ParityError(AssertionError):
    """Converted and source model disagree beyond the tolerance."""


@dataclass(frozen=True)
class ParityInputs:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "pixel_values": self.pixel_values}


def parity_inputs(config: HfClipConfig, num_texts: int = 3, num_images: int = 2, seed: int = 0) -> ParityInputs:
    """Random images, and token sequences shaped like tokenizer output (`hf_clip.synthetic.random_captions`): BOS,
    tokens below BOS and EOS, EOS, zero padding. The first caption fills the context, so pooling at the last position
    is checked too."""
    text_config, vision_config = config.tower_configs()
    bos, eos = text_config.bos_token_id, text_config.eos_token_id
    if bos is None:
        raise ValueError("the text config needs bos_token_id to build parity inputs.")
    generator = torch.Generator().manual_seed(seed)
    input_ids, attention_mask = random_captions(
        num_texts, text_config.max_position_embeddings, bos, eos, include_longest=True, generator=generator
    )
    size = vision_config.image_size
    pixel_values = torch.randn(num_images, vision_config.num_channels, size, size, generator=generator)
    return ParityInputs(input_ids, attention_mask, pixel_values)


def logits_from_features(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """logits_per_image = exp(logit_scale) · normalise(image) @ normalise(text)ᵀ, with hf_clip's temperature cap.

    hf_clip clamps the scale at ln(100), the paper's cap; open_clip and transformers do not. A checkpoint whose stored
    scale exceeds the cap (OpenAI trained with a clamp at 4.6052 > ln 100) gives logits that differ from an uncapped
    implementation by the cap alone; the check compares weights, not that policy.
    """
    scale = logit_multiplier(logit_scale)
    image = nn.functional.normalize(image_features, dim=-1)
    text = nn.functional.normalize(text_features, dim=-1)
    return scale * image @ text.t()


@torch.no_grad()
def clip_model_outputs(model: Any, inputs: ParityInputs) -> dict[str, torch.Tensor]:
    """Outputs of an hf_clip `HfClipModel` or a transformers `CLIPModel` (same API)."""
    image_features = model.get_image_features(pixel_values=inputs.pixel_values).pooler_output
    text_features = model.get_text_features(
        input_ids=inputs.input_ids, attention_mask=inputs.attention_mask
    ).pooler_output
    output = model(**inputs.as_dict())
    logits = logits_from_features(image_features, text_features, model.logit_scale)
    # The forward pass must agree with the feature methods; transformers' CLIPModel applies no temperature cap.
    if model.logit_scale.item() <= LOGIT_SCALE_MAX:
        logits = output.logits_per_image
    return {"image_features": image_features, "text_features": text_features, "logits_per_image": logits}


def max_differences(reference: Mapping[str, torch.Tensor], candidate: Mapping[str, torch.Tensor]) -> dict[str, float]:
    differences = {}
    for name in OUTPUT_NAMES:
        if reference[name].shape != candidate[name].shape:
            raise ParityError(
                f"{name}: shape {tuple(candidate[name].shape)} != reference {tuple(reference[name].shape)}"
            )
        differences[name] = (reference[name].float() - candidate[name].float()).abs().max().item()
    return differences


def assert_parity(
    reference: Mapping[str, torch.Tensor],
    candidate: Mapping[str, torch.Tensor],
    what: str,
    atol: float = PARITY_ATOL,
) -> dict[str, float]:
    """Raise `ParityError` naming every output that differs by more than `atol`; return the max differences."""
    differences = max_differences(reference, candidate)
    failed = {name: diff for name, diff in differences.items() if not diff <= atol}
    if failed:
        details = ", ".join(f"{name} max |diff| {diff:.3e}" for name, diff in failed.items())
        raise ParityError(f"{what}: outputs differ beyond atol={atol:g}: {details}. Nothing was written.")
    return differences


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """`load_state_dict(strict=True)` with an error that lists what is missing and what is unexpected."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{what}: the converted state dict does not match the model: missing {sorted(missing)[:10]} "
            f"({len(missing)} in all), unexpected {sorted(unexpected)[:10]} ({len(unexpected)} in all)."
        )
