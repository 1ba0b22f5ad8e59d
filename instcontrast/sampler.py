r"""Instance-aware negative sampling: exact, linear in the pool, cost independent of confidence.

For an anchor :math:`p` the target distribution over the candidate pool is

.. math::
    \Pr(q \mid p) = \frac{s^k(p, q)}{\sum_{q'} s^k(p, q')},\qquad
    s = 1 - \langle \hat y_p, \hat y_q\rangle \in [0, 1],\quad k \in \{1, 2, \tfrac12\}

(``"linear"``, ``"squared"``, ``"sqrt"``). The sampler never forms the ``A×M`` score matrix.

**Envelope.** With :math:`c` the mean of the pool's vectors, :math:`u_p = \hat y_p - c` and
:math:`d_q = \hat y_q - c`,

.. math::
    s(p, q) = \tfrac12\lVert u_p - d_q\rVert^2 + a_p + b_q
    \le g_p(q) = \min\big(1,\ U_p + \delta_q\big),\qquad
    a_p = \tfrac12(1 - \lVert\hat y_p\rVert^2),\ U_p = \lVert u_p\rVert^2 + a_p,\
    \delta_q = \max\big(0, \lVert d_q\rVert^2 + b_q\big)

(:math:`b_q` like :math:`a_p`; both vanish for unit vectors), since
:math:`\tfrac12\lVert u - d\rVert^2 \le \lVert u\rVert^2 + \lVert d\rVert^2`.

**Proposal.** Every anchor of a block of anchors proposes from one shared two-component mixture

.. math::
    h(q) = \frac{1 - \lambda}{M} + \lambda\,\frac{\delta_q^k}{\sum_{q'} \delta_{q'}^k},

and accepts a proposal :math:`q` with probability :math:`s^k(p, q) / (C_p\, h(q))`, where
:math:`C_p \ge \max_q g_p(q)^k / h(q)` is a one-variable maximum over
:math:`\delta \in [\delta_{\min}, \delta_{\max}]` (closed form: the ratio is monotone, or for
``k = 2`` unimodal with its peak at :math:`\delta^* = (1-\lambda)W/(\lambda M U_p)`), inflated by a
small slack for the rounding of the matrix product. This is rejection sampling with a valid
envelope, so each anchor's accepted proposals, in order, are i.i.d. draws from its target, and an
anchor's expected acceptance is :math:`\rho_p = \sum_q s^k(p, q) / C_p`.

**Acceptance bounds.** :math:`\sum_q d_q = 0` gives
:math:`\sum_q s(p,q) = M(\tfrac12\lVert u_p\rVert^2 + a_p) + \sum_q(\tfrac12\lVert d_q\rVert^2 + b_q)`.
For unit vectors and :math:`\lambda = \tfrac12`: ``linear`` :math:`\rho_p \in [\tfrac14, 1]`;
``sqrt`` :math:`\rho_p \ge 1/(6\sqrt2) \approx 0.118`; ``squared`` :math:`\rho_p \ge 1/528` (a
loose worst case; measured 0.24–0.66 per call). The bounds do not depend on how confident the
predictions are: scaling every :math:`u, d` together scales :math:`s` and :math:`g` alike.

**Blocks.** The best :math:`\lambda` for an anchor depends on :math:`U_p` (for ``linear``, about
:math:`W / (M U_p + W)` with :math:`W = \sum_q \delta_q`), so the anchors are sorted by
:math:`U_p` before they are cut into blocks (:attr:`CandidateBlocks.order`): a block's anchors
then want about the same :math:`\lambda`. Each block compares the :math:`\lambda` of a grid
(always including ``1/2``) by the mean proposals per negative :math:`1/\rho_p` at five of its rows
(quantiles of its sorted :math:`U_p`) and keeps the cheapest one whose acceptance stays at least
:math:`\min(\tfrac14, \text{that of } \lambda = \tfrac12)` for every row — so the bounds above
hold for every anchor. Which block an anchor lands in does not change its distribution.

**Rounds.** :math:`\sum_q s(p, q)` (and :math:`\sum_q s^2(p, q)`, from the pool's second moment) is
known in closed form before drawing, so each anchor's :math:`\rho_p` is known (``sqrt``: a lower
bound, :math:`\sum_q \sqrt{s} \ge \sum_q s / \sqrt{\max_q g_p(q)}`) and the first round of a block
is sized for its median anchor; the anchors still short (about half, each missing a few
negatives) finish in a second, much smaller round. A row that needs a later round has used up the
earlier ones, so each row needs the block's candidates up to the last one it accepted: the block's
rows are then sorted by that position, and the candidate list is cut into pieces each scored for a
prefix of the rows (:class:`CandidateBlocks` segments, views for the loss, no gathers).

**Zero pools.** An anchor whose pool scores are all zero (up to the rounding of the vectors'
norms) — all candidates look like the same instance — is not sampled from its envelope: it is reported
(``zero_pool_anchors``) and gets uniform draws over the pool minus itself, counted as fallbacks,
drawn as ``strategy="uniform"`` draws them (shared proposals thinned at ``uniform_acceptance``, in
blocks of their own), so a collapsed model costs what uniform sampling costs.
After ``max_rounds`` rounds, any missing slot also falls back to uniform (reported; with the sizes
above this does not happen in practice).

**Coins.** A round needs one uniform coin per (row, candidate) pair; drawing ``c·m`` of them cost
as much as scoring the pairs. Row :math:`i` reads candidate :math:`j`'s coin as :math:`v_{i+j}` from
one vector of :math:`c + m - 1` uniforms (a strided view): a row's coins are distinct entries, so
they are i.i.d. and independent of the proposals, which is all rejection sampling needs, and two
rows never share the coin of one candidate (see ``InstanceAwareSampler._accept``).

Within one anchor the ``R`` negatives are exactly i.i.d. from the target. Anchors of one block
share proposals (and coins along anti-diagonals), so negatives of *different* anchors are not
independent of each other; this does not change any anchor's distribution, hence not the
expected loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._amp import autocast_off
from ._checks import check_choice, check_positive
from ._types import SCORES, STRATEGIES, CandidateBlocks
from .ops.chunked import accumulation_dtype

__all__ = ["CandidateBlocks", "InstanceAwareSampler", "NegativeSamples"]

_BLOCK_ELEMENTS = 1 << 20  # anchors × candidates scored at once (4 MiB of float32 scores: cache-friendly)
_Z_SCORE = 1.0  # a round proposes for need + z·sqrt(need) acceptances
_FIRST_ROUND_QUANTILE = 0.5  # the first round is sized for about this fraction of a block's rows (the rest finish in a small second round)
_MIXTURE_WEIGHTS = (0.5, 0.05, 0.1, 0.15, 0.2, 0.27, 0.35, 0.42, 0.58, 0.65, 0.72, 0.8, 0.87, 0.93)  # λ tried per block (0.5 first: the bounds above)
_PLAN_QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)  # rows of a (sorted) block at which the λ are compared
_SEGMENT_POINTS = 33  # rows of a block whose extents are tried as segment cuts
_SEGMENT_COST = 16384  # pairs one more segment costs the loss in call overhead (about 2 matrix products of 8k pairs)
_EXPONENT = {"linear": 1.0, "squared": 2.0, "sqrt": 0.5}
_WIDE_ROWS = 1024  # rows per float64 copy for the norms (about 1 MiB: stays in cache)
_STAT_ROWS = 8192  # rows per chunk of the float64 row sums: temporaries of a few MiB, reused (no page faults)


@dataclass(frozen=True)
class NegativeSamples:
    """Sampled negatives and how they were obtained.

    Attributes:
        blocks: the negatives in block form (:class:`CandidateBlocks`), what the loss consumes.
        proposals: candidates scored in total (anchor × candidate pairs).
        accepted: proposals accepted (``accepted / proposals`` is the acceptance rate of this call).
        fallbacks: slots filled by the uniform fallback (0 for an exact sample; zero-pool anchors
            count ``R`` each).
        fallback_anchors: anchors with at least one fallback slot.
        rounds: proposal rounds run (the most any block needed).
        zero_pool_anchors: anchors whose pool scores are all zero (every candidate looks like the
            anchor's own instance); sampled uniformly, included in ``fallbacks``.
        mean_score: exact mean linear debias score over anchors and pool,
            :math:`\\frac1A\\sum_p (1 - \\langle\\hat y_p, c\\rangle)` with ``c`` the pool mean (for
            unit vectors); ``nan`` for ``"uniform"``.
        min_expected_acceptance: the smallest per-anchor expected acceptance
            :math:`\\rho_p` among anchors sampled by rejection (a lower bound for ``"sqrt"``).
    """

    blocks: CandidateBlocks
    proposals: int = 0
    accepted: int = 0
    fallbacks: int = 0
    fallback_anchors: int = 0
    rounds: int = 0
    zero_pool_anchors: int = 0
    mean_score: float = float("nan")
    min_expected_acceptance: float = float("nan")

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


@dataclass(frozen=True)
class _Envelope:
    """Everything the rejection rounds of one call need, computed once from pool sums.

    Attributes:
        exponent: ``k`` of the score variant.
        anchor_rows: ``[u_p, 1, -α_p]`` per anchor, ``(A, E+2)`` (work dtype), ``α_p = ½‖u_p‖² + a_p``;
            ``None`` when the anchors are pool rows (``anchor_index``): :meth:`anchor_block` builds them.
        anchor_index: each anchor's pool row when the anchors are pool rows, ``(A,)``, else ``None``.
        pool_rows: ``[d_q, -β_q, 1]`` per candidate, ``(M, E+2)``, ``β_q = ½‖d_q‖² + b_q``: the dot
            product of the two is ``-s(p, q)``.
        bound_offset: ``U_p`` per anchor, ``(A,)`` float64.
        spread: ``δ_q`` per candidate, ``(M,)`` float64.
        weight_cdf: cumulative sum of ``δ_q^k``, ``(M,)`` float64 (the mixture's second component).
        score_sum: exact ``Σ_q s^k(p, q)`` per anchor (``sqrt``: a lower bound), ``(A,)`` float64.
        zero_pool: anchors whose scores are all zero up to rounding, ``(A,)`` bool.
        mean_score: exact mean linear score over anchors and pool.
        slack: relative inflation of ``C_p`` covering the rounding of the matrix product.
        spread_range: ``(δ_min, δ_max)``.
    """

    exponent: float
    anchor_rows: Tensor | None
    anchor_index: Tensor | None
    pool_rows: Tensor
    bound_offset: Tensor
    spread: Tensor
    weight_cdf: Tensor
    score_sum: Tensor
    zero_pool: Tensor
    mean_score: float
    slack: float
    spread_range: tuple[float, float] = (0.0, 0.0)

    @property
    def pool_size(self) -> int:
        return self.pool_rows.shape[0]

    def anchor_block(self, rows: Tensor, out: Tensor | None = None) -> Tensor:
        """``[u_p, 1, -α_p]`` of the anchors ``rows``, ``(c, E+2)`` (into ``out`` if given): for pool rows,
        ``[d_q, -β_q, 1]`` with its last two columns swapped."""
        if self.anchor_rows is not None:
            return torch.index_select(self.anchor_rows, 0, rows, out=out) if out is not None else self.anchor_rows[rows]
        pool_rows = self.anchor_index[rows]  # (c,)
        block = torch.index_select(self.pool_rows, 0, pool_rows, out=out) if out is not None else self.pool_rows[pool_rows]  # [d, -β, 1]
        block[:, -2:] = block[:, -2:].flip(1)  # [d, 1, -β]: α_p = β_q for the same vector
        return block

    @property
    def weight_total(self) -> float:
        return float(self.weight_cdf[-1])

    def envelope_constant(self, rows: Tensor, mixture: float | Tensor, per_row: bool = False) -> Tensor:
        r"""``C_p = (1 + slack)·max_{δ ∈ [δ_min, δ_max]} min(1, U_p + δ)^k / h(δ)`` for ``rows``.

        ``mixture`` is one ``λ`` (output ``(c,)``), several, ``(L,)`` (output ``(c, L)``), or with
        ``per_row`` each row's own, ``(c,)`` (output ``(c,)``); float64.
        """
        weights = torch.as_tensor(mixture, dtype=torch.float64, device=rows.device).reshape(-1)  # (L,) or (c,)
        bound = self.bound_offset[rows][:, None]  # (c, 1)
        constant = self._constant(bound, weights[:, None] if per_row else weights[None, :])  # (c, L) or (c, 1)
        return constant[:, 0] if per_row or not isinstance(mixture, Tensor) or mixture.ndim == 0 else constant

    def _constant(self, bound: Tensor, weights: Tensor) -> Tensor:
        """:meth:`envelope_constant` for ``U_p`` ``(c, 1)`` and ``λ`` ``(1, L)`` or ``(c, 1)``: ``(c, L)``."""
        k, pool_size = self.exponent, self.pool_size
        uniform_part = (1.0 - weights) / pool_size  # (·, L)
        weighted_part = weights / self.weight_total if self.weight_total > 0 else torch.zeros_like(weights)  # (·, L)
        low, high = self.spread_range
        columns = torch.broadcast_shapes(bound.shape, weights.shape)  # (c, L)
        points = [
            torch.full(columns, low, dtype=torch.float64, device=bound.device),
            torch.full(columns, high, dtype=torch.float64, device=bound.device),
            (1.0 - bound).clamp(low, high).expand(columns),  # where the cap min(1, ·) starts
        ]
        if k == 2.0:  # peak of (U + δ)² / (a + bδ²) at δ = a / (b U)
            peak = uniform_part / (weighted_part * bound.clamp_min(1e-300))  # (c, L), inf where b = 0
            points.append(peak.nan_to_num(posinf=high).clamp(low, high).expand(columns))
        spread = torch.stack(points, dim=2)  # (c, L, P)
        ratio = (bound[:, :, None] + spread).clamp(max=1.0).pow(k) / (
            uniform_part[..., None] + weighted_part[..., None] * spread.pow(k)
        )  # (c, L, P)
        return ratio.amax(dim=2) * (1.0 + self.slack)  # (c, L)

    def proposal_density(self, candidates: Tensor, mixture: float) -> Tensor:
        """``h(q)`` of the mixture at ``candidates``, ``(m,)`` float64."""
        uniform_part = (1.0 - mixture) / self.pool_size
        if mixture == 0:
            return torch.full(candidates.shape, uniform_part, dtype=torch.float64, device=candidates.device)
        weights = self.spread[candidates].pow(self.exponent)  # (m,)
        return uniform_part + mixture * weights / self.weight_total

    def propose(self, count: int, mixture: float, generator: torch.Generator | None) -> Tensor:
        """``count`` i.i.d. draws from the mixture ``h``, ``(count,)`` int64 pool indices."""
        device = self.pool_rows.device
        uniform = torch.randint(0, self.pool_size, (count,), generator=generator, device=device)  # (m,)
        if mixture == 0:
            return uniform
        from_weights = torch.rand(count, generator=generator, device=device) < mixture  # (m,)
        levels = torch.rand(count, generator=generator, device=device, dtype=torch.float64) * self.weight_total
        weighted = torch.searchsorted(self.weight_cdf, levels, right=True).clamp_(max=self.pool_size - 1)  # (m,)
        return torch.where(from_weights, weighted, uniform)


def _row_chunks(count: int) -> range:
    return range(0, count, _STAT_ROWS)


def _column_sum(rows: Tensor) -> Tensor:
    """``Σ_i rows_i``, ``(E,)`` float64: each chunk of rows summed in its own dtype, the chunks in float64.

    Only the centre ``c`` and the rounding-sized ``Σ_q d_q`` come from it, and the score-sum identity
    holds for any ``c``, so a float32 chunk sum (no float64 copy) is accurate enough.
    """
    total = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
    for start in _row_chunks(rows.shape[0]):
        total += rows[start : start + _STAT_ROWS].sum(dim=0).to(torch.float64)
    return total


def _centered_rows(rows: Tensor, center: Tensor, work: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``rows - c`` in ``work``, in the first ``E`` columns of an ``(N, E+2)`` buffer (the scoring
    rows' layout, last two columns unset), and in float64 ``½(1 - ‖rows_i‖²)`` and ``‖rows_i - c‖²``, ``(N,)``.

    ``1 - ‖rows_i‖²`` is rounding-sized for unit rows, so its norm is taken in float64 (chunks of
    :data:`_WIDE_ROWS` rows copied into one reused, cache-sized buffer: no large float64
    temporaries, which page-faulted); ``‖rows_i - c‖²`` only needs the relative accuracy of the
    work dtype (the envelope's slack covers it).
    """
    count = rows.shape[0]
    buffer = torch.empty(count, rows.shape[1] + 2, dtype=work, device=rows.device)  # (N, E+2)
    centered = buffer[:, :-2]  # (N, E) view
    torch.sub(rows.to(work), center.to(work), out=centered)
    norm = torch.empty(count, dtype=torch.float64, device=rows.device)  # (N,) ‖rows_i‖
    wide = torch.empty(min(count, _WIDE_ROWS), rows.shape[1], dtype=torch.float64, device=rows.device)
    for start in range(0, count, _WIDE_ROWS):
        block = wide[: min(count, start + _WIDE_ROWS) - start].copy_(rows[start : start + _WIDE_ROWS])  # (n, E)
        torch.linalg.vector_norm(block, dim=1, out=norm[start : start + block.shape[0]])
    excess = norm.square_().neg_().add_(1.0).mul_(0.5)  # (N,) ½(1 - ‖rows_i‖²)
    centered_sq = torch.linalg.vector_norm(centered, dim=1).to(torch.float64).square_()  # (N,)
    return buffer, excess, centered_sq


def _row_products(rows: Tensor, index: Tensor | None, vector: Tensor, matrix: Tensor | None = None) -> Tensor:
    """``⟨r_i, v⟩`` (and ``r_iᵀ S r_i`` with ``matrix``) in float64 for the rows ``rows[index]``, chunk by chunk.

    Returns:
        ``(N,)`` or, with ``matrix``, ``((N,), (N,))``.
    """
    count = rows.shape[0] if index is None else index.numel()
    dots = torch.empty(count, dtype=torch.float64, device=rows.device)  # (N,)
    quadratic = torch.empty(count, dtype=torch.float64, device=rows.device) if matrix is not None else None
    for start in _row_chunks(count):
        stop = min(count, start + _STAT_ROWS)
        block = (rows[start:stop] if index is None else rows[index[start:stop]]).to(torch.float64)  # (n, E)
        dots[start:stop] = block @ vector
        if quadratic is not None:
            quadratic[start:stop] = ((block @ matrix) * block).sum(dim=1)
    return dots if quadratic is None else (dots, quadratic)


def _build_envelope(anchor_probs: Tensor | None, pool_probs: Tensor, score: str, anchor_index: Tensor) -> _Envelope:
    """Pool sums, per-row constants and exact score sums for the fusion/mask/class strategies.

    ``anchor_probs=None``: the anchors are the pool rows ``anchor_index`` (every index ``>= 0``), and
    their statistics are read from the pool's instead of being computed again. Sums over rows run in
    float64 on chunks of :data:`_STAT_ROWS` rows, so no full-size float64 copy is ever made.
    """
    work = accumulation_dtype(pool_probs.dtype, *(() if anchor_probs is None else (anchor_probs.dtype,)))
    wide = torch.float64
    pool_size = pool_probs.shape[0]
    center = _column_sum(pool_probs) / pool_size  # (E,) float64
    pool_rows, pool_excess, pool_sq = _centered_rows(pool_probs, center, work)  # (M, E+2); b_q; ‖d_q‖²
    centered_pool = pool_rows[:, :-2]  # (M, E) d_q
    if anchor_probs is None:
        centered_anchors, anchor_rows_of, anchor_rows = centered_pool, anchor_index, None  # u_p = d_{index(p)}
        anchor_excess, anchor_sq = pool_excess[anchor_index], pool_sq[anchor_index]  # (A,)
    else:
        anchor_rows, anchor_excess, anchor_sq = _centered_rows(anchor_probs, center, work)  # (A, E+2); a_p; ‖u_p‖²
        centered_anchors = anchor_rows[:, :-2]  # (A, E) u_p
        anchor_rows_of = None
    alpha = 0.5 * anchor_sq + anchor_excess  # (A,)
    beta = 0.5 * pool_sq + pool_excess  # (M,)
    bound_offset = (anchor_sq + anchor_excess).clamp_min(0.0)  # (A,) U_p
    spread = (pool_sq + pool_excess).clamp_min(0.0)  # (M,) δ_q

    pool_center_sum = _column_sum(centered_pool)  # (E,) Σ d_q (≈ 0)
    exponent = _EXPONENT[score]
    if score == "squared":
        second_moment = torch.zeros(pool_center_sum.numel(), pool_center_sum.numel(), dtype=wide, device=center.device)
        weighted_center = torch.zeros_like(pool_center_sum)  # (E,) Σ β_q d_q
        for start in _row_chunks(pool_size):
            block = centered_pool[start : start + _STAT_ROWS].to(wide)  # (n, E)
            second_moment += block.T @ block  # (E, E) Σ d dᵀ
            weighted_center += beta[start : start + _STAT_ROWS] @ block
        cross, quadratic = _row_products(centered_anchors, anchor_rows_of, pool_center_sum, second_moment)  # uᵀ(Σ d dᵀ)u
        weighted = _row_products(centered_anchors, anchor_rows_of, weighted_center)  # (A,) ⟨u_p, Σ β_q d_q⟩
    else:  # ⟨u_p, Σ d_q⟩ is a rounding-sized correction (Σ d_q ≈ 0): one product in the work dtype
        center_sum_work = pool_center_sum.to(work)
        if anchor_probs is None:
            cross = torch.mv(centered_pool, center_sum_work).to(wide)[anchor_index]  # (A,)
        else:
            cross = torch.mv(centered_anchors, center_sum_work).to(wide)  # (A,)
    linear_sum = pool_size * alpha + beta.sum() - cross  # (A,) Σ_q s(p, q), exact identity
    # scores indistinguishable from the rounding of the norms (and of u, d) count as zero
    noise = pool_size * anchor_excess.abs() + pool_excess.abs().sum() + pool_size * 8 * torch.finfo(work).eps
    zero_pool = linear_sum <= noise  # (A,)

    if score == "linear":
        score_sum = linear_sum
    elif score == "squared":
        score_sum = (
            pool_size * alpha.square() + 2 * alpha * beta.sum() + beta.square().sum()
            - 2 * alpha * cross - 2 * weighted + quadratic
        ).clamp_min(0.0)  # (A,) Σ_q s²(p, q)
    else:  # sqrt: Σ √s ≥ Σ s / √(max s), max s ≤ min(1, U_p + δ_max)
        score_sum = linear_sum.clamp_min(0.0) / (bound_offset + spread.max()).clamp(max=1.0).clamp_min(1e-300).sqrt()

    pool_rows[:, -2] = -beta.to(work)
    pool_rows[:, -1] = 1.0
    if anchor_rows is not None:
        anchor_rows[:, -2] = 1.0
        anchor_rows[:, -1] = -alpha.to(work)
    weight_cdf = spread.pow(exponent).cumsum(dim=0)  # (M,)
    eps = torch.finfo(work).eps
    slack = 64 * eps * pool_probs.shape[1] if work == torch.float32 else 1e-9
    return _Envelope(
        exponent=exponent,
        anchor_rows=anchor_rows,
        anchor_index=anchor_rows_of,
        pool_rows=pool_rows,
        bound_offset=bound_offset,
        spread=spread,
        weight_cdf=weight_cdf,
        score_sum=score_sum,
        zero_pool=zero_pool,
        mean_score=float(linear_sum.mean() / pool_size) if alpha.numel() else float("nan"),
        slack=float(slack),
        spread_range=(float(spread.min()), float(spread.max())),
    )


def _uniform_excluding(anchor_pool_index: Tensor, pool_size: int, shape: tuple[int, int], generator: torch.Generator | None) -> Tensor:
    """Uniform draws over ``range(pool_size)`` (``>= 2``) minus each row's own index (if in the pool)."""
    device = anchor_pool_index.device
    own = anchor_pool_index[:, None]  # (A, 1)
    draws = torch.randint(0, pool_size - 1, shape, generator=generator, device=device)  # (A, R)
    shifted = draws + (draws >= own).long()  # skip the anchor's own slot
    full = torch.randint(0, pool_size, shape, generator=generator, device=device)
    return torch.where(own >= 0, shifted, full)


def _round_size(need: Tensor, acceptance: Tensor) -> Tensor:
    """Proposals for ``need`` acceptances at rate ``acceptance``, with a margin of ``z·sqrt(need)``."""
    need = need.to(torch.float64)
    return ((need + _Z_SCORE * need.sqrt() + 1.0) / acceptance).ceil()


def _prefix_segments(extent: Tensor, num_candidates: int) -> list[tuple[slice | None, int, int]]:
    r"""Segments ``(rows, lo, hi)`` of a block whose rows are sorted by ``extent`` (last used column), descending.

    Row ``i`` needs the scores of candidates ``[0, e_i]``, so the rows that need candidates
    ``[lo, hi)`` are a prefix ``0:k(lo)`` with :math:`k(x) = \#\{i : e_i \ge x\}`. The cuts
    :math:`0 = x_0 < \dots < x_S = m` minimise :math:`\sum_s k(x_s)(x_{s+1} - x_s)` (pairs scored)
    plus :data:`_SEGMENT_COST` pairs per segment, over cuts at the extents of
    :data:`_SEGMENT_POINTS` evenly spaced rows (a dynamic program over those points).
    """
    rows = extent.numel()
    if rows == 0 or num_candidates == 0:
        return [(None, 0, num_candidates)]
    sample = torch.linspace(0, rows - 1, min(rows, _SEGMENT_POINTS)).round().long()  # row positions
    points = sorted({0, num_candidates} | {int(x) + 1 for x in extent[sample].tolist() if 0 <= int(x) + 1 < num_candidates})
    ascending = extent.flip(0)  # (c,) ascending, for counting rows with e >= x
    starts = torch.tensor(points[:-1], dtype=extent.dtype, device=extent.device)
    reach = (rows - torch.searchsorted(ascending, starts, right=False)).tolist()  # k(x) for every point but m
    # best[j]: cheapest cover of [0, points[j]); a segment [points[i], points[j]) scores reach[i] rows
    best, back = [0.0] + [math.inf] * (len(points) - 1), [0] * len(points)
    for j in range(1, len(points)):
        for i in range(j):
            cost = best[i] + reach[i] * (points[j] - points[i]) + _SEGMENT_COST
            if cost < best[j]:
                best[j], back[j] = cost, i
    cuts, j = [], len(points) - 1
    while j > 0:
        cuts.append((back[j], j))
        j = back[j]
    segments: list[tuple[slice | None, int, int]] = []
    for i, j in reversed(cuts):
        if reach[i] > 0:
            segments.append((None if reach[i] == rows else slice(0, reach[i]), points[i], points[j]))
    return segments


class _Workspace:
    """Flat buffers reused by every round, and every call, of one sampler, viewed at each round's shape.

    A round's ``(rows, candidates)`` matrices (scores, acceptances, ranks, scatter indices, the
    block's columns and scaled anchor rows) change shape from round to round; allocated afresh, each touched new pages
    (page faults: element-wise passes over them ran 10-30x slower than on warm memory). One buffer
    per role, grown when too small and kept by the sampler, avoids that. Their size is bounded by a
    block, about ``_BLOCK_ELEMENTS`` entries per role (about 25 MB in all); nothing returned by the
    sampler points into them, but one sampler must not be called from two threads at once.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[str, Tensor] = {}

    def view(self, role: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        size = math.prod(shape)
        buffer = self.buffers.get(role)
        if buffer is None or buffer.numel() < size or buffer.dtype != dtype:
            buffer = self.buffers[role] = torch.empty(size, dtype=dtype, device=self.device)
        return buffer[:size].view(shape)


class InstanceAwareSampler:
    r"""Draw ``R`` negatives per anchor with probability proportional to the debias score.

    See the module documentation for the proposal, the envelope and the acceptance bounds.

    Args:
        num_negatives: negatives per anchor ``R`` (drawn with replacement, so ``R`` may exceed
            the pool size).
        strategy: ``"fusion"`` (default), ``"mask"``, ``"class"``, or ``"uniform"`` (:math:`s \equiv 1`
            except the anchor itself).
        score: ``"linear"`` (:math:`s`), ``"squared"`` (:math:`s^2`) or ``"sqrt"`` (:math:`\sqrt s`).
        max_rounds: proposal rounds before the uniform fallback.
        max_proposals_per_slot: cap on candidates proposed per missing slot in one round. The
            default never binds; ``1`` forces several rounds (useful to exercise the multi-round
            path in tests).
        uniform_acceptance: for ``"uniform"``, the constant acceptance probability. Uniform sampling
            runs through the same blocked proposals (thinning an i.i.d. uniform sequence with
            i.i.d. coins keeps it i.i.d. uniform), so that both strategies produce the same
            block structure and cost the same in the loss.

    Raises:
        ValueError: on a non-positive count, an unknown strategy or score, or
            ``uniform_acceptance`` outside ``(0, 1]``.

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
        max_proposals_per_slot: int = 64,
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
        self._workspace: _Workspace | None = None  # kept between calls: see _Workspace

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_workspace"] = None  # scratch memory: not part of a copy or a pickle
        return state

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
            anchor_probs: fused probability vectors of the anchors (unused for ``"uniform"``);
                any float dtype (float64 is kept, half precision is computed in float32). ``None``
                when every anchor is in the pool: its vector is ``pool_probs[anchor_pool_index]``,
                and its statistics are read from the pool's instead of computed again (what
                :class:`~instcontrast.InstanceAwarePixelContrast` does).
            pool_probs: fused probability vectors of the pool (unused for ``"uniform"``).
            anchor_pool_index: each anchor's own row in the pool, or ``-1`` if it is not in it;
                that row is never sampled for that anchor (several anchors may name the same row).
            pool_size: pool size ``M``; required for ``"uniform"`` when ``pool_probs`` is ``None``.
            generator: random generator (on the anchors' device) for reproducible draws.

        Shape:
            - anchor_probs: :math:`(A, E)`; pool_probs: :math:`(M, E)`; anchor_pool_index: :math:`(A,)`
            - output index: :math:`(A, R)` int64

        Returns:
            :class:`NegativeSamples`.

        Raises:
            ValueError: on mismatched shapes or a pool with fewer than 2 candidates.
            TypeError: on non-floating probability vectors.
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
        envelope = None
        if self.strategy != "uniform":
            if pool_probs is None:
                raise ValueError(f"strategy={self.strategy!r} needs pool_probs (M, E) (and anchor_probs (A, E) or anchors in the pool)")
            if pool_probs.ndim != 2 or pool_probs.shape[0] != pool_size:
                raise ValueError(f"pool_probs must have shape (M, E) with M = {pool_size}, got {tuple(pool_probs.shape)}")
            if anchor_probs is None and num_anchors > 0 and int(anchor_pool_index.min()) < 0:
                raise ValueError(
                    "anchor_probs=None reads each anchor's vector from its pool row, but some anchor_pool_index are -1 "
                    "(not in the pool): pass anchor_probs (A, E)"
                )
            if anchor_probs is not None and (anchor_probs.ndim != 2 or anchor_probs.shape != (num_anchors, pool_probs.shape[1])):
                raise ValueError(
                    f"anchor_probs must be (A, E) and pool_probs (M, E) with A = {num_anchors} and the same E, got "
                    f"{tuple(anchor_probs.shape)} and {tuple(pool_probs.shape)}"
                )
            for name, probs in (("anchor_probs", anchor_probs), ("pool_probs", pool_probs)):
                if probs is not None and not probs.is_floating_point():
                    raise TypeError(f"{name} must be a floating-point tensor, got {probs.dtype}")
            envelope = _build_envelope(anchor_probs, pool_probs, self.score, anchor_pool_index)
        return self._rejection_sample(envelope, anchor_pool_index, pool_size, generator)

    def _plan_blocks(
        self, envelope: _Envelope | None, block_rows: list[Tensor], half_acceptance: list[Tensor]
    ) -> list[tuple[float, Tensor, Tensor | None]]:
        """Each block's mixture weight ``λ``, its rows' expected acceptance ``ρ_p`` and constants ``C_p``, ``(c,)`` float64.

        For every block at once: compares the ``λ`` of :data:`_MIXTURE_WEIGHTS` by the expected
        proposals per negative (mean ``1/ρ``) at the :data:`_PLAN_QUANTILES` positions of its rows
        (sorted by ``U_p``) and keeps the cheapest of those whose acceptance stays at least
        ``min(1/4, what λ = 1/2 gives)`` (``half_acceptance``) for every row of the block — else
        ``λ = 1/2`` — so the bounds of the module documentation hold for every anchor. ``block_rows``
        are the anchors each block samples by rejection. ``C_p`` is ``None`` for ``"uniform"``.
        """
        if envelope is None:
            return [(0.0, torch.full(rows.shape, self.uniform_acceptance, dtype=torch.float64, device=rows.device), None)
                    for rows in block_rows]  # fmt: skip
        planned = [index for index, rows in enumerate(block_rows) if rows.numel() > 0]
        plans: list[tuple[float, Tensor, Tensor | None]] = [(0.0, rows.new_empty(0, dtype=torch.float64), None) for rows in block_rows]
        if not planned:
            return plans
        rows = torch.cat([block_rows[index] for index in planned])  # (n,) every planned row, block after block
        device = rows.device
        sizes = torch.tensor([block_rows[index].numel() for index in planned], device=device)  # (b,)
        starts = sizes.cumsum(0) - sizes  # (b,)
        block_of_row = torch.repeat_interleave(torch.arange(len(planned), device=device), sizes)  # (n,)
        half = torch.cat([half_acceptance[index] for index in planned])  # (n,)
        floor = torch.full((len(planned),), math.inf, dtype=torch.float64, device=device)
        floor = floor.scatter_reduce_(0, block_of_row, half, "amin").clamp_(max=0.25)  # (b,)
        score_sum = envelope.score_sum[rows]  # (n,)
        chosen = torch.zeros(len(planned), dtype=torch.float64, device=device)  # (b,) δ ≡ 0: uniform proposal only
        if envelope.weight_total > 0:
            mixtures = torch.tensor(_MIXTURE_WEIGHTS, dtype=torch.float64, device=device)  # (L,)
            quantiles = torch.tensor(_PLAN_QUANTILES, dtype=torch.float64, device=device)  # (Q,)
            picks = starts[:, None] + (quantiles[None, :] * (sizes[:, None] - 1)).round().long()  # (b, Q)
            probe_rows = rows[picks].reshape(-1)  # (b·Q,)
            probe = score_sum[picks].reshape(-1, 1) / envelope.envelope_constant(probe_rows, mixtures)  # (b·Q, L)
            probe = probe.clamp(1e-6, 1.0).reshape(len(planned), len(_PLAN_QUANTILES), -1)  # (b, Q, L)
            cost = probe.reciprocal().mean(dim=1)  # (b, L) mean proposals per accepted negative
            cost[probe.amin(dim=1) < floor[:, None]] = math.inf
            chosen = torch.where(torch.isfinite(cost).any(dim=1), mixtures[cost.argmin(dim=1)], 0.5)  # (b,)
        constant = envelope.envelope_constant(rows, chosen[block_of_row], per_row=True)  # (n,)
        acceptance = (score_sum / constant).clamp(1e-6, 1.0)  # (n,)
        if envelope.weight_total > 0:  # a block whose λ starves one of its rows falls back to λ = 1/2
            lowest = torch.full_like(floor, math.inf).scatter_reduce_(0, block_of_row, acceptance, "amin")  # (b,)
            redo = (chosen != 0.5) & (lowest < floor)  # (b,)
            if bool(redo.any()):
                chosen[redo] = 0.5
                again = redo[block_of_row]  # (n,)
                constant[again] = envelope.envelope_constant(rows[again], 0.5)
                acceptance[again] = (score_sum[again] / constant[again]).clamp(1e-6, 1.0)
        for index, start, size, mixture in zip(planned, starts.tolist(), sizes.tolist(), chosen.tolist(), strict=True):
            plans[index] = (mixture, acceptance[start : start + size], constant[start : start + size])
        return plans

    def _accept(
        self,
        envelope: _Envelope | None,
        row_block: Tensor | None,
        own: Tensor,
        candidates: Tensor,
        mixture: float,
        scores: Tensor,
        accept: Tensor,
        generator: torch.Generator | None,
    ) -> Tensor:
        r"""One coin per (anchor row, candidate), ``(c, m)`` bool: ``True`` with probability ``s^k / (C_p h(q))``.

        **Diagonal coins.** Row :math:`i`'s coin for candidate :math:`j` is :math:`v_{i+j}` from one
        vector of :math:`c + m - 1` i.i.d. uniforms (a strided view, no copy): each row reads
        :math:`m` distinct entries, so its coins are i.i.d. uniform and independent of the
        candidates — exactly what rejection sampling needs — and so are the coins of different rows
        for the same candidate. Only coins on one anti-diagonal (row :math:`i`, candidate :math:`j`
        and row :math:`i+1`, candidate :math:`j-1`) coincide. This draws :math:`c + m` random numbers
        a round instead of :math:`c\,m` (which cost as much as the scoring itself).

        With a coin :math:`u`, :math:`u < s^k / (C_p h_q)` is tested as
        :math:`u^{1/k} - s\,(C_p h_q)^{-1/k} < 0` (both sides non-negative), and
        :math:`-s\,(C_p h_q)^{-1/k}` is one matrix product of ``row_block`` — the rows'
        ``[u_p, 1, -α_p]·C_p^{-1/k}`` — with ``[d_q, -β_q, 1]·h_q^{-1/k}``, added onto the
        transformed coins in ``scores``, a ``(c, m)`` buffer; the result is written into ``accept``.
        """
        num_rows, num_candidates = own.numel(), candidates.numel()
        shared = torch.rand(num_rows + num_candidates - 1, generator=generator, device=own.device, dtype=scores.dtype)
        if envelope is not None and envelope.exponent == 2.0:
            shared.sqrt_()  # u^{1/k}
        elif envelope is not None and envelope.exponent == 0.5:
            shared.square_()
        coins = shared.as_strided((num_rows, num_candidates), (1, 1))  # (c, m): coins[i, j] = shared[i + j]
        if envelope is None:
            torch.lt(coins, self.uniform_acceptance, out=accept)  # (c, m)
        else:
            column_scale = envelope.proposal_density(candidates, mixture).pow(-1.0 / envelope.exponent)  # (m,)
            columns = torch.index_select(envelope.pool_rows, 0, candidates).mul_(column_scale.to(envelope.pool_rows.dtype)[:, None])  # (m, E+2)
            torch.lt(torch.addmm(coins, row_block, columns.T, out=scores), 0, out=accept)  # (c, m): u^{1/k} < s (C_p h_q)^{-1/k}
        # the anchor itself has s = 0: reject every (row, candidate) whose candidate is the row's own pool
        # entry; several rows may share one (anchors passed twice), so each candidate matches a range
        own_sorted, own_order = torch.sort(own)  # (c,)
        first = torch.searchsorted(own_sorted, candidates)  # (m,)
        matches = torch.searchsorted(own_sorted, candidates, right=True) - first  # (m,) rows whose own entry it is
        hit_column = torch.repeat_interleave(torch.arange(num_candidates, device=own.device), matches)  # (h,)
        within = torch.arange(hit_column.numel(), device=own.device) - (matches.cumsum(0) - matches)[hit_column]  # (h,)
        accept[own_order[first[hit_column] + within], hit_column] = False
        return accept

    def _rejection_sample(
        self,
        envelope: _Envelope | None,
        anchor_pool_index: Tensor,
        pool_size: int,
        generator: torch.Generator | None,
    ) -> NegativeSamples:
        device = anchor_pool_index.device
        num_anchors, num_negatives = anchor_pool_index.shape[0], self.num_negatives
        zero_pool = (
            envelope.zero_pool if envelope is not None else torch.zeros(num_anchors, dtype=torch.bool, device=device)
        )  # (A,)
        everyone = torch.arange(num_anchors, device=device)  # (A,)
        # rows sorted by U_p: a block's rows then want about the same mixture λ, so one λ suits them all;
        # zero-pool rows (every candidate scores 0: uniform draws, R columns of their own each) go last, in
        # small blocks, so that a block's (rows × columns) scores stay within _BLOCK_ELEMENTS even when a
        # collapsed model makes every row zero-pool
        order = None if envelope is None or num_anchors < 2 else torch.argsort(envelope.bound_offset, stable=True)  # (A,)
        num_zero_pool = int(zero_pool.sum())
        if order is not None and num_zero_pool > 0:
            order = torch.cat([order[~zero_pool[order]], order[zero_pool[order]]])  # (A,) zero-pool rows last
        # block height from the rows' typical round size (λ = 1/2), so blocks have similar sizes
        if envelope is None:
            half_acceptance = torch.full((num_anchors,), self.uniform_acceptance, dtype=torch.float64, device=device)
        else:
            half_acceptance = (envelope.score_sum / envelope.envelope_constant(everyone, 0.5)).clamp(1e-6, 1.0)  # (A,)
        typical = half_acceptance[~zero_pool] if bool((~zero_pool).any()) else half_acceptance
        if order is not None:
            half_acceptance = half_acceptance[order]  # (A,) in block-row order
        first_size = float(_round_size(torch.tensor([float(num_negatives)]), typical.median().reshape(1).cpu())[0])
        first_size = min(first_size, self.max_proposals_per_slot * num_negatives)
        rows_per_block = max(1, int(_BLOCK_ELEMENTS // max(1.0, first_size)))
        # zero-pool rows are drawn like strategy="uniform" (their target is uniform over the pool minus the
        # anchor): shared proposals thinned at uniform_acceptance, in blocks of their own
        uniform_first = float(_round_size(torch.tensor([float(num_negatives)]), torch.tensor([self.uniform_acceptance]))[0])
        zero_pool_rows_per_block = max(1, int(_BLOCK_ELEMENTS // max(1.0, uniform_first)))
        first_zero = num_anchors - num_zero_pool if order is not None else num_anchors
        block_bounds = [(start, min(first_zero, start + rows_per_block)) for start in range(0, first_zero, rows_per_block)]
        block_bounds += [(start, min(num_anchors, start + zero_pool_rows_per_block))
                         for start in range(first_zero, num_anchors, zero_pool_rows_per_block)]
        zero_pool_block = [envelope is not None and start >= first_zero for start, _ in block_bounds]
        coin_dtype = envelope.pool_rows.dtype if envelope is not None else torch.float32
        if self._workspace is None or self._workspace.device != device:
            self._workspace = _Workspace(device)
        workspace = self._workspace  # the rounds' (rows, candidates) matrices, reused

        rows_of_block = [everyone[start:stop] if order is None else order[start:stop] for start, stop in block_bounds]
        pending_of_block = [(~zero_pool[rows]).nonzero(as_tuple=True)[0] for rows in rows_of_block]  # sampled from the target
        plans = self._plan_blocks(
            envelope,
            [rows[pending] for rows, pending in zip(rows_of_block, pending_of_block, strict=True)],
            [half_acceptance[start:stop][pending] for (start, stop), pending in zip(block_bounds, pending_of_block, strict=True)],
        )
        for block, rows in enumerate(rows_of_block):  # zero-pool blocks: every row, uniform proposals
            if zero_pool_block[block]:
                pending_of_block[block] = torch.arange(rows.numel(), device=device)
                plans[block] = self._plan_blocks(None, [rows], [])[0]
        starts, block_candidates, block_columns, block_segments = [], [], [], []
        row_order = torch.empty(num_anchors, dtype=torch.long, device=device)  # (A,) the anchor of each block row
        proposals = accepted = max_rounds_used = fallbacks = fallback_anchors = 0
        min_acceptance = math.inf
        for (start, stop), rows, pending, plan, uniform_rows in zip(
            block_bounds, rows_of_block, pending_of_block, plans, zero_pool_block, strict=True
        ):
            size = stop - start
            block_envelope = None if uniform_rows else envelope  # None: uniform proposals and thinning
            own = anchor_pool_index[rows]  # (c,)
            # column 0 takes rejections, column R + 1 acceptances beyond a row's need: both dropped
            # int32 positions in the block's candidate list (a block proposes far fewer than 2^31)
            columns = workspace.view("columns", (size, num_negatives + 2), torch.int32).fill_(-1)  # (c, R + 2)
            filled = torch.zeros(size, dtype=torch.int32, device=device)  # (c,)
            candidate_parts: list[Tensor] = []
            offset = rounds = 0
            mixture, row_block = 0.0, None
            if pending.numel() > 0:
                mixture, acceptance, constant = plan  # λ, (p,), (p,)
                acceptance_of_row = torch.zeros(size, dtype=torch.float64, device=device)
                acceptance_of_row[pending] = acceptance
                if not uniform_rows:
                    min_acceptance = min(min_acceptance, float(acceptance.min()))
                if block_envelope is not None:  # zero-pool rows: never scored, any finite scale does
                    row_scale = torch.ones(size, dtype=torch.float64, device=device)  # (c,)
                    row_scale[pending] = constant.pow(-1.0 / envelope.exponent)
                    anchor_buffer = workspace.view("anchor_rows", (size, envelope.pool_rows.shape[1]), coin_dtype)
                    row_block = envelope.anchor_block(rows, out=anchor_buffer)  # (c, E+2)
                    row_block.mul_(row_scale.to(envelope.pool_rows.dtype)[:, None])
            while pending.numel() > 0 and rounds < self.max_rounds:
                rounds += 1
                need = num_negatives - filled[pending]  # (p,)
                sizes = _round_size(need, acceptance_of_row[pending])  # (p,)
                # first round: enough for most rows (the rest finish in a small second round); later: all
                wanted = sizes.quantile(_FIRST_ROUND_QUANTILE) if rounds == 1 and sizes.numel() > 1 else sizes.max()
                num_candidates = int(min(float(wanted), self.max_proposals_per_slot * int(need.max())))
                if block_envelope is None:
                    candidates = torch.randint(0, pool_size, (num_candidates,), generator=generator, device=device)
                else:
                    candidates = envelope.propose(num_candidates, mixture, generator)  # (m,)
                whole_block = pending.numel() == size
                shape = (pending.numel(), num_candidates)
                accept = self._accept(
                    block_envelope, None if row_block is None else (row_block if whole_block else row_block[pending]),
                    own[pending], candidates, mixture, workspace.view("scores", shape, coin_dtype),
                    workspace.view("accept", shape, torch.bool), generator,
                )  # (p, m)  # fmt: skip
                # a row's k-th acceptance is its k-th draw: slot = already filled + rank (1-based);
                # rejections go to slot 0, acceptances beyond the row's need to slot R + 1
                # (ops mixing bool and int32 operands ran up to 20x slower than one explicit conversion)
                accepted_01 = workspace.view("accepted_01", shape, torch.int32).copy_(accept)  # (p, m) 0/1
                slot = torch.cumsum(accepted_01, dim=1, out=workspace.view("slot", shape, torch.int32))  # (p, m)
                counts = slot[:, -1].clone()  # (p,) acceptances per row
                already = filled[pending]  # (p,)
                slot.add_(already[:, None]).mul_(accepted_01).clamp_(max=num_negatives + 1)  # (p, m)
                index = workspace.view("index", shape, torch.long).copy_(slot)  # (p, m) scatter wants int64
                values = torch.arange(offset, offset + num_candidates, dtype=torch.int32, device=device).expand(shape)
                if whole_block:
                    columns.scatter_(1, index, values)
                else:
                    columns[pending] = columns[pending].scatter_(1, index, values)
                filled[pending] = (already + counts).clamp_(max=num_negatives)
                candidate_parts.append(candidates)
                offset += num_candidates
                proposals += accept.numel()
                accepted += int(counts.sum())
                pending = pending[filled[pending] < num_negatives]
            columns = columns[:, 1 : num_negatives + 1]  # (c, R): drop the spare columns
            if uniform_rows:  # zero-pool rows count as fallbacks, R slots each, however they were drawn
                fallbacks += int(filled.sum())
                fallback_anchors += size
            short_rows = (filled < num_negatives).nonzero(as_tuple=True)[0]  # rounds exhausted
            if short_rows.numel() > 0:  # uniform over the pool minus the anchor, counted
                block_rows = columns[short_rows]  # (p, R)
                short = block_rows < 0  # (p, R)
                count = int(short.sum())
                fallback = _uniform_excluding(own[short_rows], pool_size, (short_rows.numel(), num_negatives), generator)
                block_rows[short] = torch.arange(offset, offset + count, dtype=torch.int32, device=device)
                columns[short_rows] = block_rows
                candidate_parts.append(fallback[short])
                offset += count
                fallbacks += count
                fallback_anchors += 0 if uniform_rows else int(short_rows.numel())
            # rows sorted by the last candidate they use: the rows that need a candidate are then a
            # prefix of the block, so the loss scores each piece of the candidate list with a view
            extent, by_extent = columns.amax(dim=1).sort(descending=True, stable=True)  # (c,), (c,)
            row_order[start:stop] = rows[by_extent]
            starts.append(start)
            block_candidates.append(torch.cat(candidate_parts))
            block_columns.append(torch.index_select(columns, 0, by_extent))  # (c, R) int32: half the memory of int64
            block_segments.append(tuple(_prefix_segments(extent, offset)))
            max_rounds_used = max(max_rounds_used, rounds)
        blocks = CandidateBlocks(
            tuple(starts), tuple(block_candidates), tuple(block_columns), num_negatives, tuple(block_segments), row_order
        )
        return NegativeSamples(
            blocks=blocks,
            proposals=proposals,
            accepted=accepted,
            fallbacks=fallbacks,
            fallback_anchors=fallback_anchors,
            rounds=max_rounds_used,
            zero_pool_anchors=int(zero_pool.sum()),
            mean_score=envelope.mean_score if envelope is not None else float("nan"),
            min_expected_acceptance=min_acceptance if math.isfinite(min_acceptance) else float("nan"),
        )
