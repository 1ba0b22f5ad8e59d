"""Assumption 3.1: instance-aware sampling picks negatives from other instances far more often.

Scenes are touching rectangular instances (a row of cars, a crowd); predictions are derived from
the ground truth plus Gaussian noise, so their confidence is a dial.
"""

from __future__ import annotations

import torch

from instcontrast import InstanceAwarePixelContrast
from instcontrast.synthetic import noisy_predictions, touching_instances

QUERIES, CLASSES = 10, 3


def _fnr(strategy: str, instance_ids, instance_class, confidence: float, seed: int = 0) -> float:
    mask_logits, class_logits = noisy_predictions(instance_ids, instance_class, QUERIES, CLASSES, confidence, seed=seed)
    batch, height, width = instance_ids.shape
    z = torch.randn(batch, 8, height, width)
    crit = InstanceAwarePixelContrast(num_negatives=64, strategy=strategy, compute_stats=False)
    out = crit(z, z, mask_logits, class_logits, instance_ids=instance_ids, generator=torch.Generator().manual_seed(seed))
    # near-identical predictions make scores tiny; a handful of fallbacks is reported, never hidden
    assert out.stats.fallbacks <= 0.01 * out.stats.num_anchors * 64
    return out.stats.fnr


def test_fusion_has_a_lower_false_negative_rate_than_uniform() -> None:
    ids, classes = touching_instances(batch=2, height=16, width=16, columns=2, rows=2, num_classes=CLASSES)
    uniform = _fnr("uniform", ids, classes, confidence=4.0)
    fusion = _fnr("fusion", ids, classes, confidence=4.0)
    assert fusion < 0.5 * uniform, (fusion, uniform)
    assert 1 - fusion > 0.5  # the assumption's p > 0.5 holds


def test_mask_beats_class_when_touching_instances_share_a_class() -> None:
    ids, classes = touching_instances(batch=2, height=16, width=16, columns=3, rows=2, same_class=True)
    mask = _fnr("mask", ids, classes, confidence=4.0)
    by_class = _fnr("class", ids, classes, confidence=4.0)
    # the class distribution cannot tell same-class instances apart; the mask distribution can
    assert mask < 0.5 * by_class, (mask, by_class)


def test_fusion_false_negative_rate_falls_as_predictions_become_confident() -> None:
    ids, classes = touching_instances(batch=2, height=16, width=16, columns=3, rows=2, num_classes=CLASSES)
    rates = [_fnr("fusion", ids, classes, confidence=c) for c in (0.0, 1.0, 2.0, 4.0, 8.0)]
    assert all(later < earlier for earlier, later in zip(rates, rates[1:])), rates
    assert rates[-1] < 0.05
