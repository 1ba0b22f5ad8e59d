"""Acceptance of the sampler's envelope, and of a principal-direction envelope that was its next lever.

The fusion sampler's cost over uniform sampling is set by its acceptance (proposals scored per
negative = 1 / acceptance). Its envelope bounds the score from norms alone,
``s(p, q) = ½‖u_p - d_q‖² + a_p + b_q ≤ U_p + δ_q``, and every anchor of a block shares one
proposal. On centred vectors that are nearly orthogonal this accepts about half the proposals.
Centred fused vectors of an untrained Mask2Former are nearly low-rank, so an envelope that keeps
the exact inner product along the top ``r`` principal directions ``P`` (``x = Pᵀu``, ``z = Pᵀd``)
and bounds only the rest looked like the way past one half:

    s ≤ a_p + b_q + ½‖x_p - z_q‖² + ½(‖u_⊥‖ + ‖d_⊥‖)²                      (per anchor)
      ≤ [a_p + ½(1+1/η)‖x_p - x̄‖² + ½(1+ζ)‖u_⊥‖²] + [b_q + ½(1+η)‖z_q - x̄‖² + ½(1+1/ζ)‖d_⊥‖²]

The second line is the same "anchor term + candidate term" form as the sampler's envelope, with a
block centre ``x̄`` (the mean ``x`` of the block's anchors) and per-block ``η, ζ``, so one block
still shares one mixture proposal and the sampler's closed-form ``C_p`` applies unchanged.

For each case this script reports, at P1 (``B=4, 64×64, K=50, C=8``): the acceptance the sampler
actually reaches (``InstanceAwareSampler``, fusion, linear score); the same computed from its
envelope (validates the computation below); the principal-direction envelope with block-shared
proposals, anchors grouped into blocks by a k-d split of ``x`` (best ``η, ζ`` of a grid and best
mixture weight ``λ`` per block), for ``r`` = 2 / 4 / 8 and several block heights; and the per-anchor
ideal (each anchor with its own proposal ``∝`` its bound: ``Σ_q s / Σ_q g_p``), which no shared
proposal can reach. Acceptance is ``A / Σ_p 1/ρ_p`` (proposals per negative, inverted), computed
exactly from the score sums and the envelope constants, no sampling.

Usage: ``python benchmarks/bench_envelope.py [--out benchmarks/results] [--smoke] [--threads 1]``
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import sys
from pathlib import Path
from typing import Any

# this folder (for ``common``) and the repository root (the checkout's ``instcontrast``)
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import bench_confidence
import common
import torch
from common import Shape

from instcontrast import InstanceAwareSampler
from instcontrast._checks import extract_predictions
from instcontrast.functional import fused_probability
from instcontrast.sampler import _MIXTURE_WEIGHTS, _build_envelope

NAME = "bench_envelope"
P1_SHAPE = Shape(batch=4, height=64, width=64, queries=50, classes=8, dim=128, negatives=256)
SMOKE_SHAPE = Shape(batch=2, height=8, width=8, queries=6, classes=3, dim=16, negatives=16)
RANKS = (2, 4, 8)
ROWS_PER_BLOCK = (1024, 2048, 4096)
YOUNG_GRID = tuple(itertools.product((0.1, 0.3, 1.0), (0.3, 1.0, 3.0)))  # (η, ζ)
CANDIDATE_WEIGHTS = (0.5, 1.0, 2.0, 4.0)  # γ: weight of ‖d_⊥‖² in a block's candidate term
ANCHOR_SCALES = (1.02, 1.05, 1.1, 1.2, 1.35, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0)  # α tried per anchor


def fused_rows(shape: Shape, case: str) -> torch.Tensor:
    """Fused probability vectors ``(B·h·w, E)`` float64 of a random-init Mask2Former or ``scale·N(0,1)`` logits."""
    if case == bench_confidence.MASK2FORMER:
        mask_logits, class_logits = extract_predictions(bench_confidence.mask2former_outputs(shape)[0], None)
    else:
        mask_logits, class_logits = bench_confidence.random_logits(shape, float(case))
    probs = fused_probability(mask_logits, class_logits, (shape.height, shape.width))
    return probs.reshape(-1, probs.shape[-1]).double()


def harmonic_acceptance(inverse_rates: list[torch.Tensor]) -> float:
    """``A / Σ_p 1/ρ_p``: accepted over proposed when every anchor draws its ``R`` negatives."""
    inverse = torch.cat(inverse_rates)
    return float(inverse.numel() / inverse.sum())


def best_block_cost(envelope: Any, rows: torch.Tensor, bound: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """``1/ρ_p`` of a block's rows under the best mixture weight ``λ`` for the envelope ``bound + spread``."""
    shifted = dataclasses.replace(
        envelope,
        bound_offset=torch.zeros_like(envelope.bound_offset).index_copy_(0, rows, bound),
        spread=spread,
        weight_cdf=spread.cumsum(0),
        spread_range=(float(spread.min()), float(spread.max())),
    )
    mixtures = torch.tensor(_MIXTURE_WEIGHTS, dtype=torch.float64)
    rates = (envelope.score_sum[rows][:, None] / shifted.envelope_constant(rows, mixtures)).clamp(max=1.0)  # (c, L)
    inverse = 1.0 / rates  # (c, L)
    return inverse[:, int(inverse.mean(dim=0).argmin())]


