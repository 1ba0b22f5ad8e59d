"""The sampler's cost does not depend on how confident the predictions are, and its envelope is valid.

Properties checked here (the chi-square exactness tests are in ``test_sampler.py``):

- the envelope dominates the target: ``s^k(p, q) <= C_p h(q)`` for every anchor and candidate, so
  rejection sampling is exact, whatever the logit scale and dtype;
- the closed-form score sums equal brute force, so each anchor's expected acceptance is known;
- acceptance is bounded below independently of confidence (``linear`` >= 1/4, ``sqrt`` >= 0.118);
- proposals per negative, rounds and the largest scored block stay flat from near-uniform to
  confident logits, with zero fallbacks whenever the pool has a positive score;
- a pool whose scores are all zero is reported, not sampled slowly;
- float64 stays float64 and every dtype combination of embeddings × logits runs.
"""

from __future__ import annotations

import math

import pytest
import torch

from instcontrast import InstanceAwarePixelContrast
from instcontrast.functional import SCORES, debias_score, fused_probability, transform_score
from instcontrast.sampler import _BLOCK_ELEMENTS, InstanceAwareSampler, _build_envelope

torch.set_num_threads(1)

LOGIT_SCALES = (0.03, 0.1, 0.3, 1.0, 5.0)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BOUND = {"linear": 0.25, "sqrt": 1.0 / (6.0 * math.sqrt(2.0)), "squared": 1.0 / 528.0}


def _probs(logit_scale: float, seed: int = 0, batch: int = 2, side: int = 8, queries: int = 6, classes: int = 3, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    mask_logits = logit_scale * torch.randn(batch, queries, side, side, generator=generator, dtype=torch.float64)
    class_logits = logit_scale * torch.randn(batch, queries, classes + 1, generator=generator, dtype=torch.float64)
    probs = fused_probability(mask_logits.to(dtype), class_logits.to(dtype))  # (B, N, E)
    return probs.reshape(batch * side * side, -1)  # (M, E)


def _brute_force_scores(probs: torch.Tensor, score: str) -> torch.Tensor:
    wide = probs.double()
    return transform_score((1.0 - wide @ wide.T).clamp(0.0, 1.0), score)  # (M, M)


@pytest.mark.parametrize("anchors_in_pool", [False, True], ids=["anchors-passed", "anchors-read-from-pool"])
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("logit_scale", LOGIT_SCALES)
def test_envelope_dominates_the_target_for_every_pair(logit_scale: float, score: str, anchors_in_pool: bool) -> None:
    probs = _probs(logit_scale)
    everyone = torch.arange(probs.shape[0])
    envelope = _build_envelope(None if anchors_in_pool else probs, probs, score, everyone)
    target = _brute_force_scores(probs, score)  # (M, M)
    for mixture in (0.0, 0.2, 0.5, 0.9):
        constant = envelope.envelope_constant(everyone, mixture)  # (M,)
        density = envelope.proposal_density(everyone, mixture)  # (M,)
        torch.testing.assert_close(density.sum(), torch.tensor(1.0, dtype=torch.float64))
        ratio = target / (constant[:, None] * density[None, :])  # acceptance probability of each pair
        assert float(ratio.max()) <= 1.0, (mixture, float(ratio.max()))


@pytest.mark.parametrize("anchors_in_pool", [False, True], ids=["anchors-passed", "anchors-read-from-pool"])
@pytest.mark.parametrize("score", ["linear", "squared"])
@pytest.mark.parametrize("logit_scale", LOGIT_SCALES)
def test_closed_form_score_sums_equal_brute_force(logit_scale: float, score: str, anchors_in_pool: bool) -> None:
    probs = _probs(logit_scale)
    first = torch.arange(20)
    envelope = _build_envelope(None if anchors_in_pool else probs[:20], probs, score, first)
    expected = _brute_force_scores(probs, score)[:20].sum(dim=1)  # (20,)
    torch.testing.assert_close(envelope.score_sum, expected, rtol=1e-4, atol=1e-9)
    mean = debias_score(probs[:20, None].double(), probs[None].double()).mean()
    assert envelope.mean_score == pytest.approx(float(mean), rel=1e-4)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("logit_scale", LOGIT_SCALES)
def test_acceptance_is_bounded_below_whatever_the_confidence(logit_scale: float, score: str) -> None:
    probs = _probs(logit_scale, seed=1)
    out = InstanceAwareSampler(num_negatives=64, score=score)(probs, probs, torch.arange(probs.shape[0]), generator=torch.Generator().manual_seed(0))
    assert out.fallbacks == 0 and out.zero_pool_anchors == 0
    slack = 1e-3
    if score != "sqrt":  # sqrt's per-anchor figure is a lower bound of the true acceptance, not the bound itself
        assert out.min_expected_acceptance >= BOUND[score] * (1 - slack)
    assert out.acceptance_rate >= BOUND[score] * (1 - slack)
    assert out.acceptance_rate <= 1.0


def test_linear_acceptance_is_at_least_a_quarter_even_for_a_single_outlier() -> None:
    # every candidate identical except one: the whole target mass sits on the outlier
    probs = torch.nn.functional.normalize(torch.ones(50, 5), dim=1)
    probs[7] = torch.nn.functional.normalize(torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0]), dim=0)
    anchors = torch.tensor([0, 1, 2])
    out = InstanceAwareSampler(num_negatives=200)(probs[anchors], probs, anchors, generator=torch.Generator().manual_seed(0))
    assert out.fallbacks == 0 and out.zero_pool_anchors == 0
    assert (out.index == 7).all()
    assert out.min_expected_acceptance >= 0.25 * (1 - 1e-3)


