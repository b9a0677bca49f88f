"""Text past the trained context: Long-CLIP's stretching of the text tower's position embeddings.

Long-CLIP (Zhang et al. 2024, "Long-CLIP: Unlocking the Long-Text Capability of CLIP", §3.1, "knowledge-preserved
stretching") finds that CLIP's first ~20 positions are well trained and the later ones barely, because training
captions are short. It keeps the first 20 positions as they are and stretches the other L − 20 over the new length
by linear interpolation, then fine-tunes briefly; its released models read 248 = 20 + 4·(77 − 20) tokens.
"""

import torch

# Long-CLIP's number of leading positions kept unchanged.
LONG_CLIP_KEPT_POSITIONS = 20


def check_stretch(length: int, new_length: int, kept: int = LONG_CLIP_KEPT_POSITIONS) -> None:
    """Clear errors for a stretch the rule cannot make: to fewer positions, or of a table with nothing to stretch."""
    if isinstance(new_length, bool) or not isinstance(new_length, int):
        raise TypeError(f"the new text length must be an int, got {type(new_length).__name__}.")
    if new_length < length:
        raise ValueError(
            f"cannot stretch the text positions to {new_length}: the model reads {length} tokens, and stretching only "
            f"lengthens the context (text longer than the context is truncated by the processor)."
        )
    if not 0 <= kept <= length - 2:
        raise ValueError(
            f"Long-CLIP's rule keeps the first {kept} positions and interpolates between the remaining ones: a text "
            f"tower with {length} positions needs at least {kept + 2} (pass a smaller `kept`)."
        )


def stretched_positions(
    positions: torch.Tensor, new_length: int, kept: int = LONG_CLIP_KEPT_POSITIONS
) -> torch.Tensor:
    """The (new_length, width) position table stretched from `positions` (length L, width) by Long-CLIP's rule.

    The rule, with K = `kept` and stretch factor λ = (new_length − K) / (L − K):
    - positions p < K are copied unchanged;
    - position p ≥ K takes the source coordinate x = K + (p − K) / λ and the linear interpolation
      (1 − w)·PE[i] + w·PE[i + 1], where i = min(⌊x⌋, L − 2) and w = x − i. Past the last source position
      (x > L − 1, the last ⌈λ⌉ − 1 new positions) this continues the line through PE[L − 2] and PE[L − 1], i.e.
      PE[L − 1] + (x − L + 1)·(PE[L − 1] − PE[L − 2]).
    With Long-CLIP's numbers (K = 20, L = 77, new_length = 248, λ = 4) new position 20 + 4j + r (r = 0..3) is
    (1 − r/4)·PE[20 + j] + (r/4)·PE[21 + j], and the last four are PE[76] + (r/4)·(PE[76] − PE[75]): the table of
    the authors' release. At λ = 1 every weight is exactly 0 or 1 and the table is returned bit for bit.
    """
    length = positions.shape[0]
    check_stretch(length, new_length, kept)
    source = positions.float()
    new_positions = torch.arange(kept, new_length, dtype=torch.float64, device=positions.device)
    # float64 coordinates: weights such as 1/4 come out exact, and λ = 1 gives integer coordinates.
    coordinates = kept + (new_positions - kept) * (length - kept) / (new_length - kept)
    lower = coordinates.floor().long().clamp(max=length - 2)
    weights = (coordinates - lower).to(source.dtype)[:, None]
    stretched = torch.lerp(source[lower], source[lower + 1], weights)
    return torch.cat([source[:kept], stretched]).to(positions.dtype)


__all__ = ["LONG_CLIP_KEPT_POSITIONS", "check_stretch", "stretched_positions"]
