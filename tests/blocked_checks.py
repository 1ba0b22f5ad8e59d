"""The blocked log-sum-exp against the obviously-correct reference: values and gradients on cloned inputs."""

from __future__ import annotations

import torch

from instcontrast.ops.chunked import sampled_logsumexp_blocked
from instcontrast.ops.reference import sampled_logsumexp_reference


def assert_blocked_matches_reference(anchors: torch.Tensor, pool: torch.Tensor, blocks, scale: float, upstream: torch.Tensor) -> None:
    """``sampled_logsumexp_blocked(blocks)`` equals the reference on ``blocks.to_index()``, and so do the
    gradients of ``Σ upstream · lse`` with respect to anchors and pool."""
    a_ref, p_ref = anchors.clone().requires_grad_(), pool.clone().requires_grad_()
    a_blk, p_blk = anchors.clone().requires_grad_(), pool.clone().requires_grad_()
    ref = sampled_logsumexp_reference(a_ref, p_ref, blocks.to_index(), scale)
    blk = sampled_logsumexp_blocked(a_blk, p_blk, blocks, scale)
    torch.testing.assert_close(blk, ref)
    (ref * upstream).sum().backward()
    (blk * upstream).sum().backward()
    torch.testing.assert_close(a_blk.grad, a_ref.grad)
    torch.testing.assert_close(p_blk.grad, p_ref.grad)
