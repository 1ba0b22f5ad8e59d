r"""Instance-aware negative sampling: exact, linear in the pool, never builds the ``N×N`` matrix.

For an anchor :math:`p` the target distribution over the candidate pool is

.. math::
    \Pr(q \mid p) = \frac{s(p, q)}{\sum_{q'} s(p, q')},\qquad s \in [0, 1].

Because :math:`s \le 1`, rejection sampling is exact: propose :math:`q` uniformly, accept with
probability :math:`s(p, q)`. The accepted proposals of an anchor, in order, are i.i.d. draws from
the target. The sampler evaluates proposals in bulk: per block of anchors it draws one shared set
of uniform candidates, scores the whole block against it with one matrix product, flips an
independent coin per (anchor, candidate), and gives each anchor its first accepted candidates.
Anchors still short go to another round with fresh candidates; after ``max_rounds`` rounds (or when
an anchor's whole pool scores 0) the missing slots fall back to uniform over the pool minus the
anchor itself, and their number is reported.

Within one anchor the ``R`` negatives are exactly i.i.d. from the target. Anchors of one block
share proposals, so negatives of *different* anchors are not independent of each other; this does
not change any anchor's distribution, hence not the expected loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_choice, check_positive
from .functional import SCORES, STRATEGIES, transform_score

__all__ = ["InstanceAwareSampler", "NegativeSamples"]

_BLOCK_ELEMENTS = 1 << 22  # anchors × candidates scored at once (16 MiB of float32 scores)


@dataclass(frozen=True)
class NegativeSamples:
    """Sampled negatives and how they were obtained.

    Attributes:
        index: for each anchor, ``R`` indices into the pool, ``(A, R)`` int64.
        proposals: candidates scored in total.
        accepted: proposals accepted; ``accepted / proposals`` estimates the mean score.
        fallbacks: slots filled by the uniform fallback (0 for an exact sample).
        fallback_anchors: anchors with at least one fallback slot.
        rounds: proposal rounds run.
    """

    index: Tensor
    proposals: int = 0
    accepted: int = 0
    fallbacks: int = 0
    fallback_anchors: int = 0
    rounds: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed (1.0 for uniform sampling, which proposes nothing to reject)."""
        return self.accepted / self.proposals if self.proposals else 1.0


def _uniform_excluding(anchor_pool_index: Tensor, pool_size: int, shape: tuple[int, int], generator: torch.Generator | None) -> Tensor:
    """Uniform draws over ``range(pool_size)`` (``>= 2``) minus each row's own index (if in the pool)."""
    device = anchor_pool_index.device
    own = anchor_pool_index[:, None]  # (A, 1)
    in_pool = own >= 0
    draws = torch.randint(0, pool_size - 1, shape, generator=generator, device=device)  # (A, R)
    shifted = draws + (draws >= own).long()  # skip the anchor's own slot
    full = torch.randint(0, pool_size, shape, generator=generator, device=device)
    return torch.where(in_pool, shifted, full)