def per_anchor_weight_cost(
    score_sum: torch.Tensor, excess: torch.Tensor, block: torch.Tensor, anchor_spread: torch.Tensor,
    pool_spread: torch.Tensor, perpendicular: torch.Tensor, gamma: float,
) -> torch.Tensor:
    r"""``1/ρ_p`` of a block's rows with Young weights chosen per anchor (best mixture ``λ`` for the block).

    The block proposes from ``w_q = b_q + ½‖z_q - x̄‖² + ½γ‖d_⊥‖²``; anchor ``p`` bounds
    ``s ≤ min(1, K_p(α) + α w_q)`` with ``η = α - 1``, ``ζ = 1/(αγ - 1)``,
    ``K_p = a_p + ½(1 + 1/η)‖x_p - x̄‖² + ½(1 + ζ)‖u_⊥‖²``, and takes the ``α`` of
    :data:`ANCHOR_SCALES` with the smallest ``C_p = max_w min(1, K + αw) / h(w)`` (at ``w_min``,
    ``w_max`` or where the cap starts: the ratio is monotone on both sides). Linear score only.
    """
    weight = (excess + 0.5 * pool_spread + 0.5 * gamma * perpendicular).clamp_min(0.0)  # (M,) w_q
    mixtures = torch.tensor(_MIXTURE_WEIGHTS, dtype=torch.float64)  # (L,)
    uniform_part = (1.0 - mixtures) / weight.numel()  # (L,)
    weighted_part = mixtures / weight.sum()  # (L,)
    scale = torch.tensor(ANCHOR_SCALES, dtype=torch.float64).clamp_min(1.0001 / gamma)[None, :, None]  # (1, S, 1) α
    offset = (
        excess[block, None, None].clamp_min(0.0)
        + 0.5 * scale / (scale - 1.0) * anchor_spread[:, None, None]
        + 0.5 * scale * gamma / (scale * gamma - 1.0) * perpendicular[block, None, None]
    )  # (c, S, 1) K_p(α)
    low, high = float(weight.min()), float(weight.max())
    ratio = None
    for point in (torch.full_like(offset, low), torch.full_like(offset, high), ((1.0 - offset) / scale).clamp(low, high)):
        value = (offset + scale * point).clamp(max=1.0) / (uniform_part + weighted_part * point)  # (c, S, L)
        ratio = value if ratio is None else torch.maximum(ratio, value)
    constant = ratio.amin(dim=1)  # (c, L): each anchor's best α
    inverse = 1.0 / (score_sum[:, None] / constant).clamp(max=1.0)  # (c, L)
    return inverse[:, int(inverse.mean(dim=0).argmin())]


def kd_blocks(points: torch.Tensor, rows: torch.Tensor, leaves: int) -> list[torch.Tensor]:
    """Split ``rows`` into ``leaves`` equal blocks by recursive median cuts of ``points`` along the widest axis."""
    if leaves <= 1 or rows.numel() < 2:
        return [rows]
    axis = int(points[rows].var(dim=0).argmax())
    ordered = rows[points[rows, axis].argsort()]
    left = leaves // 2
    cut = ordered.numel() * left // leaves
    return kd_blocks(points, ordered[:cut], left) + kd_blocks(points, ordered[cut:], leaves - left)


