"""The ViT image tower: patch embedding, class token, learned positions, pre/post LayerNorm, class-token pooling."""

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_hf_clip import HfClipVisionConfig
from .modeling_layers import HfClipEncoder, HfClipPreTrainedModel, check_pixel_values, tower_output


class HfClipVisionEmbeddings(nn.Module):
    def __init__(self, config: HfClipVisionConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.empty(self.embed_dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=False
        )
        self.num_positions = (self.image_size // self.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim)
        self.position_ids = nn.Buffer(torch.arange(self.num_positions).expand((1, -1)), persistent=False)

    def interpolated_positions(self, height: int, width: int) -> torch.Tensor:
        """Patch positions resized bicubically to a (height, width) image's grid; the class position is kept."""
        positions = self.position_embedding.weight
        class_position, patch_positions = positions[:1], positions[1:]
        grid = self.image_size // self.patch_size
        patch_positions = patch_positions.reshape(1, grid, grid, self.embed_dim).permute(0, 3, 1, 2)
        patch_positions = nn.functional.interpolate(
            patch_positions,
            size=(height // self.patch_size, width // self.patch_size),
            mode="bicubic",
            align_corners=False,
        )
        patch_positions = patch_positions.permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
        return torch.cat([class_position, patch_positions])[None]

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        batch_size, _, height, width = pixel_values.shape
        at_training_size = height == self.image_size and width == self.image_size
        patch_embeds = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patch_embeds = patch_embeds.flatten(2).transpose(1, 2)
        class_embeds = self.class_embedding.expand(batch_size, 1, -1)
        embeddings = torch.cat([class_embeds, patch_embeds], dim=1)
        if at_training_size:
            return embeddings + self.position_embedding(self.position_ids)
        return embeddings + self.interpolated_positions(height, width)


class HfClipVisionTransformer(HfClipPreTrainedModel):
    """ViT image tower; `pooler_output` is the post-LayerNorm class token (before the projection)."""

    config: HfClipVisionConfig
    config_class = HfClipVisionConfig
    main_input_name = "pixel_values"
    input_modalities = "image"
    _input_embed_layer = "patch_embedding"

    def __init__(self, config: HfClipVisionConfig):
        super().__init__(config)
        self.embeddings = HfClipVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = HfClipEncoder(config, is_causal=False)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, HfClipVisionEmbeddings):
            scale = module.embed_dim**-0.5 * self.config.initializer_factor
            init.normal_(module.class_embedding, std=scale)
            init.normal_(module.position_embedding.weight, std=scale)
            init.normal_(module.patch_embedding.weight, std=self.config.initializer_range)
            init.copy_(module.position_ids, torch.arange(module.num_positions).expand((1, -1)))

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        pixel_values = check_pixel_values(
            pixel_values, self.config.num_channels, self.config.image_size, interpolate_pos_encoding
        )
        output_attentions, output_hidden_states, return_dict = self.output_flags(
            output_attentions, output_hidden_states, return_dict
        )

        hidden_states = self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding))
        last_hidden_state, hidden_states_all, attentions = self.encoder(
            hidden_states, output_attentions=output_attentions, output_hidden_states=output_hidden_states
        )
        pooled_output = self.post_layernorm(last_hidden_state[:, 0])

        return tower_output(last_hidden_state, pooled_output, hidden_states_all, attentions, return_dict)
