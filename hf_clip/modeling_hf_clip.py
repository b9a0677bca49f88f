"""HfClipModel and the single-tower models, with the public API of transformers' `CLIPModel` and its tower classes."""

import math
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .configuration_hf_clip import HfClipConfig, HfClipTextConfig, HfClipVisionConfig
from .loss import clip_loss, sigmoid_loss
from .modeling_layers import (
    HfClipPreTrainedModel,
    HfClipTextPreTrainedModel,
    HfClipVisionPreTrainedModel,
    HfClipVisionTower,
    OutputRecorder,
)
from .modeling_resnet import HfClipResNetModel
from .modeling_text import HfClipTextModel
from .modeling_vit import HfClipVisionTransformer

# The cap on the learned log-scale `logit_scale` (the paper's): logits are scaled by at most exp(ln 100) = 100.
LOGIT_SCALE_MAX = math.log(100)

# The image backbones by `vision_config.backbone`; each states its own facts (`HfClipVisionTower`).
VISION_TOWERS: dict[str, type[HfClipVisionTower]] = {"vit": HfClipVisionTransformer, "resnet": HfClipResNetModel}


def build_vision_tower(config: HfClipVisionConfig) -> HfClipVisionTower:
    return VISION_TOWERS[config.backbone]._from_config(config)


def build_visual_projection(config: HfClipVisionConfig, projection_dim: int) -> nn.Module:
    return VISION_TOWERS[config.backbone].build_projection(config, projection_dim)


def logit_multiplier(logit_scale: torch.Tensor) -> torch.Tensor:
    """The factor the cosine similarities are multiplied by: exp(logit_scale) with the log-scale clamped at
    `LOGIT_SCALE_MAX` (so at most 100). The one place it is computed (`HfClipModel.logit_multiplier` for the model;
    this function also serves models that only hold a `logit_scale` tensor, such as transformers' `CLIPModel`)."""
    return logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()


def projected(features: BaseModelOutputWithPooling, projection: nn.Module) -> BaseModelOutputWithPooling:
    """A tower's output with `pooler_output` projected into the joint space (not normalised): what transformers
    5.x's `get_text_features` / `get_image_features` return."""
    features.pooler_output = projection(features.pooler_output)
    return features


@dataclass
class HfClipOutput(ModelOutput):
    """Joint output; field names and order equal transformers' `CLIPOutput`."""

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


@dataclass
class HfClipTextModelOutput(ModelOutput):
    text_embeds: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class HfClipVisionModelOutput(ModelOutput):
    image_embeds: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


EmbedsOutput = TypeVar("EmbedsOutput", HfClipTextModelOutput, HfClipVisionModelOutput)


def embeds_output(output_class: type[EmbedsOutput], features: BaseModelOutputWithPooling) -> EmbedsOutput:
    """A projection model's output: the projected embedding first, then the tower's states (transformers' layout)."""
    return output_class(
        features.pooler_output, features.last_hidden_state, features.hidden_states, features.attentions
    )


