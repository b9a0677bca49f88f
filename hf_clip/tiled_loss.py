"""Exact tiled forms of the contrastive (InfoNCE) and sigmoid (SigLIP) losses: memory O(B·d + tile²), not O(B²).

The dense losses in `loss.py` build the whole (rows × columns) logits matrix, its softmax and its gradient: at a
32,768 batch that is 4.3 GB per fp32 matrix. Here the logits exist one (tile × tile) block at a time:

- contrastive: one pass over the blocks of `rows @ columnsᵀ` accumulates each row's and each column's log-sum-exp
  (so one block serves both directions, text→image along rows and image→text along columns); the backward
  recomputes every block and turns it into `softmax` weights with the saved per-row and per-column statistics.
  Four block matmuls in all (two forward, none saved), against the dense loss's six (two logits matrices, and two
  matmuls each in their backward);
- sigmoid: every pair is an independent term, so one pass over the blocks computes the sum and, when a gradient is
  wanted, the gradient too (`σ(logits)` weights), saved as (B × d) tensors: three block matmuls, like the dense
  loss.

The blocks are computed in torch custom ops (`torch.library.custom_op`) with registered autograd, so
`torch.compile` sees one opaque op per kernel instead of unrolling (B / tile)² blocks into the graph. The scale
stays an ordinary autograd op: the kernels take the rows already multiplied by it, and autograd carries its
gradient.
"""

from collections.abc import Callable

import torch
from torch import Tensor

_LIBRARY = "hf_clip"


def _spans(size: int, tile: int) -> list[slice]:
    return [slice(start, min(start + tile, size)) for start in range(0, size, tile)]


def _matched(logits: Tensor, row_span: slice, column_span: slice, offset: int) -> tuple[Tensor, slice]:
    """The block's matched logits (global row i against column offset + i) as a view, and their global rows."""
    diagonal = row_span.start + offset - column_span.start  # column - row of the matched pairs, in the block
    view = logits.diagonal(diagonal)
    first_row = row_span.start + max(-diagonal, 0)
    return view, slice(first_row, first_row + view.shape[0])


def _accumulate(shift: Tensor, total: Tensor, logits: Tensor, dim: int) -> None:
    """Online log-sum-exp along `dim`: fold a block into the running `(shift, Σ exp(x - shift))` in place."""
    new_shift = torch.maximum(shift, logits.amax(dim))
    total.mul_((shift - new_shift).exp_()).add_((logits - new_shift.unsqueeze(dim)).exp_().sum(dim))
    shift.copy_(new_shift)