class InstanceAwareSampler:
    r"""Draw ``R`` negatives per anchor with probability proportional to the debias score.

    Args:
        num_negatives: negatives per anchor ``R`` (drawn with replacement, so ``R`` may exceed
            the pool size).
        strategy: ``"fusion"`` (default), ``"mask"``, ``"class"``, or ``"uniform"`` (:math:`s \equiv 1`
            except the anchor itself).
        score: ``"linear"`` (:math:`s`), ``"squared"`` (:math:`s^2`) or ``"sqrt"`` (:math:`\sqrt s`).
        max_rounds: proposal rounds before the uniform fallback.
        max_proposals_per_slot: cap on candidates scored per missing slot in one round (bounds the
            work when acceptance is tiny).

    Example:
        >>> sampler = InstanceAwareSampler(num_negatives=4)
        >>> probs = torch.nn.functional.normalize(torch.rand(10, 5), dim=-1)
        >>> out = sampler(probs[:3], probs, anchor_pool_index=torch.arange(3))
        >>> out.index.shape
        torch.Size([3, 4])
    """

    def __init__(
        self,
        num_negatives: int = 256,
        strategy: str = "fusion",
        score: str = "linear",
        max_rounds: int = 8,
        max_proposals_per_slot: int = 32,
    ) -> None:
        check_positive("num_negatives", num_negatives, integer=True)
        check_positive("max_rounds", max_rounds, integer=True)
        check_positive("max_proposals_per_slot", max_proposals_per_slot, integer=True)
        self.num_negatives = num_negatives
        self.strategy = check_choice("strategy", strategy, STRATEGIES)
        self.score = check_choice("score", score, SCORES)
        self.max_rounds = max_rounds
        self.max_proposals_per_slot = max_proposals_per_slot

    def __repr__(self) -> str:
        return (
            f"InstanceAwareSampler(num_negatives={self.num_negatives}, strategy={self.strategy!r}, "
            f"score={self.score!r}, max_rounds={self.max_rounds})"
        )

    @torch.no_grad()
    def __call__(
        self,
        anchor_probs: Tensor | None,
        pool_probs: Tensor | None,
        anchor_pool_index: Tensor,
        pool_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> NegativeSamples:
        """Sample negatives.

        Args:
            anchor_probs: fused probability vectors of the anchors (unused for ``"uniform"``).
            pool_probs: fused probability vectors of the pool (unused for ``"uniform"``).
            anchor_pool_index: each anchor's own row in the pool, or ``-1`` if it is not in it;
                that row is never sampled for that anchor.
            pool_size: pool size ``M``; required for ``"uniform"`` when ``pool_probs`` is ``None``.
            generator: random generator (on the anchors' device) for reproducible draws.

        Shape:
            - anchor_probs: :math:`(A, E)`; pool_probs: :math:`(M, E)`; anchor_pool_index: :math:`(A,)`
            - output index: :math:`(A, R)` int64

        Returns:
            :class:`NegativeSamples`.

        Raises:
            ValueError: on mismatched shapes or a pool with fewer than 2 candidates.
        """
        if anchor_pool_index.ndim != 1:
            raise ValueError(f"anchor_pool_index must have shape (A,), got {tuple(anchor_pool_index.shape)}")
        anchor_pool_index = anchor_pool_index.long()
        num_anchors = anchor_pool_index.shape[0]
        if pool_size is None:
            if pool_probs is None:
                raise ValueError("pass pool_probs (M, E) or pool_size")
            pool_size = pool_probs.shape[0]
        if pool_size < 2:
            raise ValueError(f"the candidate pool needs at least 2 entries to sample negatives, got {pool_size}")
        shape = (num_anchors, self.num_negatives)
        if self.strategy == "uniform":
            index = _uniform_excluding(anchor_pool_index, pool_size, shape, generator)
            return NegativeSamples(index=index)
        if anchor_probs is None or pool_probs is None:
            raise ValueError(f"strategy={self.strategy!r} needs anchor_probs (A, E) and pool_probs (M, E)")
        if anchor_probs.ndim != 2 or anchor_probs.shape[0] != num_anchors:
            raise ValueError(f"anchor_probs must have shape (A, E) with A = {num_anchors}, got {tuple(anchor_probs.shape)}")
        if pool_probs.ndim != 2 or pool_probs.shape[1] != anchor_probs.shape[1] or pool_probs.shape[0] != pool_size:
            raise ValueError(
                f"pool_probs must have shape (M, E) = ({pool_size}, {anchor_probs.shape[1]}), got {tuple(pool_probs.shape)}"
            )
        return self._rejection_sample(anchor_probs, pool_probs, anchor_pool_index, generator)

    def _rejection_sample(
        self, anchor_probs: Tensor, pool_probs: Tensor, anchor_pool_index: Tensor, generator: torch.Generator | None
    ) -> NegativeSamples:
        device = anchor_probs.device
        num_anchors, num_negatives = anchor_probs.shape[0], self.num_negatives
        pool_size = pool_probs.shape[0]
        index = torch.full((num_anchors, num_negatives), -1, dtype=torch.long, device=device)  # (A, R)
        filled = torch.zeros(num_anchors, dtype=torch.long, device=device)  # (A,)
        pending = torch.arange(num_anchors, device=device)  # anchors still short
        acceptance_estimate = 0.5
        proposals = accepted = rounds = 0
        while pending.numel() > 0 and rounds < self.max_rounds:
            rounds += 1
            missing = num_negatives - filled[pending]  # (P,)
            max_missing = int(missing.max())
            # enough candidates that a typical row fills in one round, with a safety factor
            wanted = math.ceil(1.25 * max_missing / max(acceptance_estimate, 1e-6)) + 16
            num_candidates = min(wanted, self.max_proposals_per_slot * max_missing)
            block = max(1, _BLOCK_ELEMENTS // num_candidates)
            round_accepted = round_proposed = 0
            for start in range(0, pending.numel(), block):
                rows = pending[start : start + block]  # (c,)
                candidates = torch.randint(0, pool_size, (num_candidates,), generator=generator, device=device)  # (m,)
                similarity = anchor_probs[rows] @ pool_probs[candidates].T  # (c, m)
                scores = transform_score(similarity.neg_().add_(1.0).clamp_(0.0, 1.0), self.score)  # (c, m)
                scores.masked_fill_(candidates[None, :] == anchor_pool_index[rows, None], 0.0)
                coins = torch.rand(scores.shape, generator=generator, device=device, dtype=scores.dtype)
                accept = coins < scores  # (c, m)
                rank = accept.cumsum(dim=1)  # (c, m): 1-based rank among this row's acceptances
                row_missing = num_negatives - filled[rows]  # (c,)
                take = accept & (rank <= row_missing[:, None])  # (c, m)
                local_row, column = take.nonzero(as_tuple=True)
                anchor_row = rows[local_row]
                slot = filled[anchor_row] + rank[local_row, column] - 1
                index[anchor_row, slot] = candidates[column]
                filled[rows] += take.sum(dim=1)
                round_accepted += int(accept.sum())
                round_proposed += accept.numel()
            proposals += round_proposed
            accepted += round_accepted
            acceptance_estimate = max(round_accepted / max(round_proposed, 1), 1e-6)
            pending = pending[filled[pending] < num_negatives]
        fallbacks = fallback_anchors = 0
        if pending.numel() > 0:
            short = index[pending] < 0  # (P, R)
            fallback = _uniform_excluding(anchor_pool_index[pending], pool_size, (pending.numel(), num_negatives), generator)
            index[pending] = torch.where(short, fallback, index[pending])
            fallbacks = int(short.sum())
            fallback_anchors = int(pending.numel())
        return NegativeSamples(
            index=index,
            proposals=proposals,
            accepted=accepted,
            fallbacks=fallbacks,
            fallback_anchors=fallback_anchors,
            rounds=rounds,
        )
