"""Transformer blocks shared by the ViT image tower and the text tower, and the common pretrained-model base.

Module and parameter names equal transformers' CLIP names (`self_attn.{q,k,v,out}_proj`, `layer_norm1/2`,
`mlp.fc1/fc2`), so transformers checkpoints load with an identity key mapping.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_hf_clip import HfClipConfig, HfClipTextConfig, HfClipVisionConfig


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention. A causal module without an explicit mask gets the triangular mask here, matching sdpa's
    `is_causal=True` path, so callers never materialise the mask for the fast backends."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    elif module.is_causal:
        q_len, kv_len = query.shape[-2], key.shape[-2]
        future = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).triu(1)
        attn_weights = attn_weights.masked_fill(future, torch.finfo(attn_weights.dtype).min)
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class HfClipAttention(nn.Module):
    """Multi-head self-attention dispatched through transformers' attention backends (eager, sdpa, ...)."""

    def __init__(self, config: HfClipTextConfig | HfClipVisionConfig, is_causal: bool):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        # Always explicit: sdpa treats a missing attribute as causal, which would silently mask the image tower.
        self.is_causal = is_causal

        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len, _ = hidden_states.shape
        head_shape = (batch_size, seq_len, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(head_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(head_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(head_shape).transpose(1, 2)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scale,
            dropout=self.dropout if self.training else 0.0,
            is_causal=self.is_causal,
        )
        attn_output = self.out_proj(attn_output.reshape(batch_size, seq_len, self.embed_dim))
        return attn_output, attn_weights


class HfClipMLP(nn.Module):
    def __init__(self, config: HfClipTextConfig | HfClipVisionConfig):
        super().__init__()
        self.config = config
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class HfClipEncoderLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: HfClipTextConfig | HfClipVisionConfig, is_causal: bool):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = HfClipAttention(config, is_causal=is_causal)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = HfClipMLP(config)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_output, attn_weights = self.self_attn(self.layer_norm1(hidden_states), attention_mask)
        hidden_states = hidden_states + attn_output
        hidden_states = hidden_states + self.mlp(self.layer_norm2(hidden_states))
        return hidden_states, attn_weights


class HfClipEncoder(nn.Module):
    def __init__(self, config: HfClipTextConfig | HfClipVisionConfig, is_causal: bool):
        super().__init__()
        self.layers = nn.ModuleList(
            [HfClipEncoderLayer(config, is_causal=is_causal) for _ in range(config.num_hidden_layers)]
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """Returns (last hidden state, hidden states: the input then every layer's output, attention maps)."""
        # Collected only on request: kept references would hold every layer's activations alive under no_grad.
        all_hidden_states: tuple[torch.Tensor, ...] | None = (hidden_states,) if output_hidden_states else None
        all_attentions: tuple[torch.Tensor, ...] | None = () if output_attentions else None
        for layer in self.layers:
            hidden_states, attn_weights = layer(hidden_states, attention_mask)
            if all_hidden_states is not None:
                all_hidden_states += (hidden_states,)
            if all_attentions is not None and attn_weights is not None:
                all_attentions += (attn_weights,)
        return hidden_states, all_hidden_states, all_attentions


def check_pixel_values(
    pixel_values: torch.Tensor | None, num_channels: int, image_size: int, interpolate_pos_encoding: bool
) -> torch.Tensor:
    """The image towers' input check; returns the tensor so the caller keeps a non-optional type."""
    if pixel_values is None:
        raise ValueError("the image tower needs `pixel_values`.")
    if pixel_values.dim() != 4 or pixel_values.shape[1] != num_channels:
        raise ValueError(
            f"pixel_values must be (batch, {num_channels}, height, width), got {tuple(pixel_values.shape)}."
        )
    height, width = pixel_values.shape[-2:]
    if (height, width) != (image_size, image_size) and not interpolate_pos_encoding:
        raise ValueError(
            f"input images are {height}x{width} but the model takes {image_size}x{image_size}; "
            "pass interpolate_pos_encoding=True to run at another resolution."
        )
    return pixel_values


def tower_output(
    last_hidden_state: torch.Tensor,
    pooled_output: torch.Tensor,
    hidden_states: tuple[torch.Tensor, ...] | None,
    attentions: tuple[torch.Tensor, ...] | None,
    return_dict: bool,
) -> BaseModelOutputWithPooling | tuple:
    if not return_dict:
        return tuple(v for v in (last_hidden_state, pooled_output, hidden_states, attentions) if v is not None)
    return BaseModelOutputWithPooling(
        last_hidden_state=last_hidden_state,
        pooler_output=pooled_output,
        hidden_states=hidden_states,
        attentions=attentions,
    )


class HfClipPreTrainedModel(PreTrainedModel):
    """Base of every hf_clip model. Initialisation follows OpenAI's CLIP (DESIGN §9); towers extend it."""

    config: HfClipConfig | HfClipTextConfig | HfClipVisionConfig
    base_model_prefix = "hf_clip"
    input_modalities: str | list[str] = ["image", "text"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["HfClipEncoderLayer", "HfClipBottleneck"]

    @classmethod
    def is_custom_code(cls) -> bool:
        # transformers treats every model outside its own namespace as custom code and then skips `_init_weights` for
        # modules without parameters of their own (HfClipAttention, HfClipMLP), leaving PyTorch's default init. That
        # shortcut guards remote code that writes tensors in place; ours writes only through
        # `transformers.initialization`, which already leaves loaded weights alone.
        return False

    def output_flags(
        self, output_attentions: bool | None, output_hidden_states: bool | None, return_dict: bool | None
    ) -> tuple[bool, bool, bool]:
        """Call arguments win; unset ones fall back to the config, as in every transformers model."""
        return (
            bool(output_attentions if output_attentions is not None else self.config.output_attentions),
            bool(output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states),
            bool(return_dict if return_dict is not None else self.config.return_dict),
        )

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        factor = self.config.initializer_factor
        if isinstance(module, HfClipAttention):
            num_layers = module.config.num_hidden_layers
            attn_std = module.embed_dim**-0.5 * factor
            proj_std = module.embed_dim**-0.5 * (2 * num_layers) ** -0.5 * factor
            for proj in (module.q_proj, module.k_proj, module.v_proj):
                init.normal_(proj.weight, std=attn_std)
                init.zeros_(proj.bias)
            init.normal_(module.out_proj.weight, std=proj_std)
            init.zeros_(module.out_proj.bias)
        elif isinstance(module, HfClipMLP):
            width, num_layers = module.config.hidden_size, module.config.num_hidden_layers
            init.normal_(module.fc1.weight, std=(2 * width) ** -0.5 * factor)
            init.normal_(module.fc2.weight, std=width**-0.5 * (2 * num_layers) ** -0.5 * factor)
            init.zeros_(module.fc1.bias)
            init.zeros_(module.fc2.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