def measure_case(shape: Shape, case: str, ranks: tuple[int, ...], heights: tuple[int, ...]) -> dict[str, Any]:
    """Sampler, its envelope recomputed, principal-direction envelopes and per-anchor ideals for one case."""
    probs = fused_rows(shape, case)  # (M, E)
    pool_size = probs.shape[0]
    everyone = torch.arange(pool_size)
    sampled = InstanceAwareSampler(shape.negatives)(None, probs.float(), everyone, generator=torch.Generator().manual_seed(0))
    envelope = _build_envelope(None, probs, "linear", everyone)
    centered = probs - probs.mean(dim=0)  # (M, E) u = d
    excess = 0.5 * (1.0 - probs.square().sum(dim=1))  # (M,) a = b
    centered_sq = centered.square().sum(dim=1)  # (M,)

    # the sampler's own envelope U_p + δ_q, blocks of rows sorted by U_p
    row_height = max(1, int(2**20 // ((shape.negatives + math.sqrt(shape.negatives) + 1) / max(sampled.acceptance_rate, 1e-6))))
    norm_bound = (centered_sq + excess).clamp_min(0.0)
    sorted_rows = torch.argsort(norm_bound)
    norm = [best_block_cost(envelope, block, norm_bound[block], norm_bound) for block in sorted_rows.split(row_height)]

    sample = torch.randperm(pool_size, generator=torch.Generator().manual_seed(0))[: min(pool_size, 4096)]
    variance, vectors = torch.linalg.eigh(centered[sample].T @ centered[sample])
    variance, vectors = variance.flip(0), vectors.flip(1)  # (E,), (E, E): principal directions, largest variance first
    shared: dict[str, float] = {}
    per_anchor_weights: dict[str, float] = {}
    ideal: dict[str, float] = {}
    rows = sample[:1024]  # the per-anchor ideal on a row sample: Σ_q s / Σ_q min(1, g_p(q))
    exact = (0.5 * (centered_sq[rows, None] + centered_sq[None, :]) - centered[rows] @ centered.T
             + excess[rows, None] + excess[None, :]).clamp_min(0.0)  # (n, M) s
    norms = centered_sq.sqrt()  # (M,)
    norm_only = (0.5 * (norms[rows, None] + norms[None, :]).square() + excess[rows, None] + excess[None, :]).clamp(0.0, 1.0)
    ideal["0"] = float((exact.sum(dim=1) / norm_only.sum(dim=1)).mean())
    for rank in ranks:
        coordinates = centered @ vectors[:, :rank]  # (M, r) x = z
        perpendicular = (centered_sq - coordinates.square().sum(dim=1)).clamp_min(0.0)  # (M,) ‖u_⊥‖²
        for height in heights:
            inverse, per_anchor_inverse = [], []
            for block in kd_blocks(coordinates, everyone, max(1, math.ceil(pool_size / height))):
                block_center = coordinates[block].mean(dim=0)  # (r,) x̄
                anchor_spread = (coordinates[block] - block_center).square().sum(dim=1)  # (c,) ‖x_p - x̄‖²
                pool_spread = (coordinates - block_center).square().sum(dim=1)  # (M,) ‖z_q - x̄‖²
                costs = []
                for eta, zeta in YOUNG_GRID:
                    bound = (excess[block] + 0.5 * (1 + 1 / eta) * anchor_spread + 0.5 * (1 + zeta) * perpendicular[block]).clamp_min(0.0)
                    spread = (excess + 0.5 * (1 + eta) * pool_spread + 0.5 * (1 + 1 / zeta) * perpendicular).clamp_min(0.0)
                    costs.append(best_block_cost(envelope, block, bound, spread))
                inverse.append(min(costs, key=lambda cost: float(cost.mean())))
                per_anchor_inverse.append(
                    min((per_anchor_weight_cost(envelope.score_sum[block], excess, block, anchor_spread, pool_spread, perpendicular, gamma)
                         for gamma in CANDIDATE_WEIGHTS), key=lambda cost: float(cost.mean()))
                )  # fmt: skip
            shared[f"r={rank}, {height} rows"] = harmonic_acceptance(inverse)
            per_anchor_weights[f"r={rank}, {height} rows"] = harmonic_acceptance(per_anchor_inverse)
        # exact inner product along P: ½‖x_p - z_q‖² = ½(‖x_p‖² + ‖z_q‖²) - ⟨x_p, z_q⟩
        coordinate_sq = coordinates.square().sum(dim=1)  # (M,)
        inside = 0.5 * (coordinate_sq[rows, None] + coordinate_sq[None, :]) - coordinates[rows] @ coordinates.T  # (n, M)
        outside = 0.5 * (perpendicular[rows, None].sqrt() + perpendicular[None, :].sqrt()).square()  # (n, M)
        bound = (inside + outside + excess[rows, None] + excess[None, :]).clamp(0.0, 1.0)  # (n, M) g
        ideal[str(rank)] = float((exact.sum(dim=1) / bound.sum(dim=1)).mean())
    return {
        "case": case,
        "sampler_acceptance": sampled.acceptance_rate,
        "norm_envelope_acceptance": harmonic_acceptance(norm),
        "rows_per_block": row_height,
        "principal_shared": shared,
        "principal_per_anchor_weights": per_anchor_weights,
        "per_anchor_ideal": dict(sorted(ideal.items(), key=lambda item: int(item[0]))),
        "variance_share_top": {str(r): float(variance[:r].sum() / variance.sum()) for r in (*ranks, 16)},
    }


def render_markdown(payload: dict[str, Any]) -> str:
    shape = Shape(**{key: value for key, value in payload["shape"].items() if key not in ("pixels", "prob_dim")})
    lines = [
        "# Envelope acceptance: the sampler's norm bound vs a principal-direction bound",
        "",
        f"Shape: B={shape.batch}, {shape.height}×{shape.width} ({shape.batch * shape.height * shape.width:,} anchors = pool), "
        f"K={shape.queries}, C={shape.classes}, R={shape.negatives}; fusion, linear score. Acceptance = A / Σ_p 1/ρ_p, "
        "exact from score sums and envelope constants (best mixture λ per block).",
        "",
        "| case | sampler (measured) | norm envelope (computed) | variance share in the top "
        + " / ".join(payload["cases"][0]["variance_share_top"]) + " directions | " + " | ".join(f"principal, {key}" for key in payload["cases"][0]["principal_shared"]) + " |",
        "|---|---|---|---|" + "---|" * len(payload["cases"][0]["principal_shared"]),
    ]
    for row in payload["cases"]:
        shares = " / ".join(f"{value:.2f}" for value in row["variance_share_top"].values())
        lines.append(
            f"| {row['case']} | {row['sampler_acceptance']:.3f} | {row['norm_envelope_acceptance']:.3f} | {shares} | "
            + " | ".join(f"{value:.3f}" for value in row["principal_shared"].values()) + " |"
        )
    lines += [
        "",
        "Principal-direction envelope with Young weights chosen per anchor (α, the block's candidate weight γ and λ per block):",
        "",
        "| case | " + " | ".join(payload["cases"][0]["principal_per_anchor_weights"]) + " |",
        "|---|" + "---|" * len(payload["cases"][0]["principal_per_anchor_weights"]),
    ]
    for row in payload["cases"]:
        lines.append(f"| {row['case']} | " + " | ".join(f"{value:.3f}" for value in row["principal_per_anchor_weights"].values()) + " |")
    lines += [
        "",
        "Per-anchor ideal (every anchor its own proposal ∝ its bound; not shareable by a block): Σ_q s / Σ_q g_p, "
        f"mean over {payload['ideal_rows']:,} anchors.",
        "",
        "| case | " + " | ".join(f"r = {key}" for key in payload["cases"][0]["per_anchor_ideal"]) + " |",
        "|---|" + "---|" * len(payload["cases"][0]["per_anchor_ideal"]),
    ]
    for row in payload["cases"]:
        lines.append(f"| {row['case']} | " + " | ".join(f"{value:.3f}" for value in row["per_anchor_ideal"].values()) + " |")
    gains = [max(*row["principal_shared"].values(), *row["principal_per_anchor_weights"].values()) - row["norm_envelope_acceptance"]
             for row in payload["cases"]]
    lines += [
        "",
        "Best principal-direction envelope with block-shared proposals (either weighting) minus the norm envelope: "
        + ", ".join(f"{row['case']} {gain:+.3f}" for row, gain in zip(payload["cases"], gains, strict=True))
        + f" (largest gain {max(gains):+.3f}; per-anchor ideal at the largest r minus at r = 0: "
        + ", ".join(f"{row['case']} {list(row['per_anchor_ideal'].values())[-1] - row['per_anchor_ideal']['0']:+.3f}" for row in payload["cases"])
        + ").",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=common.DEFAULT_RESULTS_DIR)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (test suite)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu", choices=("cpu",), help="computed on the CPU (no timing here)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    shape = SMOKE_SHAPE if args.smoke else P1_SHAPE
    cases = ("1",) if args.smoke else (bench_confidence.MASK2FORMER, "0.03", "1")
    ranks, heights = ((2,), (32,)) if args.smoke else (RANKS, ROWS_PER_BLOCK)
    payload = {
        "benchmark": NAME,
        "environment": common.environment_info(torch.device("cpu")),
        "config": {"ranks": ranks, "rows_per_block": heights, "young_grid": YOUNG_GRID, "candidate_weights": CANDIDATE_WEIGHTS,
                   "anchor_scales": ANCHOR_SCALES, "mixture_weights": _MIXTURE_WEIGHTS},
        "shape": shape.as_dict(),
        "cases": [measure_case(shape, case, ranks, heights) for case in cases],
        "ideal_rows": min(1024, shape.batch * shape.height * shape.width),
    }
    common.write_report(NAME, args.out, payload, render_markdown(payload))
    return payload


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
