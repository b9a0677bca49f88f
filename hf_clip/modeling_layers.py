"""Transformer blocks shared by the ViT image tower and the text tower, the output options every tower follows, and the
common pretrained-model base with the one `_init_weights`.

Module and parameter names equal transformers' CLIP names (`self_attn.{q,k,v,out}_proj`, `layer_norm1/2`,
`mlp.fc1/fc2`), so transformers checkpoints load with an identity key mapping.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .configuration_hf_clip import HfClipConfig, HfClipTextConfig, HfClipTowerConfig, HfClipVisionConfig

OutputT = TypeVar("OutputT", bound=ModelOutput)


@dataclass
class OutputRecorder:
    """A forward's output options, and the hidden states and attention maps they ask the towers to record.

    Built by `HfClipPreTrainedModel.output_recorder`; `pack` returns an output as a ModelOutput or, with
    `return_dict=False`, as the tuple of its set fields.
    """

    output_attentions: bool
    output_hidden_states: bool
    return_dict: bool
    # Filled only on request: kept references would hold every layer's activations alive under no_grad.
    hidden_states: tuple[torch.Tensor, ...] | None = field(default=None, init=False)
    attentions: tuple[torch.Tensor, ...] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.hidden_states = () if self.output_hidden_states else None
        self.attentions = () if self.output_attentions else None

    def record(self, hidden_states: torch.Tensor | None = None, attentions: torch.Tensor | None = None) -> None:
        """Keeps what the options ask for; backends that return no attention map (sdpa, flash) add none."""
        if self.hidden_states is not None and hidden_states is not None:
            self.hidden_states += (hidden_states,)
        if self.attentions is not None and attentions is not None:
            self.attentions += (attentions,)

    def pack(self, output: OutputT) -> OutputT | tuple:
        return output if self.return_dict else output.to_tuple()

    def tower_output(self, last_hidden_state: torch.Tensor, pooler_output: torch.Tensor) -> BaseModelOutputWithPooling:
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=pooler_output,
            hidden_states=self.hidden_states,
            attentions=self.attentions,
        )


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


def _varlen_attention() -> Callable[..., Any] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


varlen_attn = _varlen_attention()
# Its first releases take `is_causal=True`; later ones express causality as the window (-1, 0).
VARLEN_CAUSAL_KWARGS: dict = (
    {"window_size": (-1, 0)}
    if varlen_attn is not None and "window_size" in inspect.signature(varlen_attn).parameters
    else {"is_causal": True}
)


class PackedSequences(NamedTuple):
    """Where the tokens of a packed batch (several captions back to back in one sequence) sit, so attention stays
    within each caption. Built by `HfClipTextModel.encode_packed` from `cu_seqlens`."""

    cu_seqlens: torch.Tensor  # (batch + 1,) int32 caption boundaries
    sequence_ids: torch.Tensor  # (total_tokens,) each token's caption
    position_ids: torch.Tensor  # (total_tokens,) each token's position in its caption
    # A bound on caption length (the context), not the batch's longest: a constant, so no value is read back from
    # the device and a compiled graph does not specialise on it.
    max_seqlen: int


def uses_varlen_kernel(query: torch.Tensor, dropout: float) -> bool:
    """Whether packed attention runs torch's varlen flash kernel: CUDA (Ampere or newer), half precision, no
    dropout. Meta tensors (shape-only runs such as FLOP counting) take the same path as CUDA."""
    if varlen_attn is None or dropout != 0.0 or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    if query.shape[-1] % 8 != 0 or query.shape[-1] > 256:  # the flash kernel's head sizes
        return False
    if query.device.type == "meta":
        return True
    return query.device.type == "cuda" and torch.cuda.get_device_properties(query.device).major >= 8


def packed_causal_attention(
    module: "HfClipMultiHeadAttention",
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    packed: PackedSequences,
    dropout: float,
) -> torch.Tensor:
    """Causal attention within each caption of a packed batch; query, key and value are (total_tokens, heads,
    head_dim), and so is the output. The work follows the sum of caption lengths on the varlen kernel."""
    cu_seqlens, max_seqlen = packed.cu_seqlens, packed.max_seqlen
    if varlen_attn is not None and uses_varlen_kernel(query, dropout):
        return varlen_attn(query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **VARLEN_CAUSAL_KWARGS)
    # Exact fallback for the configured backend: the captions as a right-padded (batch, max_seqlen) block. Causal
    # attention never looks past a caption's own tokens, so the padding needs no mask and is dropped afterwards.
    batch_size = cu_seqlens.shape[0] - 1
    index = (packed.sequence_ids, packed.position_ids)

    def padded(tokens: torch.Tensor) -> torch.Tensor:
        block = tokens.new_zeros(batch_size, max_seqlen, *tokens.shape[1:]).index_put(index, tokens)
        return block.transpose(1, 2)

    attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
        module.config._attn_implementation, eager_attention_forward
    )
    attn_output, _ = attention_interface(
        module, padded(query), padded(key), padded(value), None, scaling=module.scale, dropout=dropout, is_causal=True
    )
    return attn_output[index]  # the backends return (batch, seq_len, heads, head_dim)


class HfClipResidualLinear(nn.Linear):
    """A Linear that writes a block's output into the residual stream (attention `out_proj`, MLP `fc2`). The type
    marks it for `_init_weights`, which scales its std by (2·num_layers)^-0.5 as OpenAI does."""


class HfClipMLPInputLinear(nn.Linear):
    """The MLP's first Linear (`fc1`). The type marks it for `_init_weights` (OpenAI's std (2·width)^-0.5)."""


class HfClipResidualBatchNorm(nn.BatchNorm2d):
    """The last BatchNorm of a ResNet bottleneck's residual branch. OpenAI initialises its weight to zero, so every
    block starts as the identity; the type marks it for `_init_weights`."""


class HfClipEmbeddings(nn.Module):
    """A tower's input embeddings. Their OpenAI initialisation depends on the tower (token vs patch, positions), so
    each states it in `init_openai`, which `_init_weights` calls."""

    def init_openai(self, factor: float) -> None:
        raise NotImplementedError


class HfClipMultiHeadAttention(nn.Module):
    """Query, key and value projections split into heads, and the dispatch to transformers' attention backends
    (eager, sdpa, ...). HfClipAttention and the ResNet's attention pool add their own output projection."""

    def __init__(self, config: HfClipTowerConfig, embed_dim: int, is_causal: bool):
        super().__init__()
        self.config = config
        self.embed_dim = embed_dim
        self.num_heads = config.num_attention_heads
        self.head_dim = embed_dim // self.num_heads
        self.scale = self.head_dim**-0.5
        # Always explicit: sdpa treats a missing attribute as causal, which would silently mask an image tower.
        self.is_causal = is_causal
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)

    def attend(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float,
        packed: PackedSequences | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of `queries` (batch, q_len, embed_dim) over `keys` (batch, kv_len, embed_dim), which also give
        the values. Returns the heads' outputs side by side, (batch, q_len, embed_dim), and the attention maps where
        the backend computes them. With `packed`, the batch is one sequence of several captions, each attending
        causally to itself only (`packed_causal_attention`)."""
        batch_size = queries.shape[0]
        head_shape = (batch_size, -1, self.num_heads, self.head_dim)
        query = self.q_proj(queries).view(head_shape)
        key = self.k_proj(keys).view(head_shape)
        value = self.v_proj(keys).view(head_shape)
        if packed is not None:
            packed_output = packed_causal_attention(self, query[0], key[0], value[0], packed, dropout)
            return packed_output.reshape(batch_size, -1, self.embed_dim), None
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            attention_mask,
            scaling=self.scale,
            dropout=dropout,
            is_causal=self.is_causal,
        )
        return attn_output.reshape(batch_size, -1, self.embed_dim), attn_weights


class HfClipAttention(HfClipMultiHeadAttention):
    """Multi-head self-attention of a transformer block."""

    def __init__(self, config: HfClipTextConfig | HfClipVisionConfig, is_causal: bool):
        super().__init__(config, config.hidden_size, is_causal)
        self.dropout = config.attention_dropout
        self.out_proj = HfClipResidualLinear(self.embed_dim, self.embed_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        packed: PackedSequences | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        dropout = self.dropout if self.training else 0.0
        attn_output, attn_weights = self.attend(hidden_states, hidden_states, attention_mask, dropout, packed)
        return self.out_proj(attn_output), attn_weights


class HfClipMLP(nn.Module):
    def __init__(self, config: HfClipTextConfig | HfClipVisionConfig):
        super().__init__()
        self.config = config
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = HfClipMLPInputLinear(config.hidden_size, config.intermediate_size)
        self.fc2 = HfClipResidualLinear(config.intermediate_size, config.hidden_size)

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
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        packed: PackedSequences | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_output, attn_weights = self.self_attn(self.layer_norm1(hidden_states), attention_mask, packed)
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
        attention_mask: torch.Tensor | None,
        recorder: OutputRecorder,
        packed: PackedSequences | None = None,
    ) -> torch.Tensor:
        """The last layer's output; records the input, every layer's output and every attention map."""
        recorder.record(hidden_states)
        for layer in self.layers:
            hidden_states, attn_weights = layer(hidden_states, attention_mask, packed=packed)
            recorder.record(hidden_states, attn_weights)
        return hidden_states


def resized_grid_positions(positions: torch.Tensor, grid_size: int, height: int, width: int) -> torch.Tensor:
    """Positions of one extra token (class or mean token) then a grid_size² grid, with the grid resized bicubically to
    height x width; the extra token's position is kept."""
    embed_dim = positions.shape[-1]
    extra_position, grid_positions = positions[:1], positions[1:]
    grid_positions = grid_positions.reshape(1, grid_size, grid_size, embed_dim).permute(0, 3, 1, 2)
    grid_positions = nn.functional.interpolate(
        grid_positions, size=(height, width), mode="bicubic", align_corners=False
    )
    return torch.cat([extra_position, grid_positions.permute(0, 2, 3, 1).reshape(-1, embed_dim)])


class HfClipPreTrainedModel(PreTrainedModel):
    """Base of every hf_clip model: output options and OpenAI's initialisation."""

    config: HfClipConfig | HfClipTextConfig | HfClipVisionConfig
    base_model_prefix = "hf_clip"
    input_modalities: str | list[str] = ["image", "text"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # Each tower names its own blocks (`_no_split_modules`); `post_init` gathers the towers' names into a model's.
    # Dotted path of the layer that reads the input ids or pixels; a model that wraps a tower names the tower,
    # which resolves its own.
    input_embeddings_path: str

    def get_input_embeddings(self) -> nn.Module:
        module = self.get_submodule(self.input_embeddings_path)
        return module.get_input_embeddings() if isinstance(module, HfClipPreTrainedModel) else module

    def set_input_embeddings(self, value: nn.Module) -> None:
        module = self.get_submodule(self.input_embeddings_path)
        if isinstance(module, HfClipPreTrainedModel):
            module.set_input_embeddings(value)
        else:
            parent, _, name = self.input_embeddings_path.rpartition(".")
            self.get_submodule(parent).add_module(name, value)

    def output_recorder(
        self, output_attentions: bool | None, output_hidden_states: bool | None, return_dict: bool | None
    ) -> OutputRecorder:
        """Call arguments win; unset ones fall back to the config, as in every transformers model."""
        config = self.config
        return OutputRecorder(
            output_attentions=bool(config.output_attentions if output_attentions is None else output_attentions),
            output_hidden_states=bool(
                config.output_hidden_states if output_hidden_states is None else output_hidden_states
            ),
            return_dict=bool(config.return_dict if return_dict is None else return_dict),
        )

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """OpenAI's initialisation.

        transformers counts hf_clip as custom code and so skips this method for modules that own no parameters or
        buffers (HfClipAttention, HfClipMLP, the projection models). Each rule is therefore stated on a module that
        owns what it sets: a leaf, whose role its type tells (HfClipResidualLinear, HfClipMLPInputLinear,
        HfClipResidualBatchNorm) or the tower it sits in (`self`, the innermost hf_clip model around it); the
        embeddings; the joint model. A tower with rules of its own (the ResNet) overrides this method.
        """
        factor = self.config.initializer_factor
        if isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, HfClipResidualLinear):
            # Scaled down with depth so the residual stream's variance does not grow with the number of blocks.
            num_layers = self.config.num_hidden_layers
            init.normal_(module.weight, std=module.out_features**-0.5 * (2 * num_layers) ** -0.5 * factor)
            init.zeros_(module.bias)
        elif isinstance(module, HfClipMLPInputLinear):
            init.normal_(module.weight, std=(2 * module.in_features) ** -0.5 * factor)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            # q/k/v (the attention pool's too), the pool's c_proj and the projections into the joint space.
            init.normal_(module.weight, std=module.in_features**-0.5 * factor)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            # The identity, except each bottleneck's last BatchNorm: zero, so every block starts as the identity.
            init.constant_(module.weight, 0.0 if isinstance(module, HfClipResidualBatchNorm) else 1.0)
            init.zeros_(module.bias)
            for name, buffer in module.named_buffers():
                # running_var starts at 1; running_mean and num_batches_tracked at 0.
                if name == "running_var":
                    init.ones_(buffer)
                else:
                    init.zeros_(buffer)
        elif isinstance(module, HfClipEmbeddings):
            module.init_openai(factor)
        elif isinstance(module, HfClipPreTrainedModel) and isinstance(module.config, HfClipConfig):
            # The joint model's own tensors: the temperature, and a SigLIP model's logit bias.
            init.constant_(module.get_parameter("logit_scale"), module.config.logit_scale_init_value)
            if module.config.logit_bias_init_value is not None:
                init.constant_(module.get_parameter("logit_bias"), module.config.logit_bias_init_value)


class HfClipTextPreTrainedModel(HfClipPreTrainedModel):
    """Base of the models that read text (an HfClipTextConfig): the forward signature of transformers' CLIP text
    models, resolved once here; each model computes its output in `encode_text`."""

    config: HfClipTextConfig
    config_class = HfClipTextConfig
    input_modalities = "text"

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ModelOutput | tuple:
        if input_ids is None:
            raise ValueError(f"{type(self).__name__} needs `input_ids`.")
        recorder = self.output_recorder(output_attentions, output_hidden_states, return_dict)
        return recorder.pack(self.encode_text(input_ids, attention_mask, position_ids, recorder))

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        recorder: OutputRecorder,
    ) -> ModelOutput:
        raise NotImplementedError


