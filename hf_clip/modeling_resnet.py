"""The paper's modified ResNet image tower: a three-convolution stem with average pooling, bottleneck blocks whose
strided convolutions are anti-aliased by average pooling, and a multi-head attention pool queried by the mean token.

Inside stages and blocks the module names equal OpenAI's (`layer1.0.conv1`, `bn3`, ...), so the OpenAI / open_clip key
mapping only moves the stem into `stem`, names the downsample parts and renames the attention pool
(`conversion/key_mappings.py`).

Gradient checkpointing recomputes each bottleneck in the backward pass; in training mode its BatchNorm layers then
update their running statistics a second time (as in every checkpointed BatchNorm network, timm's included). Loss and
gradients are unchanged; the running averages move with an effective momentum of about 0.19 instead of 0.1. The same
holds for the training script's feature-cached gradient accumulation, which runs each micro-batch forward twice.
"""

import math

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_hf_clip import HfClipVisionConfig
from .modeling_layers import (
    HfClipMultiHeadAttention,
    HfClipResidualBatchNorm,
    HfClipVisionTower,
    OutputRecorder,
    resized_grid_positions,
)

# Channels of a bottleneck's output relative to its inner width.
EXPANSION = 4


class HfClipResNetStem(nn.Module):
    """Three 3x3 convolutions (the first with stride 2) and a 2x2 average pool instead of a max pool: stride 4."""

    def __init__(self, config: HfClipVisionConfig):
        super().__init__()
        half_width = config.width // 2
        self.conv1 = nn.Conv2d(config.num_channels, half_width, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half_width)
        self.conv2 = nn.Conv2d(half_width, half_width, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(half_width)
        self.conv3 = nn.Conv2d(half_width, config.width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(config.width)
        self.act = nn.ReLU()
        self.avgpool = nn.AvgPool2d(2)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.act(self.bn1(self.conv1(pixel_values)))
        hidden_states = self.act(self.bn2(self.conv2(hidden_states)))
        hidden_states = self.act(self.bn3(self.conv3(hidden_states)))
        return self.avgpool(hidden_states)


class HfClipDownsample(nn.Module):
    """Shortcut projection: average pool (anti-aliased stride), then a stride-1 1x1 convolution and BatchNorm."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.pool(hidden_states)))


class HfClipBottleneck(GradientCheckpointingLayer):
    """1x1 → 3x3 → (average pool when strided) → 1x1 ×4 residual block; every convolution has stride 1."""

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        out_channels = planes * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out_channels, kernel_size=1, bias=False)
        self.bn3 = HfClipResidualBatchNorm(out_channels)
        self.act = nn.ReLU()
        needs_projection = stride > 1 or in_channels != out_channels
        self.downsample = HfClipDownsample(in_channels, out_channels, stride) if needs_projection else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states if self.downsample is None else self.downsample(hidden_states)
        hidden_states = self.act(self.bn1(self.conv1(hidden_states)))
        hidden_states = self.act(self.bn2(self.conv2(hidden_states)))
        hidden_states = self.bn3(self.conv3(self.avgpool(hidden_states)))
        return self.act(hidden_states + residual)


def make_stage(in_channels: int, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
    """A stage: the first block changes width (and resolution when strided), the rest keep it."""
    blocks = [HfClipBottleneck(in_channels, planes, stride)]
    blocks += [HfClipBottleneck(planes * EXPANSION, planes) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class HfClipAttentionPool(HfClipMultiHeadAttention):
    """Multi-head attention over the flattened feature map plus its mean; the mean token is the only query.

    Positions cover the training grid plus the mean token. `c_proj` maps into the joint embedding space, so the
    ResNet needs no separate visual projection.
    """

    def __init__(self, config: HfClipVisionConfig):
        super().__init__(config, embed_dim=config.width * 32, is_causal=False)
        self.grid_size = config.image_size // 32
        self.position_embedding = nn.Embedding(self.grid_size**2 + 1, self.embed_dim)
        self.c_proj = nn.Linear(self.embed_dim, config.projection_dim)

    def interpolated_positions(self, height: int, width: int) -> torch.Tensor:
        """Grid positions resized bicubically to a (height, width) feature map; the mean-token position is kept."""
        return resized_grid_positions(self.position_embedding.weight, self.grid_size, height, width)

    def forward(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        _, _, height, width = feature_map.shape
        tokens = feature_map.flatten(2).transpose(1, 2)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        if (height, width) == (self.grid_size, self.grid_size):
            positions = self.position_embedding.weight
        else:
            positions = self.interpolated_positions(height, width)
        tokens = tokens + positions.to(tokens.dtype)
        pooled, attn_weights = self.attend(tokens[:, :1], tokens, None, dropout=0.0)
        return self.c_proj(pooled[:, 0]), attn_weights


class HfClipResNetModel(HfClipVisionTower):
    """Modified-ResNet image tower. `last_hidden_state` is the final (batch, width·32, h, w) feature map and
    `pooler_output` the attention pool's output, already in the joint embedding space (`projection_dim`): unlike the
    ViT's, this tower's pooled output is the image embedding itself. `hidden_states` are the stem's and each stage's
    feature maps, `attentions` the pool's map."""

    # The stem's first convolution: the layer that reads the pixels.
    input_embeddings_path = "stem.conv1"
    # The blocks FSDP wraps and device maps keep whole.
    _no_split_modules = ["HfClipBottleneck"]
    # The paper's Adam β2 / ε for its ResNets (PyTorch's defaults).
    adam_defaults = (0.999, 1e-8)
    # cuDNN's fastest convolutions are NHWC; with NHWC weights PyTorch runs each convolution so (same math).
    prefers_channels_last = True

    def __init__(self, config: HfClipVisionConfig):
        super().__init__(config)
        if config.backbone != "resnet":
            raise ValueError(f"HfClipResNetModel needs vision_config.backbone='resnet', got {config.backbone!r}.")
        if config.layers is None:
            raise ValueError("HfClipResNetModel needs `layers`: four block counts.")
        self.stem = HfClipResNetStem(config)
        width = config.width
        self.layer1 = make_stage(width, width, config.layers[0], stride=1)
        self.layer2 = make_stage(width * 4, width * 2, config.layers[1], stride=2)
        self.layer3 = make_stage(width * 8, width * 4, config.layers[2], stride=2)
        self.layer4 = make_stage(width * 16, width * 8, config.layers[3], stride=2)
        self.attention_pool = HfClipAttentionPool(config)
        self.post_init()

    def layer_groups(self) -> list[list[nn.Module]]:
        """The stem, the four stages, and the attention pool (which ends in the projection into the joint space)."""
        stages: list[list[nn.Module]] = [[self.layer1], [self.layer2], [self.layer3], [self.layer4]]
        return [[self.stem], *stages, [self.attention_pool]]

    @staticmethod
    def build_projection(config: HfClipVisionConfig, projection_dim: int) -> nn.Module:
        """None: the attention pool ends in its own output projection (c_proj) into the joint space."""
        return nn.Identity()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """OpenAI's ResNet initialisation: PyTorch's defaults for convolutions and the attention pool's biases,
        open_clip's randn / embed_dim ** 0.5 for the pool's positions, the shared rules for the rest."""
        if isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=module.embedding_dim**-0.5 * self.config.initializer_factor)
        else:
            super()._init_weights(module)
            if isinstance(module, nn.Linear) and module.bias is not None:
                bound = module.in_features**-0.5
                init.uniform_(module.bias, -bound, bound)

    def encode_images(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool, recorder: OutputRecorder
    ) -> BaseModelOutputWithPooling:
        hidden_states = self.stem(pixel_values.to(self.stem.conv1.weight.dtype))
        recorder.record(hidden_states)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            hidden_states = stage(hidden_states)
            recorder.record(hidden_states)
        pooled_output, attn_weights = self.attention_pool(hidden_states)
        recorder.record(attentions=attn_weights)
        return recorder.tower_output(hidden_states, pooled_output)
