"""Obviously-correct reference for the sampled negative log-sum-exp.

Every fast path (``chunked``, ``triton``) is tested against this function, in value and in
gradient. It materializes the gathered negatives ``(A, R, D)`` and lets autograd differentiate.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .chunked import accumulation_dtype

__all__ = ["sampled_logsumexp_reference"]


def sampled_logsumexp_reference(anchors: Tensor, pool: Tensor, negative_index: Tensor, scale: float) -> Tensor:
    r"""Log-sum-exp of scaled similarities between each anchor and its sampled negatives.

    .. math::
        \mathrm{lse}_a = \log \sum_{r=1}^{R} \exp\big(\mathrm{scale}\cdot\langle x_a, m_{i_{a,r}}\rangle\big)

    Args:
        anchors: anchor embeddings.
        pool: candidate embeddings that the indices point into.
        negative_index: for each anchor, ``R`` row indices into ``pool`` (repeats allowed).
        scale: multiplier of the dot products (``1 / temperature``).

    Shape:
        - anchors: :math:`(A, D)`
        - pool: :math:`(M, D)`
        - negative_index: :math:`(A, R)`, integer
        - output: :math:`(A,)`, float32 (float64 for float64 inputs; half inputs accumulate in float32)

    Returns:
        The per-anchor log-sum-exp over the ``R`` negatives.
    """
    accumulate = accumulation_dtype(anchors.dtype, pool.dtype)
    negatives = pool.to(accumulate)[negative_index]  # (A, R, D)
    similarities = torch.einsum("ad,ard->ar", anchors.to(accumulate), negatives) * scale  # (A, R)
    return torch.logsumexp(similarities, dim=1)  # (A,)
