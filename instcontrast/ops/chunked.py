r"""Memory-bounded sampled log-sum-exp: a ``torch.autograd.Function`` that recomputes in backward.

Forward walks over blocks of anchors, gathers each block's negatives ``(c, R, D)``, reduces them
to one log-sum-exp per anchor and throws the block away. It saves only the inputs (which the
caller holds anyway), the ``(A, R)`` indices and the ``(A,)`` log-sum-exp. Backward walks the same
blocks again, recomputes the similarities, and forms

.. math::
    \pi_{a,r} = \exp(\mathrm{scale}\,\langle x_a, m_{i_{a,r}}\rangle - \mathrm{lse}_a),\qquad
    \frac{\partial L}{\partial x_a} = g_a\,\mathrm{scale}\sum_r \pi_{a,r}\, m_{i_{a,r}},\qquad
    \frac{\partial L}{\partial m_j} = \mathrm{scale}\sum_{(a,r):\, i_{a,r}=j} g_a\,\pi_{a,r}\, x_a,

the second accumulated with ``index_add_`` so a pool row sampled many times gets every
contribution. Peak extra memory is one block, independent of ``A``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._amp import without_autocast
from .rows import take_rows

__all__ = [
    "accumulation_dtype",
    "block_scores",
    "blocked_logsumexp_and_negative_sum",
    "default_block_size",
    "sampled_logsumexp_blocked",
    "sampled_logsumexp_chunked",
]

_TARGET_BLOCK_BYTES = 2 * 1024 * 1024  # one gathered block of negatives, sized to stay in cache


def default_block_size(num_negatives: int, dim: int) -> int:
    """Anchors per block so that one gathered ``(c, R, D)`` float32 block is about 2 MiB."""
    return max(1, _TARGET_BLOCK_BYTES // max(1, 4 * num_negatives * dim))


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise (half inputs accumulate in float32)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


class _SampledLogSumExp(torch.autograd.Function):
    @staticmethod
    @without_autocast(1)
    def forward(ctx, anchors: Tensor, pool: Tensor, negative_index: Tensor, scale: float, block_size: int):
        accumulate = accumulation_dtype(anchors.dtype, pool.dtype)
        anchors32 = anchors.to(accumulate).contiguous()  # (A, D)
        pool32 = pool.to(accumulate).contiguous()  # (M, D)
        index = negative_index.contiguous()  # (A, R)
        num_anchors = anchors32.shape[0]
        lse = torch.empty(num_anchors, dtype=accumulate, device=anchors.device)  # (A,)
        for start in range(0, num_anchors, block_size):
            stop = min(start + block_size, num_anchors)
            negatives = pool32[index[start:stop]]  # (c, R, D)
            similarities = torch.bmm(negatives, anchors32[start:stop, :, None]).squeeze(-1) * scale  # (c, R)
            lse[start:stop] = torch.logsumexp(similarities, dim=1)
        ctx.save_for_backward(anchors, pool, index, lse)
        ctx.scale = scale
        ctx.block_size = block_size
        return lse

    @staticmethod
    @without_autocast(1)
    def backward(ctx, grad_lse: Tensor):
        anchors, pool, index, lse = ctx.saved_tensors
        scale, block_size = ctx.scale, ctx.block_size
        need_anchor_grad, need_pool_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        accumulate = lse.dtype
        anchors32 = anchors.to(accumulate).contiguous()
        pool32 = pool.to(accumulate).contiguous()
        grad_lse = grad_lse.to(accumulate)
        grad_anchors = torch.zeros_like(anchors32) if need_anchor_grad else None  # (A, D)
        grad_pool = torch.zeros_like(pool32) if need_pool_grad else None  # (M, D)
        for start in range(0, anchors32.shape[0], block_size):
            stop = min(start + block_size, anchors32.shape[0])
            block_index = index[start:stop]  # (c, R)
            negatives = pool32[block_index]  # (c, R, D)
            block_anchors = anchors32[start:stop]  # (c, D)
            similarities = torch.bmm(negatives, block_anchors[:, :, None]).squeeze(-1) * scale  # (c, R)
            weights = torch.exp(similarities - lse[start:stop, None])  # (c, R), softmax over R
            weights = weights * (grad_lse[start:stop, None] * scale)  # (c, R)
            if grad_anchors is not None:
                grad_anchors[start:stop] = torch.bmm(weights[:, None, :], negatives).squeeze(1)  # (c, D)
            if grad_pool is not None:
                contributions = weights[:, :, None] * block_anchors[:, None, :]  # (c, R, D)
                grad_pool.index_add_(0, block_index.reshape(-1), contributions.reshape(-1, pool32.shape[1]))
        if grad_anchors is not None:
            grad_anchors = grad_anchors.to(anchors.dtype)
        if grad_pool is not None:
            grad_pool = grad_pool.to(pool.dtype)
        return grad_anchors, grad_pool, None, None, None


def sampled_logsumexp_chunked(
    anchors: Tensor, pool: Tensor, negative_index: Tensor, scale: float, block_size: int | None = None
) -> Tensor:
    r"""Memory-bounded equivalent of :func:`~instcontrast.ops.reference.sampled_logsumexp_reference`.

    .. math::
        \mathrm{lse}_a = \log \sum_{r=1}^{R} \exp\big(\mathrm{scale}\cdot\langle x_a, m_{i_{a,r}}\rangle\big)

    Args:
        anchors: anchor embeddings.
        pool: candidate embeddings that the indices point into.
        negative_index: for each anchor, ``R`` row indices into ``pool``.
        scale: multiplier of the dot products (``1 / temperature``).
        block_size: anchors per block; default keeps one gathered block near 2 MiB.

    Shape:
        - anchors: :math:`(A, D)`; pool: :math:`(M, D)`; negative_index: :math:`(A, R)`
        - output: :math:`(A,)`, float32 (float64 for float64 inputs)

    Returns:
        The per-anchor log-sum-exp, differentiable with respect to ``anchors`` and ``pool``.
    """
    if block_size is None:
        block_size = default_block_size(negative_index.shape[1], anchors.shape[1])
    return _SampledLogSumExp.apply(anchors, pool, negative_index, float(scale), int(block_size))


def block_scores(block_anchors: Tensor, pool: Tensor, blocks: Any, block: int, block_pool: Tensor | None = None) -> Tensor:
    """Dot products of one block's anchors with its candidates, ``(c, m)``, segment by segment.

    ``block_pool`` is ``pool[blocks.candidates[block]]`` if the caller has it. Entries outside every
    segment (rows that never point into those columns) are left uninitialized: they are never read.
    """
    if block_pool is None:
        block_pool = take_rows(pool, blocks.candidates[block])  # (m, D)
    segments = blocks.block_segments(block)
    if len(segments) == 1 and segments[0][0] is None and segments[0][1] == 0:
        return block_anchors @ block_pool.T  # (c, m)
    scores = block_anchors.new_empty(block_anchors.shape[0], block_pool.shape[0])  # (c, m)
    for rows, lo, hi in segments:
        if isinstance(rows, Tensor):  # a row subset: gather and scatter
            scores[rows, lo:hi] = block_anchors[rows] @ block_pool[lo:hi].T
        else:  # every row or a prefix slice: write the view in place
            rows = slice(None) if rows is None else rows
            torch.mm(block_anchors[rows], block_pool[lo:hi].T, out=scores[rows, lo:hi])
    return scores


class _BlockedLogSumExp(torch.autograd.Function):
    """Same value as :class:`_SampledLogSumExp`, for negatives given as candidate blocks; also returns
    the sum of the chosen negatives' dot products (no gradient)."""

    @staticmethod
    @without_autocast(1)
    def forward(ctx, anchors: Tensor, pool: Tensor, scale: float, blocks: Any):
        accumulate = accumulation_dtype(anchors.dtype, pool.dtype)
        anchors_acc = anchors.to(accumulate)  # (A, D)
        pool_acc = pool.to(accumulate)  # (M, D)
        lse = torch.empty(anchors.shape[0], dtype=accumulate, device=anchors.device)  # (A,)
        negative_sum = torch.zeros((), dtype=accumulate, device=anchors.device)  # Σ_a Σ_r <x_a, m_{i_ar}>
        keep_softmax = any(ctx.needs_input_grad[:2])
        softmax_of_block = []
        for block, block_columns in enumerate(blocks.columns):
            rows = blocks.block_rows(block)  # the block's anchors: a slice, or (c,) with a row order
            scores = block_scores(take_rows(anchors_acc, rows), pool_acc, blocks, block)  # (c, m)
            chosen = scores.gather(1, block_columns.long())  # (c, R) the negatives' dot products
            negative_sum += chosen.sum()
            logits = chosen.mul_(scale)  # (c, R)
            block_lse = torch.logsumexp(logits, dim=1)  # (c,)
            lse[rows] = block_lse
            if keep_softmax:  # d lse / d logit: what backward needs, so it never scores the block again
                softmax_of_block.append(logits.sub_(block_lse[:, None]).exp_())  # (c, R)
        ctx.save_for_backward(anchors, pool)
        ctx.softmax_of_block = tuple(softmax_of_block)  # Σ_b c_b·R = A·R values, like the negatives' index
        ctx.scale = scale
        ctx.blocks = blocks  # index tensors only: nothing here requires grad
        ctx.mark_non_differentiable(negative_sum)
        return lse, negative_sum

    @staticmethod
    @without_autocast(1)
    def backward(ctx, grad_lse: Tensor, _grad_negative_sum: Tensor | None):
        anchors, pool = ctx.saved_tensors
        blocks, scale = ctx.blocks, ctx.scale
        accumulate = accumulation_dtype(anchors.dtype, pool.dtype)
        need_anchor_grad, need_pool_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        anchors_acc = anchors.to(accumulate) if need_pool_grad else None
        pool_acc = pool.to(accumulate) if need_anchor_grad else None
        grad_lse = grad_lse.to(accumulate)
        grad_anchors = torch.zeros(anchors.shape, dtype=accumulate, device=anchors.device) if need_anchor_grad else None  # (A, D)
        grad_pool = torch.zeros(pool.shape, dtype=accumulate, device=pool.device) if need_pool_grad else None  # (M, D)
        for block, block_columns in enumerate(blocks.columns):
            block_columns = block_columns.long()  # (c, R) scatter indices (stored as int32)
            block_rows = blocks.block_rows(block)  # the block's anchors: a slice, or (c,) with a row order
            candidates = blocks.candidates[block]  # (m,)
            weights = ctx.softmax_of_block[block] * (grad_lse[block_rows, None] * scale)  # (c, R)
            # d lse / d score[c, j] summed over the slots that chose column j (repeats add up)
            score_grad = torch.zeros(block_columns.shape[0], candidates.numel(), dtype=accumulate, device=anchors.device)
            score_grad.scatter_add_(1, block_columns, weights)  # (c, m)
            block_pool = take_rows(pool_acc, candidates) if pool_acc is not None else None  # (m, D)
            block_anchors = take_rows(anchors_acc, block_rows) if anchors_acc is not None else None  # (c, D)
            anchor_grad = torch.zeros(block_columns.shape[0], anchors.shape[1], dtype=accumulate, device=anchors.device) if need_anchor_grad else None  # (c, D)
            candidate_grad = torch.zeros(candidates.numel(), pool.shape[1], dtype=accumulate, device=pool.device) if need_pool_grad else None  # (m, D)
            for rows, lo, hi in blocks.block_segments(block):
                gathered = isinstance(rows, Tensor)  # a row subset (distinct rows), else every row or a prefix slice
                rows = slice(None) if rows is None else rows
                segment_grad = score_grad[rows, lo:hi]  # (p, m_s): a view unless gathered
                if anchor_grad is not None:
                    if gathered:
                        anchor_grad.index_add_(0, rows, segment_grad @ block_pool[lo:hi])
                    else:
                        anchor_grad[rows].addmm_(segment_grad, block_pool[lo:hi])  # (p, D)
                if candidate_grad is not None:
                    candidate_grad[lo:hi].addmm_(segment_grad.T, block_anchors[rows])  # (m_s, D)
            if grad_anchors is not None:
                if isinstance(block_rows, slice):
                    grad_anchors[block_rows] += anchor_grad
                else:  # distinct anchors: index_add_ adds each row once
                    grad_anchors.index_add_(0, block_rows, anchor_grad)
            if grad_pool is not None:
                grad_pool.index_add_(0, candidates, candidate_grad)  # repeated candidates add up
        if grad_anchors is not None:
            grad_anchors = grad_anchors.to(anchors.dtype)
        if grad_pool is not None:
            grad_pool = grad_pool.to(pool.dtype)
        return grad_anchors, grad_pool, None, None


