"""Hypothesis properties of the fused embedding, the score and the loss."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from instcontrast.functional import SCORES, debias_score, fused_probability, pixel_info_nce

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@st.composite
def predictions(draw):
    batch = draw(st.integers(1, 2))
    queries = draw(st.integers(1, 5))
    classes = draw(st.integers(2, 5))
    height, width = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    scale = draw(st.floats(0.0, 60.0))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    mask_logits = scale * torch.randn(batch, queries, height, width, generator=generator)
    class_logits = scale * torch.randn(batch, queries, classes, generator=generator)
    return mask_logits, class_logits


@SETTINGS
@given(predictions(), st.sampled_from(["fusion", "mask", "class"]))
def test_fused_probability_is_nonnegative_with_unit_norm(preds, strategy) -> None:
    y = fused_probability(*preds, strategy=strategy)
    assert (y >= 0).all()
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(y.shape[:2]))


@SETTINGS
@given(predictions(), st.sampled_from(SCORES))
def test_score_lies_in_unit_interval_and_vanishes_on_the_diagonal(preds, score) -> None:
    y = fused_probability(*preds).reshape(-1, fused_probability(*preds).shape[-1])  # (P, E)
    s = debias_score(y[:, None, :], y[None, :, :], score)  # (P, P)
    assert (s >= 0).all() and (s <= 1).all()
    assert s.diagonal().abs().max() <= 1e-3  # s(p, p) = 0 up to float32 rounding of ‖ŷ‖²


@SETTINGS
@given(predictions(), st.integers(0, 2**16))
def test_permuting_query_slots_leaves_the_score_unchanged(preds, seed) -> None:
    mask_logits, class_logits = preds
    permutation = torch.randperm(mask_logits.shape[1], generator=torch.Generator().manual_seed(seed))
    y = fused_probability(mask_logits, class_logits).flatten(0, 1)
    y_perm = fused_probability(mask_logits[:, permutation], class_logits[:, permutation]).flatten(0, 1)
    torch.testing.assert_close(debias_score(y[:, None], y[None]), debias_score(y_perm[:, None], y_perm[None]), atol=1e-5, rtol=0)


@SETTINGS
@given(
    st.integers(1, 6), st.integers(1, 6), st.integers(1, 9), st.integers(2, 8),
    st.floats(1e-3, 1e4), st.floats(0.01, 10.0), st.integers(0, 2**16),
)
def test_loss_is_finite_and_nonnegative_for_any_finite_input(anchors, dim, negatives, pool_size, magnitude, temperature, seed) -> None:
    generator = torch.Generator().manual_seed(seed)
    a = magnitude * torch.randn(anchors, dim, generator=generator)
    p = magnitude * torch.randn(anchors, dim, generator=generator)
    m = magnitude * torch.randn(pool_size, dim, generator=generator)
    index = torch.randint(0, pool_size, (anchors, negatives), generator=generator)
    for backend in ("reference", "chunked"):
        loss = pixel_info_nce(a, p, m, index, temperature=temperature, reduction="none", backend=backend)
        assert torch.isfinite(loss).all() and (loss >= 0).all()


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 7), st.integers(1, 300), st.integers(0, 2**16))
def test_loss_equals_log_one_plus_r_when_all_similarities_are_equal(anchors, dim, negatives, seed) -> None:
    direction = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    same = direction.expand(anchors, dim)
    loss = pixel_info_nce(same, same * 3.0, direction[None] * 0.5, torch.zeros(anchors, negatives, dtype=torch.long), backend="chunked")
    assert math.isclose(loss.item(), math.log(1 + negatives), rel_tol=1e-5)