class HfClipModel(HfClipPreTrainedModel):
    """CLIP: an image tower and a text tower projected into one embedding space, compared by scaled cosine.

    With `config.logit_bias_init_value` set it is a SigLIP model: a learned `logit_bias` is added to the logits and
    `return_loss=True` gives the sigmoid loss. Without it there is no `logit_bias` (None, and no state-dict key).
    """

    config: HfClipConfig
    config_class = HfClipConfig
    # The text tower's token embedding, the model's only vocabulary (so `resize_token_embeddings` works).
    input_embeddings_path = "text_model"

    def __init__(self, config: HfClipConfig):
        super().__init__(config)
        # HfClipConfig.__post_init__ has turned both sub-configs into config objects.
        text_config = cast(HfClipTextConfig, config.text_config)
        vision_config = cast(HfClipVisionConfig, config.vision_config)
        self.text_model = HfClipTextModel._from_config(text_config)
        self.vision_model = build_vision_tower(vision_config)
        self.visual_projection = build_visual_projection(vision_config, config.projection_dim)
        self.text_projection = nn.Linear(text_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        bias = config.logit_bias_init_value
        self.logit_bias = None if bias is None else nn.Parameter(torch.tensor(bias))
        self.post_init()

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """Text tower output whose `pooler_output` is the projected (not normalised) text embedding."""
        recorder = self.output_recorder(output_attentions, output_hidden_states, return_dict)
        features = self.text_model.encode_text(input_ids, attention_mask, position_ids, recorder)
        return recorder.pack(projected(features, self.text_projection))

    def get_packed_text_features(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor
    ) -> torch.Tensor:
        """Projected (not normalised) text embeddings, (batch, projection_dim), of a packed batch without padding
        (`hf_clip.data.text_batching.pack_text`): the training path's text entry point, equal to
        `get_text_features(...).pooler_output` of the padded batch. See `HfClipTextModel.encode_packed`."""
        return self.text_projection(self.text_model.encode_packed(input_ids, position_ids, cu_seqlens))

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """Image tower output whose `pooler_output` is the projected (not normalised) image embedding."""
        recorder = self.output_recorder(output_attentions, output_hidden_states, return_dict)
        pixel_values = self.vision_model.check_pixel_values(pixel_values, interpolate_pos_encoding)
        features = self.vision_model.encode_images(pixel_values, interpolate_pos_encoding, recorder)
        return recorder.pack(projected(features, self.visual_projection))

    def logit_multiplier(self) -> torch.Tensor:
        """exp(logit_scale) under the cap (`LOGIT_SCALE_MAX`): the `logit_scale` that the losses and the logits use."""
        return logit_multiplier(self.logit_scale)

    def scaled_logits(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """logits_per_text from L2-normalised embeddings: exp(clamped logit_scale) · text @ imageᵀ (+ logit_bias for
        a SigLIP model, as transformers' `SiglipModel`)."""
        logits_per_text = self.logit_multiplier() * text_embeds @ image_embeds.t()
        if self.logit_bias is None:
            return logits_per_text
        return logits_per_text + self.logit_bias

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
    ) -> HfClipOutput | tuple:
        if input_ids is None or pixel_values is None:
            raise ValueError("HfClipModel.forward needs both `input_ids` and `pixel_values`.")
        # Resolved here: the towers would otherwise fall back to their sub-configs' flags, not this config's.
        recorder = self.output_recorder(output_attentions, output_hidden_states, return_dict)
        # return_dict=True: each tower's own ModelOutput (and its own recorded states).
        flags = (recorder.output_attentions, recorder.output_hidden_states, True)
        vision_outputs = cast(
            BaseModelOutputWithPooling, self.get_image_features(pixel_values, interpolate_pos_encoding, *flags)
        )
        text_outputs = cast(
            BaseModelOutputWithPooling, self.get_text_features(input_ids, attention_mask, position_ids, *flags)
        )
        image_embeds = nn.functional.normalize(vision_outputs["pooler_output"], dim=-1)
        text_embeds = nn.functional.normalize(text_outputs["pooler_output"], dim=-1)
        logits_per_text = self.scaled_logits(text_embeds, image_embeds)
        loss = None
        if return_loss:
            loss = clip_loss(logits_per_text) if self.logit_bias is None else sigmoid_loss(logits_per_text)
        return recorder.pack(
            HfClipOutput(
                loss=loss,
                logits_per_image=logits_per_text.t(),
                logits_per_text=logits_per_text,
                text_embeds=text_embeds,
                image_embeds=image_embeds,
                text_model_output=text_outputs,
                vision_model_output=vision_outputs,
            )
        )


class HfClipVisionModel(HfClipVisionPreTrainedModel):
    """The image tower alone, as transformers' `CLIPVisionModel`.

    For a ViT, `pooler_output` is the post-LayerNorm class token, before the projection into the joint space. For a
    ResNet it is the attention pool's output, which ends in that projection: the (un-normalised) image embedding that
    `get_image_features` and HfClipVisionModelWithProjection return.
    """

    input_embeddings_path = "vision_model"

    def __init__(self, config: HfClipVisionConfig):
        super().__init__(config)
        self.vision_model = build_vision_tower(config)
        self.post_init()

    def encode_images(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool, recorder: OutputRecorder
    ) -> ModelOutput:
        return self.vision_model.encode_images(pixel_values, interpolate_pos_encoding, recorder)


class HfClipVisionModelWithProjection(HfClipVisionModel):
    """The image tower and its projection; `image_embeds` is the (un-normalised) image embedding."""

    def __init__(self, config: HfClipVisionConfig):
        super().__init__(config)
        self.visual_projection = build_visual_projection(config, config.projection_dim)
        self.post_init()

    def encode_images(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool, recorder: OutputRecorder
    ) -> HfClipVisionModelOutput:
        features = self.vision_model.encode_images(pixel_values, interpolate_pos_encoding, recorder)
        return embeds_output(HfClipVisionModelOutput, projected(features, self.visual_projection))


class HfClipTextModelWithProjection(HfClipTextPreTrainedModel):
    """The text tower and its projection; `text_embeds` is the (un-normalised) text embedding."""

    input_embeddings_path = "text_model"

    def __init__(self, config: HfClipTextConfig):
        super().__init__(config)
        self.text_model = HfClipTextModel._from_config(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.post_init()

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        recorder: OutputRecorder,
    ) -> HfClipTextModelOutput:
        features = self.text_model.encode_text(input_ids, attention_mask, position_ids, recorder)
        return embeds_output(HfClipTextModelOutput, projected(features, self.text_projection))
