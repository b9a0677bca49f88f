"""The text tower: token + position embeddings, a causal transformer, final LayerNorm, pooled at the first EOS."""

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_hf_clip import HfClipTextConfig
from .modeling_layers import HfClipEmbeddings, HfClipEncoder, HfClipTextPreTrainedModel, OutputRecorder


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
        seq_len = input_ids.shape[-1]
        max_len = self.position_embedding.num_embeddings
        if seq_len > max_len:
            raise ValueError(f"text of {seq_len} tokens is longer than the model's context of {max_len} tokens.")
        if position_ids is None:
            position_ids = self.position_ids[:, :seq_len]
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)


def causal_padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (batch, 1, query, key) mask that hides future tokens and padded keys."""
    seq_len = attention_mask.shape[-1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=attention_mask.device).tril()
    visible = causal[None, None] & attention_mask[:, None, None, :].bool()
    return torch.zeros(visible.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~visible, torch.finfo(dtype).min
    )


class HfClipTextModel(HfClipTextPreTrainedModel):
    """Causal text transformer; `pooler_output` is the final-LayerNorm state at each sequence's first EOS token."""

    input_embeddings_path = "embeddings.token_embedding"

    def __init__(self, config: HfClipTextConfig):
        super().__init__(config)
        self.embeddings = HfClipTextEmbeddings(config)
        self.encoder = HfClipEncoder(config, is_causal=True)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        recorder: OutputRecorder,
    ) -> BaseModelOutputWithPooling:
        input_ids = input_ids.view(-1, input_ids.shape[-1])
        eos_positions = self.first_eos_positions(input_ids, attention_mask)

        hidden_states = self.embeddings(input_ids, position_ids)
        # Without padding the module's `is_causal` does the masking, so sdpa and flash kernels see no mask tensor.
        mask = None
        if attention_mask is not None and (torch.compiler.is_compiling() or not bool(attention_mask.all())):
            mask = causal_padding_mask(attention_mask.view(input_ids.shape), hidden_states.dtype)
        last_hidden_state = self.final_layer_norm(self.encoder(hidden_states, mask, recorder))
        pooled_output = last_hidden_state[torch.arange(last_hidden_state.shape[0]), eos_positions]
        return recorder.tower_output(last_hidden_state, pooled_output)

    def first_eos_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Index of each row's first attended EOS token (EOS used as left padding is masked out, not pooled)."""
        is_eos = torch.eq(input_ids, self.config.eos_token_id)
        if attention_mask is not None:
            is_eos = is_eos & attention_mask.view(input_ids.shape).bool()
        # The checks read values back from the device, so a compiled graph skips them.
        if not torch.compiler.is_compiling():
            self.check_input_ids(input_ids, is_eos)
        return is_eos.int().argmax(dim=-1)

    def check_input_ids(self, input_ids: torch.Tensor, is_eos: torch.Tensor) -> None:
        """Clear errors for ids the embedding cannot look up and for rows the tower cannot pool."""
        vocab_size = self.config.vocab_size
        out_of_vocabulary = ((input_ids < 0) | (input_ids >= vocab_size)).any()
        rows_without_eos = ~is_eos.any(dim=-1)
        # One read-back from the device on the common, valid path.
        if not bool(out_of_vocabulary | rows_without_eos.any()):
            return
        if bool(out_of_vocabulary):
            raise ValueError(
                f"input_ids hold ids outside the vocabulary [0, {vocab_size}) (min {int(input_ids.min())}, max "
                f"{int(input_ids.max())}); the tokenizer does not match this model."
            )
        rows = torch.nonzero(rows_without_eos).flatten().tolist()
        raise ValueError(
            f"input_ids rows {rows} contain no attended end-of-text token (id {self.config.eos_token_id}); the "
            "text tower pools at the first one. Tokenize with the model's tokenizer."
        )