@torch.library.custom_op(f"{_LIBRARY}::contrastive_lse", mutates_args=())
def _contrastive_lse(
    features: Tensor, columns: Tensor, scale: Tensor, offset: int, tile: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`(row_shift, row_logsum, column_shift, column_logsum, matched)` of `logits = scale · features @ columns.T`:
    each row's log-sum-exp over the columns is `row_shift + row_logsum` (the shift is the row's largest logit), each
    column's over the rows likewise, and `matched[i] = logits[i, offset + i]`. Kept apart, the softmax weights
    `exp(logits - shift - logsum)` of the backward keep fp32 precision of the small `logsum`, not of the (up to 100)
    shift, and the matched logit's -1 joins them per element (as in the dense cross-entropy's softmax - one-hot)."""
    rows = features * scale
    row_shift, row_total = rows.new_full((rows.shape[0],), float("-inf")), rows.new_zeros(rows.shape[0])
    column_shift = rows.new_full((columns.shape[0],), float("-inf"))
    column_total = rows.new_zeros(columns.shape[0])
    matched = rows.new_empty(rows.shape[0])
    column_spans = _spans(columns.shape[0], tile)
    for row_span in _spans(rows.shape[0], tile):
        block_rows = rows[row_span]
        for column_span in column_spans:
            logits = block_rows @ columns[column_span].T
            block_matched, matched_rows = _matched(logits, row_span, column_span, offset)
            matched[matched_rows] = block_matched
            _accumulate(row_shift[row_span], row_total[row_span], logits, dim=1)
            _accumulate(column_shift[column_span], column_total[column_span], logits, dim=0)
    return row_shift, row_total.log_(), column_shift, column_total.log_(), matched


@_contrastive_lse.register_fake
def _(
    rows: Tensor, columns: Tensor, scale: Tensor, offset: int, tile: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    num_rows, num_columns = rows.shape[0], columns.shape[0]
    return (
        rows.new_empty(num_rows),
        rows.new_empty(num_rows),
        rows.new_empty(num_columns),
        rows.new_empty(num_columns),
        rows.new_empty(num_rows),
    )


@torch.library.custom_op(f"{_LIBRARY}::contrastive_lse_backward", mutates_args=())
def _contrastive_lse_backward(
    features: Tensor,
    columns: Tensor,
    scale: Tensor,
    row_stats: Tensor,
    column_stats: Tensor,
    grad_row_logsum: Tensor,
    grad_column_logsum: Tensor,
    grad_matched: Tensor,
    offset: int,
    tile: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `Σ grad_row_logsum·row_lse + Σ grad_column_logsum·column_lse + Σ grad_matched·matched` w.r.t.
    `features`, `columns` and `scale` (the shifts are constants: any shift gives the same log-sum-exp). Each block's
    weights are the row softmax times the row's gradient, plus the column softmax times the column's, plus
    `grad_matched` on the matched pairs; `*_stats` stack `(shift, logsum)`. The scale's gradient is
    Σ weights·logits / scale, summed per element as the dense loss does (through the features it would be a
    difference of large sums)."""
    rows = features * scale
    grad_rows = torch.zeros_like(rows)
    grad_columns = torch.zeros_like(columns)
    # A sum of (B / tile)² block sums with cancellation (the matched pairs' weights are negative): in float64.
    grad_scale = rows.new_zeros((), dtype=torch.float64)
    column_spans = _spans(columns.shape[0], tile)
    for row_span in _spans(rows.shape[0], tile):
        block_rows = rows[row_span]
        row_shift, row_logsum = row_stats[:, row_span, None]
        row_grad = grad_row_logsum[row_span, None]
        for column_span in column_spans:
            block_columns = columns[column_span]
            column_shift, column_logsum = column_stats[:, None, column_span]
            logits = block_rows @ block_columns.T
            weights = (logits - row_shift).sub_(row_logsum).exp_().mul_(row_grad)
            column_weights = (logits - column_shift).sub_(column_logsum).exp_()
            weights += column_weights.mul_(grad_column_logsum[None, column_span])
            block_matched, matched_rows = _matched(weights, row_span, column_span, offset)
            block_matched += grad_matched[matched_rows]
            grad_scale += torch.dot(weights.flatten(), logits.flatten()).double()
            grad_rows[row_span].addmm_(weights, block_columns)
            grad_columns[column_span].addmm_(weights.T, block_rows)
    return grad_rows.mul_(scale), grad_columns, (grad_scale / scale).to(scale.dtype).reshape(scale.shape)


@_contrastive_lse_backward.register_fake
def _(
    features, columns, scale, row_stats, column_stats, grad_row_logsum, grad_column_logsum, grad_matched, offset, tile
):
    return torch.empty_like(features), torch.empty_like(columns), torch.empty_like(scale)


def _contrastive_lse_setup(ctx, inputs, output) -> None:
    features, columns, scale, ctx.offset, ctx.tile = inputs
    row_shift, row_logsum, column_shift, column_logsum, _ = output
    ctx.save_for_backward(
        features, columns, scale, torch.stack([row_shift, row_logsum]), torch.stack([column_shift, column_logsum])
    )


def _contrastive_lse_grad(ctx, _grad_row_shift, grad_row_logsum, _grad_column_shift, grad_column_logsum, grad_matched):
    features, columns, scale, row_stats, column_stats = ctx.saved_tensors
    return (
        *_contrastive_lse_backward(
            features,
            columns,
            scale,
            row_stats,
            column_stats,
            grad_row_logsum,
            grad_column_logsum,
            grad_matched,
            ctx.offset,
            ctx.tile,
        ),
        None,
        None,
    )


_contrastive_lse.register_autograd(_contrastive_lse_grad, setup_context=_contrastive_lse_setup)


@torch.library.custom_op(f"{_LIBRARY}::sigmoid_pair_sum", mutates_args=())
def _sigmoid_pair_sum(
    rows: Tensor, columns: Tensor, bias: Tensor, offset: int, tile: int, with_grad: bool
) -> list[Tensor]:
    """`[Σ_ij -log σ(z_ij · (rows_i·columns_j + bias))]` (z = +1 where j = offset + i, else -1), and with `with_grad`
    its gradients w.r.t. rows, columns and bias."""
    total = rows.new_zeros(())
    grads = [torch.zeros_like(rows), torch.zeros_like(columns), torch.zeros_like(bias)] if with_grad else []
    column_spans = _spans(columns.shape[0], tile)
    for row_span in _spans(rows.shape[0], tile):
        block_rows = rows[row_span]
        for column_span in column_spans:
            block_columns = columns[column_span]
            # -log σ(z·x) = softplus(-z·x): softplus(x) for the unmatched pairs, softplus(-x) for the matched ones
            # (a diagonal of the block, at column - row = this offset; empty for the blocks it misses).
            logits = torch.addmm(bias, block_rows, block_columns.T)
            matched = logits.diagonal(row_span.start + offset - column_span.start)
            matched.neg_()
            total += torch.nn.functional.softplus(logits).sum()
            if with_grad:
                # d softplus(-z·x) / dx = -z·σ(-z·x)
                weights = logits.sigmoid_()
                matched.neg_()
                grads[0][row_span].addmm_(weights, block_columns)
                grads[1][column_span].addmm_(weights.T, block_rows)
                grads[2] += weights.sum()
    return [total, *grads]


