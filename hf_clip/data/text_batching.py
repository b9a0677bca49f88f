"""Exact batch shaping for speed: trim a tokenized text batch to its longest caption, or pack it without padding.

The text tower is causal and pools at each caption's first end-of-text token, so a token after that position never
influences the pooled embedding, and a padded tail (after each caption's EOS) changes nothing. Two layouts use this:

- `trim_to_longest` cuts the padded columns beyond the longest caption: the text tower's work follows
  batch × longest caption. The padding mask becomes unnecessary (each caption's padding lies after its own EOS,
  where the causal mask already hides it), so `attention_mask=None` lets sdpa/flash run their `is_causal` kernels.
- `pack_text` keeps only the real tokens, back to back in one sequence with each caption's boundaries
  (`cu_seqlens`): the work follows the sum of caption lengths. `HfClipTextModel.encode_packed` embeds it.

Both run on the CPU batch (data-loader side), where lengths are known without reading values back from a device.
The embeddings equal the padded, masked ones up to floating-point summation order.
"""

from typing import NamedTuple

import torch


def _right_padded_lengths(input_ids: torch.Tensor, attention_mask: torch.Tensor, caller: str) -> torch.Tensor:
    """Tokens per row of a right-padded batch; raises on other shapes and on left padding or holes."""
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids and attention_mask must be (batch, seq_len) of one shape, got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}."
        )
    lengths = attention_mask.sum(dim=1)
    right_padded = torch.arange(input_ids.shape[1], device=attention_mask.device)[None] < lengths[:, None]
    if not torch.equal(attention_mask.bool(), right_padded):
        raise ValueError(
            f"{caller} needs right-padded text (each attention_mask row is ones then zeros); left padding or holes "
            "would move tokens relative to the causal mask and EOS pooling."
        )
    return lengths


def trim_to_longest(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_to_multiple_of: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the columns after the longest caption of a right-padded batch.

    Args:
        input_ids: (batch, seq_len) token ids, padding at the end of each row.
        attention_mask: (batch, seq_len), 1 on tokens and 0 on padding; every row must be ones followed by zeros.
        pad_to_multiple_of: round the kept length up to a multiple of this (capped at `seq_len`), so that a
            `torch.compile`d step sees a handful of shapes instead of one per batch.

    Returns:
        `(input_ids, attention_mask)` with `kept_length` columns. Call it on the CPU batch (in the collate function)
        so reading the length back costs no device synchronisation.
    """
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of}.")
    lengths = _right_padded_lengths(input_ids, attention_mask, "trim_to_longest")
    kept_length = int(lengths.max())
    if kept_length == 0:
        raise ValueError("every caption in the batch is empty (attention_mask is all zeros).")
    if pad_to_multiple_of is not None:
        kept_length = min(input_ids.shape[1], -(-kept_length // pad_to_multiple_of) * pad_to_multiple_of)
    return input_ids[:, :kept_length], attention_mask[:, :kept_length]


class PackedText(NamedTuple):
    """A batch of captions as one sequence of their real tokens (the layout of `HfClipTextModel.encode_packed`).

    Caption `i` is `input_ids[0, cu_seqlens[i]:cu_seqlens[i + 1]]`; its positions restart at 0. The names and
    shapes follow transformers' packed ("flattened") batches: a batch of one sequence with per-token positions.
    """

    input_ids: torch.Tensor  # (1, total_tokens)
    position_ids: torch.Tensor  # (1, total_tokens), each token's position in its caption
    cu_seqlens: torch.Tensor  # (batch + 1,) int32 caption boundaries, cu_seqlens[0] = 0

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedText":
        return PackedText(*(tensor.to(device, non_blocking=non_blocking) for tensor in self))


def pack_text(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedText:
    """The attended tokens of a right-padded batch, packed without padding.

    Call it on the CPU batch: the caption lengths are read there, so the packed step never reads them back from the
    device. Every row needs at least one token; rows must be right-padded (as the tokenizer writes them), since
    positions are counted from each row's first column.
    """
    lengths = _right_padded_lengths(input_ids, attention_mask, "pack_text")
    if not bool((lengths > 0).all()):
        empty = torch.nonzero(lengths == 0).flatten().tolist()
        raise ValueError(f"rows {empty} are empty (attention_mask all zeros); every caption needs its tokens.")
    attended = attention_mask.bool()
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=input_ids.device)
    cu_seqlens[1:] = lengths.cumsum(dim=0)
    return PackedText(input_ids[attended][None], positions[attended][None], cu_seqlens)
