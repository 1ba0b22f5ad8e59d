r"""``torch.distributed`` helpers: variable-length, autograd-aware all-gather of pixel rows.

Every function is the identity when no process group is initialized (or the world has one rank),
so single-process code needs no special case.

Gradient convention: :func:`all_gather_rows_with_grad` returns, in backward, the *sum over ranks*
of the gradients that reach a rank's own rows (``all_reduce(SUM)`` then slice). Each rank's loss
uses every rank's rows, so this is the gradient of :math:`\sum_r L_r`; DDP's ``1/W`` averaging
of parameter gradients then gives exactly the gradient of :math:`\frac1W\sum_r L_r`. The loss
module makes that the single-process mean over the concatenated batch for any per-rank anchor
counts by returning :math:`L_r = W\sum_{a\in r}\ell_a / A_{\text{all}}`, with
:math:`A_{\text{all}}` from :func:`all_reduce_count` — no stray factor of ``W``.

Collective order: every function here is a collective. Callers must make every rank call the same
functions in the same order, including ranks that hold zero rows (a zero-row gather is fine).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_rows", "all_gather_rows_with_grad", "all_reduce_count", "gathered_offset", "world_info"]


def world_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_sizes(count: int, device: torch.device) -> list[int]:
    size = torch.tensor([count], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def _gather_padded(rows: Tensor, sizes: list[int]) -> Tensor:
    longest = max(sizes)
    if longest == 0:  # every rank agrees (same sizes everywhere), so all skip the collective together
        return rows.new_zeros((0,) + tuple(rows.shape[1:]))
    padded = rows.new_zeros((longest,) + tuple(rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    buckets = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(buckets, padded.contiguous())
    return torch.cat([bucket[:size] for bucket, size in zip(buckets, sizes)], dim=0)


def gathered_offset(count: int, device: torch.device | None = None) -> int:
    """Where this rank's ``count`` rows start in the rank-ordered concatenation (0 in one process)."""
    rank, world = world_info()
    if world == 1:
        return 0
    sizes = _gather_sizes(count, device or torch.device("cpu"))
    return sum(sizes[:rank])


def all_reduce_count(count: int, device: torch.device | None = None) -> int:
    r"""Sum of ``count`` over all ranks (``count`` itself in one process).

    Every rank must call it (a rank with nothing to count passes 0).

    .. math::
        n_{\text{all}} = \sum_{r=0}^{W-1} n_r
    """
    _, world = world_info()
    if world == 1:
        return int(count)
    total = torch.tensor([int(count)], dtype=torch.long, device=device or torch.device("cpu"))
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return int(total)


@torch.no_grad()
def all_gather_rows(rows: Tensor) -> Tensor:
    r"""Concatenate every rank's rows in rank order (rows may differ in number across ranks).

    Shape:
        - rows: :math:`(n_r, \ldots)` on rank ``r``; output :math:`(\sum_r n_r, \ldots)`
    """
    _, world = world_info()
    if world == 1:
        return rows
    return _gather_padded(rows.detach(), _gather_sizes(rows.shape[0], rows.device))


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: Tensor):
        sizes = _gather_sizes(rows.shape[0], rows.device)
        rank = dist.get_rank()
        ctx.start = sum(sizes[:rank])
        ctx.count = sizes[rank]
        return _gather_padded(rows, sizes)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad = grad_output.contiguous().clone()
        if grad.numel() > 0:  # the gathered size is the same on every rank: all skip together
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.count]


def all_gather_rows_with_grad(rows: Tensor) -> Tensor:
    r"""Like :func:`all_gather_rows`, but gradients flow back to the rank that owns each row.

    Shape:
        - rows: :math:`(n_r, \ldots)` on rank ``r``; output :math:`(\sum_r n_r, \ldots)`

    Returns:
        The rank-ordered concatenation; in backward each rank receives the sum over ranks of the
        gradient with respect to its own rows (see the module docstring for why that is right).
    """
    _, world = world_info()
    if world == 1:
        return rows
    return _AllGatherRows.apply(rows)
