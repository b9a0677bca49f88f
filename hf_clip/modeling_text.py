"""The text tower: token + position embeddings, a causal transformer, final LayerNorm, pooled at the first EOS."""

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_hf_clip import HfClipTextConfig
from .modeling_layers import (
    HfClipEmbeddings,
    HfClipEncoder,
    HfClipTextPreTrainedModel,
    OutputRecorder,
    PackedSequences,
)


class HfClipTextEmbeddings(HfClipEmbeddings):
    def __init__(self, config: HfClipTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.position_ids = nn.Buffer(torch.arange(config.max_position_embeddings).expand((1, -1)), persistent=False)

    def init_openai(self, factor: float) -> None:
        init.normal_(self.token_embedding.weight, std=0.02 * factor)
        init.normal_(self.position_embedding.weight, std=0.01 * factor)
        init.copy_(self.position_ids, torch.arange(self.position_ids.shape[-1]).expand((1, -1)))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = self.position_ids[:, : input_ids.shape[-1]]
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)


def causal_padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (batch, 1, query, key) mask that hides future tokens and padded keys."""
    seq_len = attention_mask.shape[-1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=attention_mask.device).tril()
    visible = causal[None, None] & attention_mask[:, None, None, :].bool()
    return torch.zeros(visible.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~visible, torch.finfo(dtype).min
    )


def packed_sequence_ids(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """The caption each token of a packed sequence belongs to, from the boundaries (computed on the device)."""
    token_index = torch.arange(total_tokens, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].long(), token_index, right=True)


class HfClipTextModel(HfClipTextPreTrainedModel):
    """Causal text transformer; `pooler_output` is the final-LayerNorm state at each sequence's first EOS token.

    Two entry points: the forward / `encode_text` of transformers' CLIP text model (a padded batch, input checks
    with clear errors), and `encode_packed` for training (a packed batch without padding, no device read-backs).
    """

    input_embeddings_path = "embeddings.token_embedding"
    # The blocks FSDP wraps and device maps keep whole.
    _no_split_modules = ["HfClipEncoderLayer"]

    def __init__(self, config: HfClipTextConfig):
        super().__init__(config)
        self.embeddings = HfClipTextEmbeddings(config)
        self.encoder = HfClipEncoder(config, is_causal=True)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def layer_groups(self) -> list[list[nn.Module]]:
        """Bottom to top, for locking and layer-wise learning-rate decay (`hf_clip.training.finetuning`): the
        embeddings (token, positions), one group per block, and the final LayerNorm."""
        return [[self.embeddings], *[[block] for block in self.encoder.layers], [self.final_layer_norm]]

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        recorder: OutputRecorder,
    ) -> BaseModelOutputWithPooling:
        input_ids = input_ids.view(-1, input_ids.shape[-1])
        seq_len, context = input_ids.shape[-1], self.config.max_position_embeddings
        if seq_len > context:
            raise ValueError(f"text of {seq_len} tokens is longer than the model's context of {context} tokens.")
        eos_positions = self.first_eos_positions(input_ids, attention_mask)

        hidden_states = self.embeddings(input_ids, position_ids)
        # Without padding the module's `is_causal` does the masking, so sdpa and flash kernels see no mask tensor.
        mask = None
        if attention_mask is not None and (torch.compiler.is_compiling() or not bool(attention_mask.all())):
            mask = causal_padding_mask(attention_mask.view(input_ids.shape), hidden_states.dtype)
        last_hidden_state = self.final_layer_norm(self.encoder(hidden_states, mask, recorder))
        pooled_output = last_hidden_state[torch.arange(last_hidden_state.shape[0]), eos_positions]
        return recorder.tower_output(last_hidden_state, pooled_output)

    def encode_packed(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor
    ) -> torch.Tensor:
        """Pooled states (batch, hidden_size) of a packed batch: the training path's text entry point.

        The captions lie back to back in one sequence, as `hf_clip.data.text_batching.pack_text` writes them:
        `input_ids` and `position_ids` are (1, total_tokens), caption i spans tokens `cu_seqlens[i]` to
        `cu_seqlens[i + 1]`. Each caption attends causally to itself only (torch's varlen flash kernel on CUDA in
        half precision, the configured attention backend otherwise) and is pooled at its first EOS, so the result
        is the `pooler_output` of `encode_text` on the padded batch, while the work follows the sum of caption
        lengths instead of batch × longest caption.

        Nothing here reads a value back from the device, so the input is not checked: check it once with
        `check_packed_input_ids` (`hf_clip.training.steps.ClipEmbedder` does, on its first packed batch).
        """
        sequence_ids = packed_sequence_ids(cu_seqlens, input_ids.shape[-1])
        packed = PackedSequences(cu_seqlens, sequence_ids, position_ids[0], self.config.max_position_embeddings)
        hidden_states = self.embeddings(input_ids, position_ids)
        recorder = OutputRecorder(output_attentions=False, output_hidden_states=False, return_dict=True)
        last_hidden_state = self.final_layer_norm(self.encoder(hidden_states, None, recorder, packed))
        # Each caption's first EOS: the smallest index among its EOS tokens and its last token (the fallback for a
        # caption without EOS, which `check_packed_input_ids` rejects).
        last_tokens = cu_seqlens[1:].long() - 1
        token_index = torch.arange(input_ids.shape[-1], device=input_ids.device)
        candidates = torch.where(input_ids[0] == self.config.eos_token_id, token_index, last_tokens[sequence_ids])
        eos_positions = last_tokens.scatter_reduce(0, sequence_ids, candidates, reduce="amin")
        return last_hidden_state[0, eos_positions]

    def first_eos_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Index of each row's first attended EOS token (EOS used as left padding is masked out, not pooled)."""
        is_eos = torch.eq(input_ids, self.config.eos_token_id)
        if attention_mask is not None:
            is_eos = is_eos & attention_mask.view(input_ids.shape).bool()
        # The checks read values back from the device, so a compiled graph skips them.
        if not torch.compiler.is_compiling():
            self.check_input_ids(input_ids, is_eos.any(dim=-1))
        return is_eos.int().argmax(dim=-1)

    def check_packed_input_ids(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
        """`check_input_ids` for a packed batch (`encode_packed`'s layout): one read-back from the device."""
        sequence_ids = packed_sequence_ids(cu_seqlens, input_ids.shape[-1])
        eos_counts = torch.zeros(cu_seqlens.shape[0] - 1, dtype=torch.long, device=input_ids.device)
        eos_counts.index_add_(0, sequence_ids, torch.eq(input_ids[0], self.config.eos_token_id).long())
        self.check_input_ids(input_ids, eos_counts > 0)

    def check_input_ids(self, input_ids: torch.Tensor, has_eos: torch.Tensor) -> None:
        """Clear errors for ids the embedding cannot look up and for captions the tower cannot pool (`has_eos`,
        one value per caption: whether it holds an attended EOS). Meta tensors hold no values to check."""
        if input_ids.is_meta:
            return
        vocab_size = self.config.vocab_size
        out_of_vocabulary = ((input_ids < 0) | (input_ids >= vocab_size)).any()
        # One read-back from the device on the common, valid path.
        if not bool(out_of_vocabulary | ~has_eos.all()):
            return
        if bool(out_of_vocabulary):
            raise ValueError(
                f"input_ids hold ids outside the vocabulary [0, {vocab_size}) (min {int(input_ids.min())}, max "
                f"{int(input_ids.max())}); the tokenizer does not match this model."
            )
        rows = torch.nonzero(~has_eos).flatten().tolist()
        raise ValueError(
            f"input_ids rows {rows} contain no attended end-of-text token (id {self.config.eos_token_id}); the "
            "text tower pools at the first one. Tokenize with the model's tokenizer."
        )