@pytest.mark.parametrize("score", SCORES)
def test_cost_and_memory_are_flat_from_near_uniform_to_confident(score: str) -> None:
    num_negatives = 128
    per_negative, rounds, largest_block = [], [], []
    for logit_scale in LOGIT_SCALES:
        probs = _probs(logit_scale, batch=4, side=16, queries=10, classes=4)  # 1,024 pixels
        num_anchors = probs.shape[0]
        out = InstanceAwareSampler(num_negatives=num_negatives, score=score)(
            probs, probs, torch.arange(num_anchors), generator=torch.Generator().manual_seed(3)
        )
        assert out.fallbacks == 0 and out.zero_pool_anchors == 0, logit_scale
        per_negative.append(out.proposals / (num_anchors * num_negatives))
        rounds.append(out.rounds)
        blocks = out.blocks
        largest_block.append(max(cols.shape[0] * cand.numel() for cols, cand in zip(blocks.columns, blocks.candidates)))
    limit = {"linear": 4.5, "sqrt": 9.0, "squared": 9.0}[score]  # proposals per negative, 1/acceptance + margin
    assert max(per_negative) <= limit, per_negative
    assert max(rounds) <= 3, rounds
    assert max(largest_block) <= 3 * _BLOCK_ELEMENTS, largest_block


def test_an_all_zero_pool_is_reported_and_other_anchors_stay_exact() -> None:
    same = torch.nn.functional.normalize(torch.ones(30, 4), dim=1)  # one instance everywhere
    other = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0, 2.0]]), dim=1)
    anchors = torch.cat([same[:2], other])  # two anchors like the pool, one unlike it
    out = InstanceAwareSampler(num_negatives=300)(anchors, same, torch.tensor([0, 1, -1]), generator=torch.Generator().manual_seed(0))
    assert out.zero_pool_anchors == 2
    assert out.fallbacks == 2 * 300 and out.fallback_anchors == 2
    assert (out.index[:2] != torch.tensor([[0], [1]])).all()  # uniform minus itself
    assert out.index[2].unique().numel() == 30  # uniform over an equal-score pool, by rejection


