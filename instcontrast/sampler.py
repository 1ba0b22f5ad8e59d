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

from ._amp import autocast_off
from ._checks import check_choice, check_positive
from .functional import SCORES, STRATEGIES

__all__ = ["InstanceAwareSampler", "NegativeSamples", "CandidateBlocks"]

_SAFETY = 1.25  # proposals per missing slot, relative to 1 / acceptance
_BLOCK_ELEMENTS = 1 << 20  # anchors × candidates scored at once (4 MiB of float32 scores: cache-friendly)


@dataclass(frozen=True)
class CandidateBlocks:
    """Negatives stored per block of anchors as columns into a shared candidate list.

    Anchors ``[starts[b], starts[b] + columns[b].shape[0])`` draw their negatives from
    ``candidates[b]`` (pool indices, ``(m_b,)``); ``columns[b]`` (``(c_b, R)``) holds each anchor's
    chosen positions in that list. This is how the sampler produces them, and it lets the
    ``chunked`` backend score a whole block with one matrix product instead of gathering
    ``c_b · R`` embedding rows.

    A block's candidate list is the concatenation of its proposal rounds. Later rounds serve only
    the anchors still short, so ``segments[b]`` lists, per round, ``(rows, lo, hi)``: the block's
    local rows that may point into ``candidates[b][lo:hi]`` (``None`` = every row). Scoring only
    those (row, column) ranges gives the same values for every chosen column at less cost.

    Attributes:
        starts: first anchor of each block.
        candidates: per block, the candidate pool indices.
        columns: per block, each anchor's negatives as positions in ``candidates[b]``.
        num_negatives: ``R``.
        segments: per block, the ``(rows, lo, hi)`` ranges above; empty = one segment covering all.
    """

    starts: tuple[int, ...]
    candidates: tuple[Tensor, ...]
    columns: tuple[Tensor, ...]
    num_negatives: int = 0
    segments: tuple[tuple[tuple[Tensor | None, int, int], ...], ...] = ()

    def block_segments(self, block: int) -> tuple[tuple[Tensor | None, int, int], ...]:
        """The ``(rows, lo, hi)`` segments of one block."""
        if self.segments:
            return self.segments[block]
        return ((None, 0, self.candidates[block].numel()),)

    @property
    def num_anchors(self) -> int:
        """``A``, the rows of all blocks together."""
        return sum(cols.shape[0] for cols in self.columns)

    def to_index(self) -> Tensor:
        """The negatives as pool indices, ``(A, R)``."""
        if not self.columns:
            return torch.empty(0, self.num_negatives, dtype=torch.long)
        return torch.cat([cand[cols] for cand, cols in zip(self.candidates, self.columns)], dim=0)