def sampled_logsumexp_blocked(anchors: Tensor, pool: Tensor, blocks, scale: float) -> Tensor:
    r"""Sampled log-sum-exp for negatives in block form (one matrix product per block).

    For the anchors of block :math:`b` with candidate rows :math:`P_b = \mathrm{pool}[\mathrm{cand}_b]`
    (:math:`m_b \times D`), it forms the block's scores :math:`S_b = X_b P_b^\top` and gathers each
    anchor's ``R`` chosen columns. Backward scatters the softmax weights into an
    :math:`(c_b, m_b)` matrix :math:`G_b` and uses :math:`G_b P_b` and :math:`G_b^\top X_b` — matrix
    products instead of gathering :math:`c_b R` rows of width ``D``. Forward keeps the chosen
    negatives' softmax weights (``A·R`` values, the size of the negatives' index), so backward needs
    no scoring product; no ``(c_b, m_b)`` matrix outlives its block.

    Args:
        anchors: anchor embeddings.
        pool: candidate embeddings.
        blocks: :class:`~instcontrast.sampler.CandidateBlocks` from the sampler.
        scale: multiplier of the dot products (``1 / temperature``).

    Shape:
        - anchors: :math:`(A, D)`; pool: :math:`(M, D)`; output: :math:`(A,)`

    Returns:
        The per-anchor log-sum-exp, equal to :func:`sampled_logsumexp_chunked` on
        ``blocks.to_index()``.
    """
    return blocked_logsumexp_and_negative_sum(anchors, pool, blocks, scale)[0]


def blocked_logsumexp_and_negative_sum(anchors: Tensor, pool: Tensor, blocks, scale: float) -> tuple[Tensor, Tensor]:
    r""":func:`sampled_logsumexp_blocked` plus :math:`\sum_a \sum_r \langle x_a, m_{i_{a,r}}\rangle` (no gradient).

    The sum of the negatives' dot products falls out of the forward pass (the chosen scores are
    formed anyway), so a caller that reports the mean negative similarity need not score the blocks
    a second time.

    Returns:
        ``(lse, negative_sum)``: ``(A,)`` (differentiable) and a scalar, both float32 (float64 for
        float64 inputs).
    """
    return _BlockedLogSumExp.apply(anchors, pool, float(scale), blocks)
