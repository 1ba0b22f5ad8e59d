"""Proposition 3.1: one SGD step on the loss, with the library's own negatives, raises the margin.

Embeddings are free parameters initialized as instance centroids plus noise, so same-instance
pixels look alike. The margin is measured on ground truth: mean positive cosine minus mean cosine
over all inter-instance pairs. The sampler's quality (hence p = 1 − FNR) is dialled with the
confidence of the predictions it sees.
"""

from __future__ import annotations

import torch

from instcontrast import InstanceAwarePixelContrast
from instcontrast.synthetic import noisy_predictions, touching_instances

QUERIES, CLASSES, DIM = 8, 3, 16


def _setup(seed: int = 0):
    # two large touching instances per image, so uniform sampling has a low p (about 0.75)
    ids, classes = touching_instances(batch=2, height=12, width=12, columns=2, rows=1, num_classes=CLASSES, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    centroids = torch.randn(2, 2, DIM, generator=generator)  # (B, instances, D)
    z = centroids[torch.arange(2)[:, None, None], ids]  # (B, H, W, D)
    z = (z + 0.3 * torch.randn(z.shape, generator=generator)).permute(0, 3, 1, 2).contiguous()  # (B, D, H, W)
    z_strong = z + 0.1 * torch.randn(z.shape, generator=generator)
    return ids, classes, z, z_strong


def _true_margin(z_weak: torch.Tensor, z_strong: torch.Tensor, ids: torch.Tensor) -> float:
    weak = torch.nn.functional.normalize(z_weak.permute(0, 2, 3, 1).reshape(-1, DIM), dim=1)
    strong = torch.nn.functional.normalize(z_strong.permute(0, 2, 3, 1).reshape(-1, DIM), dim=1)
    image = torch.arange(2).repeat_interleave(ids[0].numel())
    keys = image * 100 + ids.reshape(-1)
    positive = (weak * strong).sum(1).mean()
    cosine = weak @ strong.T
    inter = keys[:, None] != keys[None, :]
    return float(positive - cosine[inter].mean())


def _margin_rise(step: float, confidence: float, strategy: str = "fusion", draws: int = 4) -> tuple[float, float]:
    """(expected rise of the ground-truth margin after one SGD step of per-pixel size ``step``, p).

    The expectation is over the sampler's randomness: the mean over ``draws`` fixed seeds.
    """
    ids, classes, z_weak, z_strong = _setup()
    mask_logits, class_logits = noisy_predictions(ids, classes, QUERIES, CLASSES, confidence)
    before = _true_margin(z_weak, z_strong, ids)
    crit = InstanceAwarePixelContrast(temperature=0.2, num_negatives=64, strategy=strategy)
    total_rise = total_p = 0.0
    for seed in range(draws):
        weak = z_weak.clone().requires_grad_()
        out = crit(weak, z_strong, mask_logits, class_logits, instance_ids=ids, generator=torch.Generator().manual_seed(seed))
        out.loss.backward()
        with torch.no_grad():
            updated = weak - step * out.stats.num_anchors * weak.grad  # the mean loss -> per-pixel step
        total_rise += _true_margin(updated, z_strong, ids) - before
        total_p += 1.0 - out.stats.fnr
    return total_rise / draws, total_p / draws


def test_one_step_raises_the_margin_when_p_exceeds_one_half() -> None:
    rise, p = _margin_rise(step=0.02, confidence=4.0)
    assert p > 0.5
    assert rise > 0


def test_margin_rise_is_about_linear_in_the_step_size() -> None:
    rises = [_margin_rise(step=s, confidence=4.0)[0] for s in (0.005, 0.01, 0.02)]
    assert 0 < rises[0] < rises[1] < rises[2]
    for small, large in zip(rises, rises[1:]):
        assert 1.7 < large / small < 2.3, rises


def test_margin_rise_grows_with_p() -> None:
    results = [_margin_rise(step=0.02, confidence=0.0, strategy="uniform")]
    results += [_margin_rise(step=0.02, confidence=c) for c in (1.0, 2.0, 6.0)]
    rises, ps = zip(*results)
    assert 0.5 < ps[0] < 0.8 and ps[-1] > 0.99
    assert all(a < b for a, b in zip(ps, ps[1:])), ps
    assert all(a < b for a, b in zip(rises, rises[1:])), (rises, ps)
    assert rises[-1] > 2 * rises[0]  # near-perfect sampling at least doubles the uniform rise here