@dataclass(frozen=True)
class NegativeSamples:
    """Sampled negatives and how they were obtained.

    Attributes:
        blocks: the negatives in block form (:class:`CandidateBlocks`), what the loss consumes.
        proposals: candidates scored in total.
        accepted: proposals accepted; ``accepted / proposals`` estimates the mean score.
        fallbacks: slots filled by the uniform fallback (0 for an exact sample).
        fallback_anchors: anchors with at least one fallback slot.
        rounds: proposal rounds run (the most any block needed).
    """

    blocks: CandidateBlocks
    proposals: int = 0
    accepted: int = 0
    fallbacks: int = 0
    fallback_anchors: int = 0
    rounds: int = 0

    @property
    def index(self) -> Tensor:
        """For each anchor, ``R`` indices into the pool, ``(A, R)`` int64 (built on first use)."""
        cached = self.__dict__.get("_index")
        if cached is None:
            cached = self.blocks.to_index()
            object.__setattr__(self, "_index", cached)  # a cache, not state: frozen otherwise
        return cached

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed (1.0 when nothing was proposed)."""
        return self.accepted / self.proposals if self.proposals else 1.0


def _uniform_excluding(anchor_pool_index: Tensor, pool_size: int, shape: tuple[int, int], generator: torch.Generator | None) -> Tensor:
    """Uniform draws over ``range(pool_size)`` (``>= 2``) minus each row's own index (if in the pool)."""
    device = anchor_pool_index.device
    own = anchor_pool_index[:, None]  # (A, 1)
    draws = torch.randint(0, pool_size - 1, shape, generator=generator, device=device)  # (A, R)
    shifted = draws + (draws >= own).long()  # skip the anchor's own slot
    full = torch.randint(0, pool_size, shape, generator=generator, device=device)
    return torch.where(own >= 0, shifted, full)


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
        uniform_acceptance: for ``"uniform"``, the constant acceptance probability. Uniform sampling
            runs through the same blocked proposals (thinning an i.i.d. uniform sequence with
            independent coins keeps it i.i.d. uniform), so that both strategies produce the same
            block structure and cost the same in the loss.

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
        uniform_acceptance: float = 0.5,
    ) -> None:
        check_positive("num_negatives", num_negatives, integer=True)
        check_positive("max_rounds", max_rounds, integer=True)
        check_positive("max_proposals_per_slot", max_proposals_per_slot, integer=True)
        self.num_negatives = num_negatives
        self.strategy = check_choice("strategy", strategy, STRATEGIES)
        self.score = check_choice("score", score, SCORES)
        self.max_rounds = max_rounds
        self.max_proposals_per_slot = max_proposals_per_slot
        if not 0.0 < uniform_acceptance <= 1.0:
            raise ValueError(f"uniform_acceptance must be in (0, 1], got {uniform_acceptance!r}")
        self.uniform_acceptance = float(uniform_acceptance)

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
        with autocast_off(anchor_pool_index):
            return self._sample(anchor_probs, pool_probs, anchor_pool_index, pool_size, generator)

    def _sample(
        self,
        anchor_probs: Tensor | None,
        pool_probs: Tensor | None,
        anchor_pool_index: Tensor,
        pool_size: int | None,
        generator: torch.Generator | None,
    ) -> NegativeSamples:
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
        if self.strategy != "uniform":
            if anchor_probs is None or pool_probs is None:
                raise ValueError(f"strategy={self.strategy!r} needs anchor_probs (A, E) and pool_probs (M, E)")
            if anchor_probs.ndim != 2 or anchor_probs.shape[0] != num_anchors:
                raise ValueError(
                    f"anchor_probs must have shape (A, E) with A = {num_anchors}, got {tuple(anchor_probs.shape)}"
                )
            if pool_probs.ndim != 2 or pool_probs.shape[1] != anchor_probs.shape[1] or pool_probs.shape[0] != pool_size:
                raise ValueError(
                    f"pool_probs must have shape (M, E) = ({pool_size}, {anchor_probs.shape[1]}), got {tuple(pool_probs.shape)}"
                )
        return self._rejection_sample(anchor_probs, pool_probs, anchor_pool_index, pool_size, generator)

    def _accept(
        self,
        row_probs: Tensor | None,
        pool_probs: Tensor | None,
        own: Tensor,
        candidates: Tensor,
        generator: torch.Generator | None,
    ) -> Tensor:
        r"""One coin per (anchor row, candidate): ``True`` with probability ``s(row, candidate)``, ``(c, m)``.

        With a uniform coin :math:`u`, :math:`u < g(1 - \langle\hat y_p, \hat y_q\rangle)` is tested as
        :math:`\langle\hat y_p, \hat y_q\rangle + g^{-1}(u) < 1`, so the score matrix is never
        transformed: :math:`g^{-1}(u) = u` (linear), :math:`\sqrt u` (squared), :math:`u^2` (sqrt).
        """
        device = own.device
        shape = (own.numel(), candidates.numel())
        coins = torch.rand(shape, generator=generator, device=device)  # (c, m)
        if self.strategy == "uniform":
            accept = coins < self.uniform_acceptance
        else:
            if self.score == "squared":
                coins.sqrt_()
            elif self.score == "sqrt":
                coins.square_()
            similarity = torch.addmm(coins, row_probs, pool_probs[candidates].T)  # (c, m): <ŷp, ŷq> + g⁻¹(u)
            accept = similarity < 1.0
        # the anchor itself has s = 0: find candidates equal to one of these rows' own pool entry
        own_sorted, own_order = torch.sort(own)  # (c,)
        position = torch.searchsorted(own_sorted, candidates).clamp_(max=own.numel() - 1)  # (m,)
        hit_column = (own_sorted[position] == candidates).nonzero(as_tuple=True)[0]
        hit_row = own_order[position[hit_column]]
        accept[hit_row, hit_column] = False
        return accept

    def _rejection_sample(
        self,
        anchor_probs: Tensor | None,
        pool_probs: Tensor | None,
        anchor_pool_index: Tensor,
        pool_size: int,
        generator: torch.Generator | None,
    ) -> NegativeSamples:
        device = anchor_pool_index.device
        num_anchors, num_negatives = anchor_pool_index.shape[0], self.num_negatives
        acceptance_estimate = self.uniform_acceptance if self.strategy == "uniform" else 0.5
        starts, block_candidates, block_columns, block_segments = [], [], [], []
        proposals = accepted = max_rounds_used = fallbacks = fallback_anchors = 0
        start = 0
        while start < num_anchors:
            first_round = math.ceil(_SAFETY * num_negatives / acceptance_estimate) + 16
            first_round = min(first_round, self.max_proposals_per_slot * num_negatives)
            stop = min(num_anchors, start + max(1, _BLOCK_ELEMENTS // first_round))
            size = stop - start
            own = anchor_pool_index[start:stop]  # (c,)
            columns = torch.full((size, num_negatives + 1), -1, dtype=torch.long, device=device)  # (c, R + spare)
            filled = torch.zeros(size, dtype=torch.long, device=device)  # (c,)
            pending = torch.arange(size, device=device)  # local rows still short
            candidate_parts: list[Tensor] = []
            segments: list[tuple[Tensor | None, int, int]] = []
            offset = rounds = 0
            while pending.numel() > 0 and rounds < self.max_rounds:
                rounds += 1
                max_missing = int(num_negatives - filled[pending].min())
                wanted = math.ceil(_SAFETY * max_missing / acceptance_estimate) + 16
                num_candidates = min(wanted, self.max_proposals_per_slot * max_missing)
                candidates = torch.randint(0, pool_size, (num_candidates,), generator=generator, device=device)  # (m,)
                whole_block = pending.numel() == size
                if anchor_probs is None:
                    row_probs = None
                else:
                    row_probs = anchor_probs[start:stop] if whole_block else anchor_probs[start + pending]  # (p, E)
                accept = self._accept(row_probs, pool_probs, own[pending], candidates, generator)  # (p, m)
                # a row's k-th acceptance is its k-th draw: slot = already filled + rank - 1; acceptances
                # beyond the row's need (and rejections) go to the spare column R, which is dropped
                slot = accept.cumsum(dim=1)  # (p, m): 1-based rank of each acceptance in its row
                counts = slot[:, -1].clone()  # (p,) acceptances per row
                already = filled[pending]  # (p,)
                slot.add_((already - 1)[:, None])
                slot = torch.where(accept, slot, num_negatives).clamp_(max=num_negatives)  # (p, m)
                values = torch.arange(offset, offset + num_candidates, device=device).expand_as(slot)
                if whole_block:
                    columns.scatter_(1, slot, values)
                else:
                    columns[pending] = columns[pending].scatter_(1, slot, values)
                filled[pending] = (already + counts).clamp_(max=num_negatives)
                candidate_parts.append(candidates)
                segments.append((None if whole_block else pending, offset, offset + num_candidates))
                offset += num_candidates
                round_accepted = int(counts.sum())
                proposals += accept.numel()
                accepted += round_accepted
                if rounds == 1 or round_accepted > 0:
                    acceptance_estimate = max(round_accepted / accept.numel(), 1e-6)
                if rounds == 1:
                    first_round_estimate = acceptance_estimate
                pending = pending[filled[pending] < num_negatives]
            columns = columns[:, :num_negatives].contiguous()  # (c, R): drop the spare column
            if pending.numel() > 0:  # bounded rounds exhausted (or every score 0): uniform fallback
                block_rows = columns[pending]  # (p, R)
                short = block_rows < 0  # (p, R)
                count = int(short.sum())
                fallback = _uniform_excluding(own[pending], pool_size, (pending.numel(), num_negatives), generator)
                block_rows[short] = offset + torch.arange(count, device=device)
                columns[pending] = block_rows
                candidate_parts.append(fallback[short])
                segments.append((pending, offset, offset + count))
                fallbacks += count
                fallback_anchors += int(pending.numel())
            starts.append(start)
            block_candidates.append(torch.cat(candidate_parts))
            block_columns.append(columns)
            block_segments.append(tuple(segments))
            max_rounds_used = max(max_rounds_used, rounds)
            acceptance_estimate = first_round_estimate  # the next block starts like this one did
            start = stop
        blocks = CandidateBlocks(
            tuple(starts), tuple(block_candidates), tuple(block_columns), num_negatives, tuple(block_segments)
        )
        return NegativeSamples(
            blocks=blocks,
            proposals=proposals,
            accepted=accepted,
            fallbacks=fallbacks,
            fallback_anchors=fallback_anchors,
            rounds=max_rounds_used,
        )