def test_zero_pool_detection_ignores_norm_rounding_only() -> None:
    probs = _probs(0.03)  # mean score ~1e-4: positive
    out = InstanceAwareSampler(num_negatives=16)(probs, probs, torch.arange(probs.shape[0]))
    assert out.zero_pool_anchors == 0
    for factor in (1 + 2e-7, 1 - 2e-7):  # norms off by rounding only, either way
        identical = probs[:1].expand(40, -1).contiguous() * factor
        out = InstanceAwareSampler(num_negatives=16)(identical, identical, torch.arange(40))
        assert out.zero_pool_anchors == 40, factor


def test_float64_probabilities_are_sampled_in_float64() -> None:
    probs = _probs(0.3, dtype=torch.float64)
    assert probs.dtype == torch.float64
    everyone = torch.arange(probs.shape[0])
    for anchor_probs in (probs, None):
        envelope = _build_envelope(anchor_probs, probs, "linear", everyone)
        assert envelope.anchor_block(everyone).dtype == torch.float64 and envelope.pool_rows.dtype == torch.float64
    out = InstanceAwareSampler(num_negatives=32)(probs, probs, torch.arange(probs.shape[0]))
    assert out.index.shape == (probs.shape[0], 32) and out.fallbacks == 0


@pytest.mark.parametrize("anchor_dtype", DTYPES)
@pytest.mark.parametrize("pool_dtype", DTYPES)
def test_sampler_accepts_every_float_dtype_pair(anchor_dtype: torch.dtype, pool_dtype: torch.dtype) -> None:
    probs = _probs(1.0)
    out = InstanceAwareSampler(num_negatives=16)(probs.to(anchor_dtype), probs.to(pool_dtype), torch.arange(probs.shape[0]))
    assert out.fallbacks == 0 and out.index.shape == (probs.shape[0], 16)


@pytest.mark.parametrize("embedding_dtype", DTYPES)
@pytest.mark.parametrize("logit_dtype", DTYPES)
def test_module_runs_for_every_dtype_combination(embedding_dtype: torch.dtype, logit_dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    z_weak = torch.randn(2, 8, 6, 6, generator=generator).to(embedding_dtype).requires_grad_()
    z_strong = torch.randn(2, 8, 6, 6, generator=generator).to(embedding_dtype)
    mask_logits = torch.randn(2, 5, 12, 12, generator=generator).to(logit_dtype)
    class_logits = torch.randn(2, 5, 4, generator=generator).to(logit_dtype)
    out = InstanceAwarePixelContrast(num_negatives=16)(z_weak, z_strong, mask_logits, class_logits, generator=generator)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.stats.fallbacks == 0
    assert out.loss.dtype == (torch.float64 if embedding_dtype == torch.float64 else torch.float32)
    assert z_weak.grad.dtype == embedding_dtype and torch.isfinite(z_weak.grad.float()).all()
    assert math.isfinite(out.stats.mean_score) and 0.0 < out.stats.acceptance <= 1.0


def test_module_with_float64_logits_matches_float32_logits_in_distribution_terms() -> None:
    generator = torch.Generator().manual_seed(1)
    z_weak = torch.randn(2, 8, 6, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    z_strong = torch.randn(2, 8, 6, 6, generator=generator, dtype=torch.float64)
    mask_logits = 0.03 * torch.randn(2, 5, 6, 6, generator=generator, dtype=torch.float64)
    class_logits = 0.03 * torch.randn(2, 5, 4, generator=generator, dtype=torch.float64)
    crit = InstanceAwarePixelContrast(num_negatives=32)
    wide = crit(z_weak, z_strong, mask_logits, class_logits)
    narrow = crit(z_weak, z_strong, mask_logits.float(), class_logits.float())
    assert wide.loss.dtype == torch.float64
    assert wide.stats.fallbacks == 0 and wide.stats.zero_pool_anchors == 0
    assert wide.stats.mean_score == pytest.approx(narrow.stats.mean_score, rel=1e-3)
