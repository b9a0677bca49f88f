"""HfClipModel and the single-tower models, with the public API of transformers' `CLIPModel`."""

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .configuration_hf_clip import HfClipConfig, HfClipTextConfig, HfClipVisionConfig
from .loss import clip_loss
from .modeling_layers import HfClipPreTrainedModel
from .modeling_resnet import HfClipResNetModel
from .modeling_text import HfClipTextModel
from .modeling_vit import HfClipVisionTransformer

# The paper clamps the temperature so logits are scaled by at most 100.
LOGIT_SCALE_MAX = math.log(100)

VISION_TOWERS: dict[str, type[HfClipPreTrainedModel]] = {"vit": HfClipVisionTransformer, "resnet": HfClipResNetModel}


def build_vision_tower(config: HfClipVisionConfig) -> HfClipPreTrainedModel:
    return VISION_TOWERS[config.backbone]._from_config(config)


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


def _projection(config: HfClipVisionConfig, projection_dim: int) -> nn.Module:
    # The ResNet's attention pool ends in its own output projection (c_proj), so it needs no second one.
    if config.backbone == "resnet":
        return nn.Identity()
    return nn.Linear(config.hidden_size, projection_dim, bias=False)


class HfClipModel(HfClipPreTrainedModel):
    """CLIP: an image tower and a text tower projected into one embedding space, compared by scaled cosine."""

    config: HfClipConfig
    config_class = HfClipConfig

    def __init__(self, config: HfClipConfig):
        super().__init__(config)
        # HfClipConfig.__post_init__ has turned both sub-configs into config objects.
        text_config = cast(HfClipTextConfig, config.text_config)
        vision_config = cast(HfClipVisionConfig, config.vision_config)
        self.text_model = HfClipTextModel._from_config(text_config)
        self.vision_model = build_vision_tower(vision_config)
        self.visual_projection = _projection(vision_config, config.projection_dim)
        self.text_projection = nn.Linear(text_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, HfClipModel):
            init.normal_(module.text_projection.weight, std=module.text_projection.in_features**-0.5)
            if isinstance(module.visual_projection, nn.Linear):
                init.normal_(module.visual_projection.weight, std=module.visual_projection.in_features**-0.5)
            init.constant_(module.logit_scale, module.config.logit_scale_init_value)

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """Text tower output whose `pooler_output` is the projected (not normalised) text embedding."""
        text_outputs = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, return_dict=True, **kwargs
        )
        text_outputs.pooler_output = self.text_projection(text_outputs.pooler_output)
        return text_outputs

    def get_image_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs
    ) -> BaseModelOutputWithPooling:
        """Image tower output whose `pooler_output` is the projected (not normalised) image embedding."""
        vision_outputs = self.vision_model(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )
        vision_outputs.pooler_output = self.visual_projection(vision_outputs.pooler_output)
        return vision_outputs

    def scaled_logits(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """logits_per_text from L2-normalised embeddings: exp(clamped logit_scale) · text @ imageᵀ."""
        logit_scale = self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()
        return logit_scale * text_embeds @ image_embeds.t()

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
        **kwargs,
    ) -> HfClipOutput | tuple:
        if input_ids is None or pixel_values is None:
            raise ValueError("HfClipModel.forward needs both `input_ids` and `pixel_values`.")
        output_attentions, output_hidden_states, return_dict = self.output_flags(
            output_attentions, output_hidden_states, return_dict
        )
        # Resolved here: the towers would otherwise fall back to their sub-configs' flags, not this config's.
        flags = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        vision_outputs = self.get_image_features(pixel_values, interpolate_pos_encoding, **flags)
        text_outputs = self.get_text_features(input_ids, attention_mask, position_ids, **flags)

        image_embeds = nn.functional.normalize(vision_outputs["pooler_output"], dim=-1)
        text_embeds = nn.functional.normalize(text_outputs["pooler_output"], dim=-1)
        logits_per_text = self.scaled_logits(text_embeds, image_embeds)
        logits_per_image = logits_per_text.t()
        loss = clip_loss(logits_per_text) if return_loss else None

        output = HfClipOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )
        return output if return_dict else output.to_tuple()


class HfClipVisionModel(HfClipPreTrainedModel):
    """The image tower alone (ViT or ResNet per `config.backbone`), without the projection."""

    config: HfClipVisionConfig
    config_class = HfClipVisionConfig
    main_input_name = "pixel_values"
    input_modalities = "image"

    def __init__(self, config: HfClipVisionConfig):
        super().__init__(config)
        self.vision_model = build_vision_tower(config)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor | None = None, **kwargs) -> BaseModelOutputWithPooling | tuple:
        return self.vision_model(pixel_values=pixel_values, **kwargs)


class HfClipVisionModelWithProjection(HfClipPreTrainedModel):
    config: HfClipVisionConfig
    config_class = HfClipVisionConfig
    main_input_name = "pixel_values"
    input_modalities = "image"

    def __init__(self, config: HfClipVisionConfig):
        super().__init__(config)
        self.vision_model = build_vision_tower(config)
        self.visual_projection = _projection(config, config.projection_dim)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, HfClipVisionModelWithProjection) and isinstance(module.visual_projection, nn.Linear):
            init.normal_(module.visual_projection.weight, std=module.config.hidden_size**-0.5)

    def forward(
        self, pixel_values: torch.Tensor | None = None, return_dict: bool | None = None, **kwargs
    ) -> HfClipVisionModelOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.vision_model(pixel_values=pixel_values, return_dict=True, **kwargs)
        output = HfClipVisionModelOutput(
            image_embeds=self.visual_projection(outputs.pooler_output),
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


class HfClipTextModelWithProjection(HfClipPreTrainedModel):
    config: HfClipTextConfig
    config_class = HfClipTextConfig
    input_modalities = "text"

    def __init__(self, config: HfClipTextConfig):
        super().__init__(config)
        self.text_model = HfClipTextModel._from_config(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, HfClipTextModelWithProjection):
            init.normal_(module.text_projection.weight, std=module.config.hidden_size**-0.5)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> HfClipTextModelOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, return_dict=True, **kwargs
        )
        output = HfClipTextModelOutput(
            text_embeds=self.text_projection(outputs.pooler_output),
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()
