"""Each function of instcontrast.functional against a case computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from instcontrast.functional import (
    debias_score,
    empirical_margin,
    false_negative_rate,
    fused_probability,
    pixel_hinge,
    pixel_info_nce,
)


def test_fused_probability_hand_computed() -> None:
    # one pixel, K = 2 queries, C = 1 foreground class (+ no-object)
    mask_logits = torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1)  # Pm = (3/4, 1/4)
    class_logits = torch.tensor([[[math.log(1.0), math.log(1.0)], [math.log(3.0), 0.0]]])  # Pc rows (1/2,1/2), (3/4,1/4)
    y = fused_probability(mask_logits, class_logits)
    fc = [0.75 * 0.5 + 0.25 * 0.75, 0.75 * 0.5 + 0.25 * 0.25]  # (0.5625, 0.4375)
    raw = torch.tensor([0.75, 0.25, *fc])
    assert y.shape == (1, 1, 4)
    torch.testing.assert_close(y[0, 0], raw / raw.norm())
    torch.testing.assert_close(fused_probability(mask_logits, class_logits, strategy="mask")[0, 0], torch.tensor([0.75, 0.25]) / math.hypot(0.75, 0.25))
    fc_t = torch.tensor(fc)
    torch.testing.assert_close(fused_probability(mask_logits, class_logits, strategy="class")[0, 0], fc_t / fc_t.norm())


def test_fused_probability_resizes_masks_to_the_feature_grid() -> None:
    mask_logits = torch.randn(2, 3, 16, 12)
    class_logits = torch.randn(2, 3, 5)
    y = fused_probability(mask_logits, class_logits, size=(4, 3))
    assert y.shape == (2, 12, 3 + 5)
    resized = torch.nn.functional.interpolate(mask_logits, size=(4, 3), mode="bilinear", align_corners=False)
    torch.testing.assert_close(y, fused_probability(resized, class_logits))


def test_debias_score_hand_computed() -> None:
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.6, 0.8])
    assert debias_score(a, b).item() == pytest.approx(0.4)
    assert debias_score(a, b, "squared").item() == pytest.approx(0.16)
    assert debias_score(a, b, "sqrt").item() == pytest.approx(math.sqrt(0.4))
    assert debias_score(a, a).item() == 0.0
    assert debias_score(a, torch.tensor([0.0, 1.0])).item() == 1.0


def test_pixel_info_nce_hand_computed() -> None:
    anchors = torch.tensor([[1.0, 0.0]])
    positives = torch.tensor([[2.0, 0.0]])  # normalized inside: cos+ = 1
    pool = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])  # cos- = 0 and -1
    index = torch.tensor([[0, 1, 1]])
    t = 0.5
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + math.exp(0.0) + 2 * math.exp(-1 / t)))
    for backend in ("reference", "chunked"):
        value = pixel_info_nce(anchors, positives, pool, index, temperature=t, backend=backend)
        assert value.item() == pytest.approx(expected, rel=1e-6)


def test_pixel_info_nce_equals_log_one_plus_r_when_all_similarities_equal() -> None:
    anchors = torch.ones(5, 3)
    index = torch.zeros(5, 7, dtype=torch.long)
    value = pixel_info_nce(anchors, anchors.clone(), torch.ones(4, 3), index, reduction="none")
    torch.testing.assert_close(value, torch.full((5,), math.log(8.0)))


def test_pixel_hinge_hand_computed() -> None:
    anchors = torch.tensor([[1.0, 0.0]])
    positives = torch.tensor([[1.0, 0.0]])  # cos+ = 1
    pool = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # cos- = 1, 0
    index = torch.tensor([[0, 1]])
    # (max(0, .2 - 1 + 1) + max(0, .2 - 1 + 0)) / 2 = 0.1
    assert pixel_hinge(anchors, positives, pool, index, margin=0.2).item() == pytest.approx(0.1)


def test_false_negative_rate_hand_computed() -> None:
    anchor_ids = torch.tensor([1, 2, -1])
    negative_ids = torch.tensor([[1, 3, -1], [2, 2, 5], [1, 1, 1]])
    # countable: row0 -> 2 (1 same), row1 -> 3 (2 same), row2 ignored -> 3/5
    assert false_negative_rate(anchor_ids, negative_ids).item() == pytest.approx(3 / 5)
    assert math.isnan(false_negative_rate(torch.tensor([-1]), torch.tensor([[1]])).item())


def test_empirical_margin_hand_computed() -> None:
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # cos+ = 1, 1/sqrt2
    pool = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    index = torch.tensor([[0, 1], [1, 1]])  # cos- = 0, -1, 0, 0
    expected = (1 + 1 / math.sqrt(2)) / 2 - (-1 / 4)
    assert empirical_margin(anchors, positives, pool, index).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_pixel_info_nce_gradcheck_float64(backend: str) -> None:
    anchors = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    positives = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    pool = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 5, (6, 3))
    assert torch.autograd.gradcheck(
        lambda a, p, m: pixel_info_nce(a, p, m, index, temperature=0.3, backend=backend), (anchors, positives, pool)
    )


def test_pixel_hinge_gradcheck_float64() -> None:
    anchors = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    positives = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    pool = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 5, (6, 3))
    # margin large enough that no hinge sits exactly at its kink
    assert torch.autograd.gradcheck(
        lambda a, p, m: pixel_hinge(a, p, m, index, margin=1.5, block_size=4), (anchors, positives, pool)
    )


def test_no_anchors_gives_zero_attached_to_graph() -> None:
    anchors = torch.zeros(0, 3, requires_grad=True)
    loss = pixel_info_nce(anchors, torch.zeros(0, 3), torch.randn(4, 3), torch.zeros(0, 5, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert anchors.grad is not None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: pixel_info_nce(torch.randn(3, 4), torch.randn(3, 5), torch.randn(2, 4), torch.zeros(3, 1, dtype=torch.long)), "positives"),
        (lambda: pixel_info_nce(torch.randn(3, 4), torch.randn(3, 4), torch.randn(2, 5), torch.zeros(3, 1, dtype=torch.long)), "pool"),
        (lambda: pixel_info_nce(torch.randn(3, 4), torch.randn(3, 4), torch.randn(2, 4), torch.zeros(2, 1, dtype=torch.long)), "negatives must have shape"),
        (lambda: pixel_info_nce(torch.randn(3, 4), torch.randn(3, 4), torch.randn(2, 4), torch.zeros(3, 1, dtype=torch.long), temperature=0.0), "temperature"),
        (lambda: fused_probability(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 1)), "no-object"),
        (lambda: fused_probability(torch.randn(1, 2, 4, 4), torch.randn(1, 3, 4)), "disagree"),
        (lambda: fused_probability(torch.randn(2, 4, 4), torch.randn(1, 2, 4)), "mask_logits"),
        (lambda: debias_score(torch.rand(3), torch.rand(4)), "disagree"),
        (lambda: debias_score(torch.rand(3), torch.rand(3), "cubic"), "score"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_pixel_info_nce_positive_is_the_strong_view_not_the_anchor() -> None:
    # non-unit, non-parallel vectors: cos+ = <(.6,.8), (0,1)> = 0.8, cos- = 0.6 and -0.8
    anchors = torch.tensor([[3.0, 4.0]])
    positives = torch.tensor([[0.0, 2.0]])
    pool = torch.tensor([[1.0, 0.0], [0.0, -3.0]])
    index = torch.tensor([[0, 1, 0]])
    t = 0.5
    expected = -math.log(math.exp(0.8 / t) / (math.exp(0.8 / t) + 2 * math.exp(0.6 / t) + math.exp(-0.8 / t)))
    for backend in ("reference", "chunked"):
        value = pixel_info_nce(anchors, positives, pool, index, temperature=t, backend=backend)
        assert value.item() == pytest.approx(expected, rel=1e-6)


def test_pixel_hinge_normalizes_the_positive() -> None:
    anchors = torch.tensor([[3.0, 4.0], [0.0, -2.0]])  # units (.6, .8), (0, -1)
    positives = torch.tensor([[0.0, 5.0], [4.0, -3.0]])  # units (0, 1), (.8, -.6): cos+ = .8, .6
    pool = torch.tensor([[1.0, 0.0], [-2.0, 0.0], [0.0, 7.0]])
    index = torch.tensor([[0, 1], [2, 0]])
    # anchor 0: cos- = .6, -.6 -> (max(0, .3-.8+.6) + max(0, .3-.8-.6)) / 2 = .05
    # anchor 1: cos- = -1, 0  -> (max(0, .3-.6-1) + max(0, .3-.6+0)) / 2 = 0
    per_anchor = pixel_hinge(anchors, positives, pool, index, margin=0.3, reduction="none")
    torch.testing.assert_close(per_anchor, torch.tensor([0.05, 0.0]))
    positives_far = torch.tensor([[0.0, 5.0], [-4.0, 3.0]])  # anchor 1: cos+ = -.6
    # anchor 1: (max(0, .3+.6-1) + max(0, .3+.6+0)) / 2 = .45
    per_anchor = pixel_hinge(anchors, positives_far, pool, index, margin=0.3, reduction="none")
    torch.testing.assert_close(per_anchor, torch.tensor([0.05, 0.45]))


def test_empirical_margin_on_candidate_blocks_averages_over_all_a_times_r_negatives(hand_blocks) -> None:
    blocks = hand_blocks  # three blocks, repeated candidates and columns, per-round segments (conftest)
    generator = torch.Generator().manual_seed(3)
    anchors = 3 * torch.randn(8, 4, generator=generator)
    positives = 0.5 * torch.randn(8, 4, generator=generator)
    pool = 2 * torch.randn(6, 4, generator=generator)
    index = blocks.to_index()  # (8, 3)
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)
    positive_cos = (unit(anchors) * unit(positives)).sum(-1)  # (8,)
    negative_cos = (unit(anchors)[:, None, :] * unit(pool)[index]).sum(-1)  # (8, 3)
    expected = positive_cos.mean() - negative_cos.mean()
    torch.testing.assert_close(empirical_margin(anchors, positives, pool, blocks), expected)
    torch.testing.assert_close(empirical_margin(anchors, positives, pool, index), expected)


def test_fused_probability_is_differentiable_and_equals_the_normalized_concatenation() -> None:
    generator = torch.Generator().manual_seed(0)
    mask_logits = torch.randn(2, 3, 4, 5, generator=generator, requires_grad=True)
    class_logits = torch.randn(2, 3, 6, generator=generator, requires_grad=True)
    fused = fused_probability(mask_logits, class_logits)  # (2, 20, 9)
    mask_probs = mask_logits.reshape(2, 3, -1).softmax(dim=1).transpose(1, 2)
    expected = torch.nn.functional.normalize(torch.cat([mask_probs, mask_probs @ class_logits.softmax(-1)], -1), dim=-1)
    torch.testing.assert_close(fused, expected)
    fused.square().sum().backward()  # the buffer is normalized in place only when no gradient is needed
    assert mask_logits.grad is not None and class_logits.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(fused_probability(mask_logits, class_logits), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_check_finite_accepts_finite_values_whose_sum_overflows_and_rejects_any_nan_or_inf(dtype) -> None:
    from instcontrast._checks import check_finite

    big = torch.full((64,), torch.finfo(dtype).max / 4, dtype=dtype)  # every entry finite, the sum is not
    assert not bool(torch.isfinite(big.sum()))
    check_finite("big", big)  # the entry-wise test decides
    for bad in (float("nan"), float("inf"), -float("inf")):
        value = torch.zeros(5, 3, dtype=dtype)
        value[4, 2] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            check_finite("value", value)