class HfClipVisionPreTrainedModel(HfClipPreTrainedModel):
    """Base of the models that read images (an HfClipVisionConfig, `pixel_values`): the forward signature of
    transformers' CLIP vision models and the input check, resolved once here; each model computes its output in
    `encode_images`."""

    config: HfClipVisionConfig
    config_class = HfClipVisionConfig
    main_input_name = "pixel_values"
    input_modalities = "image"

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ModelOutput | tuple:
        pixel_values = self.check_pixel_values(pixel_values, interpolate_pos_encoding)
        recorder = self.output_recorder(output_attentions, output_hidden_states, return_dict)
        return recorder.pack(self.encode_images(pixel_values, interpolate_pos_encoding, recorder))

    def encode_images(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool, recorder: OutputRecorder
    ) -> ModelOutput:
        raise NotImplementedError

    def check_pixel_values(self, pixel_values: torch.Tensor | None, interpolate_pos_encoding: bool) -> torch.Tensor:
        """The image towers' input check; returns the tensor so the caller keeps a non-optional type."""
        if pixel_values is None:
            raise ValueError("the image tower needs `pixel_values`.")
        num_channels, image_size = self.config.num_channels, self.config.image_size
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


class HfClipVisionTower(HfClipVisionPreTrainedModel):
    """Base of an image backbone (an entry of `hf_clip.modeling_hf_clip.VISION_TOWERS`). Each backbone states here the
    facts about itself that the joint model and training need, so a new one touches its own modeling file, the config
    and the registry:

    - `layer_groups()`: its layers bottom (pixels) to top (pooled output), the unit of locking and of layer-wise
      learning-rate decay (`hf_clip.training.finetuning`); the joint model's projection joins the top group;
    - `adam_defaults`: the paper's Adam (β2, ε) for the family;
    - `prefers_channels_last`: whether its convolutions run faster with NHWC weights (cuDNN), which training then uses;
    - `build_projection`: the projection of its pooled output into the joint space;
    - initialisation rules of its own, by overriding `_init_weights`.
    """

    adam_defaults: ClassVar[tuple[float, float]]
    prefers_channels_last: ClassVar[bool] = False

    def encode_images(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool, recorder: OutputRecorder
    ) -> BaseModelOutputWithPooling:
        """The tower's states and its pooled output (`pooler_output`), before any joint projection."""
        raise NotImplementedError

    def layer_groups(self) -> list[list[nn.Module]]:
        raise NotImplementedError

    @staticmethod
    def build_projection(config: HfClipVisionConfig, projection_dim: int) -> nn.Module:
        """A bias-free Linear from the pooled width into the joint space (the paper's projection)."""
        return nn.Linear(config.hidden_size, projection_dim, bias=False)