@_sigmoid_pair_sum.register_fake
def _(rows, columns, bias, offset, tile, with_grad):
    grads = [torch.empty_like(rows), torch.empty_like(columns), torch.empty_like(bias)] if with_grad else []
    return [rows.new_empty(()), *grads]


def _sigmoid_pair_sum_setup(ctx, inputs, output) -> None:
    ctx.with_grad = inputs[5]
    if ctx.with_grad:
        ctx.save_for_backward(*output[1:])


def _sigmoid_pair_sum_grad(ctx, grads: list[Tensor]):
    if not ctx.with_grad:
        raise RuntimeError("tiled sigmoid loss: its gradient was not computed (called with gradients disabled).")
    grad_total = grads[0]
    return *(grad_total * grad for grad in ctx.saved_tensors), None, None, None


_sigmoid_pair_sum.register_autograd(_sigmoid_pair_sum_grad, setup_context=_sigmoid_pair_sum_setup)


def check_tile_size(tile_size: int) -> None:
    if not isinstance(tile_size, int) or isinstance(tile_size, bool) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive integer, got {tile_size!r}.")


def tiled_clip_loss(
    text_embeds: Tensor,
    image_embeds: Tensor,
    logit_scale: Tensor | float,
    tile_size: int,
    offset: int = 0,
    gather_column_lse: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The symmetric contrastive loss of `text_embeds` (rows) against `image_embeds` (all columns), row i matching
    column `offset + i`, computed in (tile × tile) blocks; equal to `ClipLoss`'s value and gradients.

    On one process (`offset=0`, rows and columns the same batch) it is `clip_loss(logit_scale · text @ imageᵀ)`. Across
    ranks, `text_embeds` are this rank's texts, `image_embeds` the images of every rank (gathered with gradients),
    and `gather_column_lse` an autograd all-gather along dim 0: the image→text direction of this rank's images needs
    each column's log-sum-exp over the texts of every rank, which is combined from the ranks' partial column
    statistics (one all-gather of 2 × world_size × B floats instead of a second feature all-gather).
    """
    check_tile_size(tile_size)
    local_batch = text_embeds.shape[0]
    scale = torch.as_tensor(logit_scale, dtype=text_embeds.dtype, device=text_embeds.device)
    row_shift, row_logsum, column_shift, column_logsum, matched = _contrastive_lse(
        text_embeds, image_embeds, scale, offset, tile_size
    )
    # The shifts are constants of the reparametrisation lse = shift + logsum (their gradient is not needed).
    row_shift, column_shift = row_shift.detach(), column_shift.detach()
    if gather_column_lse is not None:
        # Every rank's partial column statistics, (world, 2, columns): one log-sum-exp over the ranks.
        shifts, logsums = (
            gather_column_lse(torch.stack([column_shift, column_logsum])).view(-1, 2, len(column_shift)).unbind(1)
        )
        column_shift = shifts.amax(dim=0).detach()
        column_logsum = torch.logsumexp(shifts - column_shift + logsums, dim=0)
    local = slice(offset, offset + local_batch)
    # Per pair first: a well-trained pair's shift is its matched logit, so subtract before summing.
    pair_losses = (row_shift - matched) + row_logsum + (column_shift[local] - matched) + column_logsum[local]
    return pair_losses.sum() / (2 * local_batch)


def tiled_sigmoid_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    tile_size: int,
    offset: int = 0,
) -> Tensor:
    """SigLIP's loss of `image_embeds` (rows) against `text_embeds` (all columns), row i matching column
    `offset + i`, in (tile × tile) blocks; equal to `sigmoid_loss(logit_scale · image @ textᵀ + logit_bias, labels)`.

    Every pair is an independent term, summed block by block with the matched pairs' sign flipped where the
    diagonal crosses a block; the gradient is computed in the same pass (no recompute: the loss is one number).
    """
    check_tile_size(tile_size)
    rows = logit_scale * image_embeds
    bias = torch.as_tensor(logit_bias, dtype=rows.dtype, device=rows.device)
    with_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (rows, text_embeds, bias))
    return _sigmoid_pair_sum(rows, text_embeds, bias, offset, tile_size, with_grad)[0] / rows.shape[0]
