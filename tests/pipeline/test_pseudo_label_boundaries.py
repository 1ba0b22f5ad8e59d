"""Boundaries of the pseudo-label rules: a value exactly at a threshold.

The spec (``PseudoLabelConfig``): a query is kept when its best foreground-class probability is
``>= score_threshold`` (a score exactly at the threshold is kept); a pixel is in a mask when
``sigmoid(logit) > mask_threshold`` (exactly at the threshold: out); an instance is kept when its
visible area is ``>= min_area`` and ``>= min_visible_fraction`` of its mask. The scores used here are
exact in float32 (softmax of equal logits: 1/4, 1/2), so "exactly at" really is equality.
"""

from __future__ import annotations

import math

import pytest
import torch

from reference_pipeline.pseudo_labels import PseudoLabelConfig, pseudo_label

IMAGE = (8, 8)
BIG = 20.0


def _one_query(class_logits: list[float], mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    cells = torch.ones(1, *IMAGE, dtype=torch.bool) if mask is None else mask[None]
    return torch.where(cells, BIG, -BIG), torch.tensor([class_logits])  # (1, 8, 8), (1, C+1)


@pytest.mark.parametrize(("logits", "score"), [([0.0, 0.0, 0.0, 0.0], 0.25), ([0.0, 0.0], 0.5)])
def test_a_score_exactly_at_the_threshold_is_kept(logits: list[float], score: float) -> None:
    mask_logits, class_logits = _one_query(logits)
    assert float(class_logits.softmax(-1)[0, 0]) == score  # exact
    config = PseudoLabelConfig(score_threshold=score, min_area=1, mask_stride=None)
    result = pseudo_label(mask_logits, class_logits, IMAGE, config)
    assert result.scores.tolist() == [score]


def test_a_score_just_below_the_threshold_is_dropped() -> None:
    mask_logits, class_logits = _one_query([0.0, 0.0])
    threshold = float(torch.nextafter(torch.tensor(0.5), torch.tensor(1.0)))  # next float32: scores are float32
    result = pseudo_label(mask_logits, class_logits, IMAGE, PseudoLabelConfig(score_threshold=threshold, min_area=1,
                                                                              mask_stride=None))
    assert result.num_instances == 0


def test_a_mask_logit_exactly_at_the_mask_threshold_is_outside_the_mask() -> None:
    mask_logits = torch.full((1, *IMAGE), BIG)
    mask_logits[0, :, :2] = 0.0  # sigmoid(0) = 0.5 = mask_threshold: not in the mask
    result = pseudo_label(mask_logits, torch.tensor([[BIG, 0.0]]), IMAGE,
                          PseudoLabelConfig(mask_threshold=0.5, min_area=1, mask_stride=None))
    (mask,) = result.targets().masks
    assert not bool(mask[:, :2].any()) and bool(mask[:, 2:].all())


def test_an_instance_of_exactly_min_area_is_kept_one_pixel_less_is_dropped() -> None:
    mask = torch.zeros(IMAGE, dtype=torch.bool)
    mask[:2, :3] = True  # 6 pixels
    mask_logits, class_logits = _one_query([BIG, 0.0], mask)
    for min_area, kept in ((6, 1), (7, 0)):
        config = PseudoLabelConfig(min_area=min_area, mask_stride=None)
        assert pseudo_label(mask_logits, class_logits, IMAGE, config).num_instances == kept, min_area


def test_an_instance_left_with_exactly_the_visible_fraction_is_kept() -> None:
    first = torch.zeros(IMAGE, dtype=torch.bool)
    first[:, :4] = True  # higher score: takes columns 0-3
    second = torch.zeros(IMAGE, dtype=torch.bool)
    second[:, 2:6] = True  # loses columns 2-3: exactly half of it stays visible
    mask_logits = torch.where(torch.stack([first, second]), BIG, -BIG)  # (2, 8, 8)
    class_logits = torch.tensor([[BIG, 0.0], [BIG - 1.0, 0.0]])  # (2, 2) query 0 scores higher
    for fraction, count in ((0.5, 2), (math.nextafter(0.5, 1.0), 1)):
        config = PseudoLabelConfig(min_area=1, min_visible_fraction=fraction, mask_stride=None)
        assert pseudo_label(mask_logits, class_logits, IMAGE, config).num_instances == count, fraction
