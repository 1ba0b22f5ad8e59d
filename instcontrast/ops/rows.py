"""Row layouts without large temporaries: a feature map's pixels as rows, and row-wise dot products.

At the paper's scale a ``(65,536 × 128)`` float32 tensor is 32 MiB; PyTorch's 4-D permuting copy
moves it at about 1 GB/s, and an elementwise product made only to be summed costs a fresh tensor
of that size. These two helpers do the same work with a per-image 2-D transpose (about twice as
fast) and a batched dot product (no ``(N, D)`` temporary).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pixel_rows", "row_dot", "take_rows"]


def _transpose_images(source: Tensor, rows: int, columns: int) -> Tensor:
    """``(B, rows, columns)`` → ``(B, columns, rows)`` contiguous, one 2-D transpose per image."""
    out = source.new_empty(source.shape[0], columns, rows)  # (B, columns, rows)
    for image in range(source.shape[0]):
        out[image].copy_(source[image].t())
    return out


class _PixelRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        batch, dim, height, width = z.shape
        ctx.shape = z.shape
        return _transpose_images(z.reshape(batch, dim, height * width), dim, height * width).view(-1, dim)  # (B·N, D)

    @staticmethod
    def backward(ctx, grad_rows: Tensor) -> Tensor:
        batch, dim, height, width = ctx.shape
        grad = _transpose_images(grad_rows.reshape(batch, height * width, dim), height * width, dim)  # (B, D, N)
        return grad.view(batch, dim, height, width)


def pixel_rows(z: Tensor) -> Tensor:
    r"""The pixels of a feature map as rows: ``z.permute(0, 2, 3, 1).reshape(-1, D)``.

    A view when ``z`` is channels-last already; a contiguous ``(B, D, h, w)`` map is transposed image
    by image (forward and backward), about twice as fast as the 4-D permuting copy.

    Shape:
        - z: :math:`(B, D, h, w)`; output: :math:`(B\cdot h\cdot w, D)`, row ``b·h·w + y·w + x``
    """
    batch, dim, height, width = z.shape
    permuted = z.permute(0, 2, 3, 1)  # (B, h, w, D)
    if permuted.is_contiguous() or not z.is_contiguous() or z.numel() == 0:
        return permuted.reshape(-1, dim)  # a view, or the generic copy for unusual strides
    return _PixelRows.apply(z)


class _RowDot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        return torch.einsum("nd,nd->n", a, b)  # (N,)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        a, b = ctx.saved_tensors
        weight = grad[:, None]  # (N, 1)
        grad_a = b * weight if ctx.needs_input_grad[0] else None  # (N, D)
        grad_b = a * weight if ctx.needs_input_grad[1] else None  # (N, D)
        return grad_a, grad_b


def row_dot(a: Tensor, b: Tensor) -> Tensor:
    r"""``(a * b).sum(-1)`` for ``(N, D)`` rows, :math:`\langle a_n, b_n\rangle`, without the ``(N, D)``
    product (a batched dot forward; backward scales the other rows, as autograd would, but skips
    einsum's batched outer product)."""
    return _RowDot.apply(a, b)


def take_rows(x: Tensor, rows: Tensor | slice) -> Tensor:
    """``x[rows]``: a view for a slice, ``index_select`` for an index (a few times faster than
    advanced indexing for row gathers on CPU)."""
    return x[rows] if isinstance(rows, slice) else torch.index_select(x, 0, rows)
