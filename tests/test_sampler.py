"""The sampler draws exactly from s / Σ s, never samples the anchor itself, and reports fallbacks."""

from __future__ import annotations

import math

import pytest
import torch
from frequency_checks import frequency_pvalue

from instcontrast.functional import SCORES, STRATEGIES, debias_score, fused_probability
from instcontrast.sampler import InstanceAwareSampler


def _small_pool(seed: int, strategy: str, logit_scale: float = 2.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mask_logits = logit_scale * torch.randn(1, 3, 3, 4, generator=generator)  # 12 pixels
    class_logits = logit_scale * torch.randn(1, 3, 4, generator=generator)
    return fused_probability(mask_logits, class_logits, strategy=strategy)[0]  # (12, E)


@pytest.mark.parametrize("multi_round", [False, True], ids=["sized-rounds", "forced-multi-round"])
@pytest.mark.parametrize("logit_scale", [0.03, 2.0], ids=["near-uniform", "confident"])
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_empirical_frequencies_match_brute_force_distribution(
    strategy: str, score: str, logit_scale: float, multi_round: bool
) -> None:
    if strategy == "class" and logit_scale < 0.1:
        # class-only scores are second order in the logits: at 0.03 they are ~1e-7, float32 rounding
        # noise (reported as a zero pool, see test_sampler_confidence.py); 0.1 gives ~1e-5
        logit_scale = 0.1
    probs = _small_pool(1, "fusion" if strategy == "uniform" else strategy, logit_scale)
    pool_size = probs.shape[0]
    anchors = torch.tensor([0, 5])
    draws = 6000
    # one proposal per missing slot and round forces many rounds, each serving fewer rows
    sampler = InstanceAwareSampler(
        num_negatives=draws, strategy=strategy, score=score, max_rounds=50, max_proposals_per_slot=1 if multi_round else 64
    )
    out = sampler(probs[anchors], probs, anchors, generator=torch.Generator().manual_seed(2))
    assert out.fallbacks == 0 and out.zero_pool_anchors == 0
    assert (out.rounds > 2) if multi_round else (out.rounds <= 3)
    for row, anchor in enumerate(anchors.tolist()):
        if strategy == "uniform":
            weights = torch.ones(pool_size, dtype=torch.float64)
        else:
            weights = debias_score(probs[anchor][None].double(), probs.double(), score)
        weights[anchor] = 0.0
        expected = weights / weights.sum() * draws
        observed = torch.bincount(out.index[row], minlength=pool_size).double()
        assert observed[anchor] == 0
        support = expected > 0
        assert observed[~support].sum() == 0
        assert frequency_pvalue(observed[support], expected[support]) > 1e-3, (strategy, score, observed, expected)


def test_sampling_is_reproducible_with_a_generator() -> None:
    probs = _small_pool(3, "fusion")
    sampler = InstanceAwareSampler(num_negatives=17)
    first = sampler(probs, probs, torch.arange(12), generator=torch.Generator().manual_seed(4))
    second = sampler(probs, probs, torch.arange(12), generator=torch.Generator().manual_seed(4))
    assert torch.equal(first.index, second.index)


def test_negatives_may_exceed_the_pool_size() -> None:
    probs = _small_pool(5, "fusion")
    out = InstanceAwareSampler(num_negatives=100)(probs[:2], probs, torch.arange(2))
    assert out.index.shape == (2, 100)
    assert out.index.min() >= 0 and out.index.max() < 12


def test_a_pool_with_all_zero_scores_falls_back_to_uniform_and_says_so() -> None:
    probs = torch.nn.functional.normalize(torch.ones(10, 4), dim=1)  # one instance everywhere: s == 0
    out = InstanceAwareSampler(num_negatives=8, max_rounds=3)(probs[:4], probs, torch.arange(4))
    assert out.zero_pool_anchors == 4
    assert out.fallbacks == 4 * 8
    assert out.fallback_anchors == 4
    assert math.isnan(out.min_expected_acceptance)  # known before drawing: no anchor is sampled from its envelope
    assert out.accepted >= 4 * 8  # drawn like strategy="uniform": shared proposals, thinned
    assert (out.index != torch.arange(4)[:, None]).all()  # the fallback still excludes the anchor


@pytest.mark.parametrize("case", ["uniform", "zero-pool", "fusion"])
def test_an_anchor_passed_several_times_never_draws_its_own_row(case: str) -> None:
    own = torch.tensor([0, 0, 0, 3, 1, 3, 0, 2, -1])  # repeated pool rows in one block of anchors
    generator = torch.Generator().manual_seed(0)
    if case == "uniform":
        out = InstanceAwareSampler(num_negatives=200, strategy="uniform")(None, None, own, pool_size=4, generator=generator)
    else:
        probs = torch.nn.functional.normalize(torch.ones(4, 3) if case == "zero-pool" else torch.rand(4, 3), dim=1)
        anchor_probs = probs[own.clamp_min(0)]
        out = InstanceAwareSampler(num_negatives=200, score="sqrt")(anchor_probs, probs, own, generator=generator)
    drew_own = (out.index == own[:, None]).sum(dim=1)  # (A,)
    assert drew_own.tolist() == [0] * own.numel()
    assert torch.bincount(out.index[own >= 0].reshape(-1), minlength=4).min() > 0  # the others are drawn


def test_anchor_outside_the_pool_can_sample_any_row() -> None:
    out = InstanceAwareSampler(num_negatives=2000, strategy="uniform")(None, None, torch.tensor([-1]), pool_size=12)
    assert torch.bincount(out.index[0], minlength=12).min() > 0


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError, match="num_negatives"):
        InstanceAwareSampler(num_negatives=0)
    with pytest.raises(ValueError, match="strategy"):
        InstanceAwareSampler(strategy="random")
    probs = _small_pool(7, "fusion")
    sampler = InstanceAwareSampler(num_negatives=3)
    with pytest.raises(ValueError, match="at least 2"):
        sampler(probs[:1], probs[:1], torch.tensor([0]))
    with pytest.raises(ValueError, match="pool_probs"):
        sampler(probs[:2], probs[:, :3], torch.arange(2))


@pytest.mark.parametrize("score", SCORES)
def test_anchors_read_from_the_pool_sample_like_anchors_passed_in(score: str) -> None:
    """``anchor_probs=None`` takes each anchor's vector from its pool row: same envelope, same draws."""
    probs = _small_pool(5, "fusion")  # (12, E)
    anchors = torch.tensor([7, 0, 3, 3, 11])
    sampler = InstanceAwareSampler(num_negatives=64, score=score)
    passed = sampler(probs[anchors], probs, anchors, generator=torch.Generator().manual_seed(1))
    read = sampler(None, probs, anchors, generator=torch.Generator().manual_seed(1))
    assert torch.equal(passed.index, read.index)
    assert read.mean_score == pytest.approx(passed.mean_score, rel=1e-12)
    with pytest.raises(ValueError, match="not in the pool"):
        sampler(None, probs, torch.tensor([0, -1]))
