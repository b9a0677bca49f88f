"""The ViT image tower: patch embedding, class token, learned positions, pre/post LayerNorm, class-token pooling, and
FLIP's patch dropout in training."""

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_hf_clip import HfClipVisionConfig
from .modeling_layers import (
    HfClipEmbeddings,
    HfClipEncoder,
    HfClipVisionTower,
    OutputRecorder,
    resized_grid_positions,
)


class HfClipVisionEmbeddings(HfClipEmbeddings):
    def __init__(self, config: HfClipVisionConfig):
        super().__init__()
        self.initializer_range = config.initializer_range
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

    def init_openai(self, factor: float) -> None:
        scale = self.embed_dim**-0.5 * factor
        init.normal_(self.class_embedding, std=scale)
        init.normal_(self.position_embedding.weight, std=scale)
        init.normal_(self.patch_embedding.weight, std=self.initializer_range)
        init.copy_(self.position_ids, torch.arange(self.num_positions).expand((1, -1)))

    def interpolated_positions(self, height: int, width: int) -> torch.Tensor:
        """Patch positions resized bicubically to a (height, width) image's grid; the class position is kept."""
        grid_size, patch_size = self.image_size // self.patch_size, self.patch_size
        positions = self.position_embedding.weight
        return resized_grid_positions(positions, grid_size, height // patch_size, width // patch_size)[None]

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


def keep_random_patches(embeddings: torch.Tensor, drop_fraction: float) -> torch.Tensor:
    """The class token (token 0) and a random `max(1, int(num_patches * (1 - drop_fraction)))` of the patch tokens
    of each image, drawn independently per image (FLIP, Li et al. 2023; open_clip's `PatchDropout`).

    The kept count comes from the shape, a Python int, and the draw stays on the device: no host read, one static
    shape under torch.compile. The kept tokens come in random order, which a ViT does not see (their positions are
    already added and attention is order-free).
    """
    batch_size, num_tokens, width = embeddings.shape
    num_patches = num_tokens - 1
    num_kept = max(1, int(num_patches * (1 - drop_fraction)))
    kept = torch.rand(batch_size, num_patches, device=embeddings.device).topk(num_kept, dim=-1).indices + 1
    class_index = torch.zeros(batch_size, 1, dtype=kept.dtype, device=kept.device)
    index = torch.cat([class_index, kept], dim=1)
    return embeddings.gather(1, index[..., None].expand(-1, -1, width))


class HfClipVisionTransformer(HfClipVisionTower):
    """ViT image tower; `pooler_output` is the post-LayerNorm class token (before the projection)."""

    # The patch embedding, as transformers' CLIPVisionModel returns.
    input_embeddings_path = "embeddings.patch_embedding"
    # The blocks FSDP wraps and device maps keep whole.
    _no_split_modules = ["HfClipEncoderLayer"]
    # The paper's Adam β2 / ε for its ViTs (β2 0.98 for stability at large batch sizes).
    adam_defaults = (0.98, 1e-6)

    def __init__(self, config: HfClipVisionConfig):
        super().__init__(config)
        self.embeddings = HfClipVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = HfClipEncoder(config, is_causal=False)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def layer_groups(self) -> list[list[nn.Module]]:
        """The embeddings (patch, class token, positions) with the pre-LayerNorm, one group per block, and the
        post-LayerNorm."""
        blocks = [[block] for block in self.encoder.layers]
        return [[self.embeddings, self.pre_layrnorm], *blocks, [self.post_layernorm]]

    def encode_images(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool, recorder: OutputRecorder
    ) -> BaseModelOutputWithPooling:
        embeddings = self.embeddings(pixel_values, interpolate_pos_encoding)
        if self.training and self.config.patch_dropout > 0:
            # After the positions are added, before the LayerNorm (open_clip's order).
            embeddings = keep_random_patches(embeddings, self.config.patch_dropout)
        hidden_states = self.pre_layrnorm(embeddings)
        last_hidden_state = self.encoder(hidden_states, None, recorder)
        return recorder.tower_output(last_hidden_state, self.post_layernorm(last_hidden_state[:, 0]))
