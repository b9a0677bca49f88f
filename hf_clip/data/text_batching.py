"""Exact batch shaping for speed: trim a tokenized text batch to its longest caption.

The text tower is causal and pools at each caption's first end-of-text token, so a token after that position never
influences the pooled embedding. With trailing padding, every padded column beyond the longest caption can be cut
(real captions average far below the 77-token context, so the text tower's work shrinks by the same factor), and
the padding mask itself becomes unnecessary: each caption's padding lies after its own EOS, where the causal mask
already hides it. Passing `attention_mask=None` afterwards lets sdpa/flash run their `is_causal` kernels without a
materialised mask. The embeddings equal the untrimmed ones up to floating-point summation order.
"""

import torch


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
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids and attention_mask must be (batch, seq_len) of one shape, got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}."
        )
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of}.")
    seq_len = input_ids.shape[1]
    lengths = attention_mask.sum(dim=1)
    right_padded = torch.arange(seq_len, device=attention_mask.device)[None] < lengths[:, None]
    if not torch.equal(attention_mask.bool(), right_padded):
        raise ValueError(
            "trim_to_longest needs right-padded text (each attention_mask row is ones then zeros); left padding or "
            "holes would move tokens relative to the causal mask and EOS pooling."
        )
    kept_length = int(lengths.max())
    if kept_length == 0:
        raise ValueError("every caption in the batch is empty (attention_mask is all zeros).")
    if pad_to_multiple_of is not None:
        kept_length = min(seq_len, -(-kept_length // pad_to_multiple_of) * pad_to_multiple_of)
    return input_ids[:, :kept_length], attention_mask[:, :kept_length]
