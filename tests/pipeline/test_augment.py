"""Weak / strong views: geometry is consistent with instcontrast.views.align_views.

The test image encodes each pixel's original coordinates (R = 4·x, G = 4·y), so after any view
and alignment the decoded coordinates say exactly which original pixel ended up where. Views use
nearest resampling (image and masks) so no colour is blended.

Tolerance: when the weak and strong views sample the original on grids that are not integer
multiples of each other, the nearest strong-view pixel to a weak pixel's scene point can come
from the neighbouring original pixel, so the random-view test allows one original pixel of
error. With integer scale factors (the exact test) the match is pixel-for-pixel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instcontrast.views import ViewGeometry, align_views
from reference_pipeline.data.augment import (
    StrongViewConfig,
    TwoViewTransform,
    View,
    WeakViewConfig,
    apply_geometry,
    collate_views,
    sample_crop,
    strong_view,
    weak_view,
)
from reference_pipeline.data.structures import InstanceSample

SIZE = 48


def _coordinate_sample(size: int = SIZE) -> InstanceSample:
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.stack([xx * 4, yy * 4, np.full_like(xx, 200)], axis=-1).astype(np.uint8)
    masks = np.stack([xx < 20, (yy >= 10) & (yy < 30) & (xx >= 25), (xx >= 44) & (yy >= 44)])
    return InstanceSample(image, masks, np.array([0, 1, 2]), np.zeros(3, bool), 7, "pattern.png")


def _decode(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, h, w) in [0, 1] -> (B, 2, h, w) original (x, y) pixel coordinates."""
    return torch.round(images[:, :2].double() * 255.0) / 4.0


def _geometric_only(output_size: tuple[int, int]) -> StrongViewConfig:
    return StrongViewConfig(
        output_size=output_size, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, interpolation="nearest"
    )


def test_exact_alignment_with_integer_scale() -> None:
    """Weak view = identity size, strong view = a 16x16 crop upsampled x2: pixel-for-pixel."""
    sample = _coordinate_sample(32)
    weak_cfg = WeakViewConfig((32, 32), flip_prob=0.5, interpolation="nearest")
    strong_cfg = StrongViewConfig(
        output_size=(32, 32),
        scale=(0.25, 0.25),
        ratio=(1.0, 1.0),
        jitter_prob=0.0,
        grayscale_prob=0.0,
        blur_prob=0.0,
        interpolation="nearest",
    )
    flip_states = set()
    for seed in range(8):
        rng = np.random.default_rng(seed)
        weak = weak_view(sample, weak_cfg, rng)
        strong = strong_view(sample, strong_cfg, rng)
        flip_states.add((weak.flip, strong.flip))
        x0, y0, x1, y1 = (strong.box * 32).round().long().tolist()
        assert (x1 - x0, y1 - y0) == (16, 16)
        weak_b, strong_b = collate_views([weak]), collate_views([strong])
        aligned, valid = align_views(
            strong_b.images.double(), strong_b.geometry, weak_b.geometry, (32, 32), mode="nearest"
        )
        expected_valid = torch.zeros(32, 32, dtype=torch.bool)
        expected_valid[y0:y1, x0:x1] = True
        if weak.flip:
            expected_valid = expected_valid.flip(-1)
        assert torch.equal(valid[0], expected_valid)
        decoded_aligned = _decode(aligned)[0][:, valid[0]]
        decoded_weak = _decode(weak_b.images)[0][:, valid[0]]
        assert torch.equal(decoded_aligned, decoded_weak)  # pixel-for-pixel
    assert len(flip_states) >= 3  # flipped and unflipped weak and strong views were exercised


def test_random_views_align_within_one_source_pixel() -> None:
    sample = _coordinate_sample()
    weak_cfg = WeakViewConfig(output_size=(40, 40), flip_prob=0.5, interpolation="nearest")
    strong_cfg = _geometric_only((40, 40))
    weak_views: list[View] = []
    strong_views: list[View] = []
    for seed in range(24):
        rng = np.random.default_rng(seed)
        weak_views.append(weak_view(sample, weak_cfg, rng))
        strong_views.append(strong_view(sample, strong_cfg, rng))
    weak, strong = collate_views(weak_views), collate_views(strong_views)
    assert weak.geometry.flips.any() and (~weak.geometry.flips).any()
    assert strong.geometry.flips.any() and (~strong.geometry.flips).any()
    aligned, valid = align_views(strong.images.double(), strong.geometry, weak.geometry, (40, 40), mode="nearest")
    assert valid.float().mean() > 0.2
    error = (_decode(aligned) - _decode(weak.images)).abs().amax(dim=1)  # (B, h, w), original pixels
    assert error[valid].max() <= 1.0
    assert (error[valid] == 0).float().mean() > 0.5  # most pixels match exactly


def test_masks_follow_the_image_geometry_exactly() -> None:
    sample = _coordinate_sample()
    for seed in range(10):
        rng = np.random.default_rng(seed)
        for view in (
            weak_view(sample, WeakViewConfig((40, 56), interpolation="nearest"), rng, keep_empty=True),
            strong_view(sample, _geometric_only((40, 40)), rng, keep_empty=True),
        ):
            coords = _decode(view.image[None])[0]  # (2, h, w)
            x, y = coords[0], coords[1]
            assert torch.equal(view.masks[0], x < 20)
            assert torch.equal(view.masks[1], (y >= 10) & (y < 30) & (x >= 25))
            assert torch.equal(view.masks[2], (x >= 44) & (y >= 44))


def test_photometric_ops_change_pixels_but_not_geometry() -> None:
    sample = _coordinate_sample()
    full = StrongViewConfig(output_size=(40, 40), jitter_prob=1.0, grayscale_prob=0.0, blur_prob=1.0)
    plain = StrongViewConfig(output_size=(40, 40), jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    a = strong_view(sample, full, np.random.default_rng(5))
    b = strong_view(sample, plain, np.random.default_rng(5))
    assert torch.equal(a.box, b.box) and a.flip == b.flip
    assert torch.equal(a.masks, b.masks)
    assert not torch.allclose(a.image, b.image)
    assert a.image.min() >= 0 and a.image.max() <= 1
    gray = strong_view(
        sample,
        StrongViewConfig(output_size=(40, 40), jitter_prob=0.0, grayscale_prob=1.0, blur_prob=0.0),
        np.random.default_rng(1),
    )
    assert torch.allclose(gray.image[0], gray.image[1]) and torch.allclose(gray.image[1], gray.image[2])


def test_empty_instances_are_dropped_with_an_index_map() -> None:
    sample = _coordinate_sample()
    image = torch.from_numpy(sample.image).permute(2, 0, 1).float() / 255.0
    masks = torch.from_numpy(sample.masks)
    _, cropped = apply_geometry(image, masks, (0, 0, 20, 20), False, (20, 20))
    assert cropped[0].any() and not cropped[1].any() and not cropped[2].any()

    rng = np.random.default_rng(0)
    cfg = StrongViewConfig(output_size=(24, 24), scale=(0.05, 0.06), jitter_prob=0.0, blur_prob=0.0)
    views = [strong_view(sample, cfg, rng) for _ in range(20)]
    for view in views:
        assert view.masks.shape[0] == view.class_ids.shape[0] == view.instance_index.shape[0]
        assert bool(view.masks.flatten(1).any(dim=1).all())
        np.testing.assert_array_equal(view.class_ids.numpy(), sample.class_ids[view.instance_index.numpy()])
    assert any(v.masks.shape[0] < 3 for v in views)


def test_two_view_transform_and_collate() -> None:
    sample = _coordinate_sample()
    transform = TwoViewTransform(WeakViewConfig((32, 32)), StrongViewConfig((32, 32)))
    weak1, strong1 = transform(sample, TwoViewTransform.rng_for(0, 1, 2))
    weak2, strong2 = transform(sample, TwoViewTransform.rng_for(0, 1, 2))
    assert torch.equal(weak1.image, weak2.image) and torch.equal(strong1.image, strong2.image)
    batch = collate_views([strong1, strong2])
    assert isinstance(batch.geometry, ViewGeometry)
    assert batch.images.shape == (2, 3, 32, 32)
    assert batch.geometry.boxes.shape == (2, 4) and batch.geometry.flips.shape == (2,)
    assert batch.image_ids.tolist() == [7, 7]
    assert torch.equal(collate_views([weak1]).geometry.boxes, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="same image shape"):
        collate_views([weak1, weak_view(sample, WeakViewConfig((16, 16)), np.random.default_rng(0))])
    with pytest.raises(ValueError, match="empty"):
        collate_views([])


def test_sample_crop_stays_inside_and_respects_scale() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = sample_crop(rng, 60, 80, (0.2, 0.6), (0.75, 1.333))
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
        assert 0.15 <= h * w / (60 * 80) <= 0.65


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="output_size"):
        WeakViewConfig(output_size=(0, 10))
    with pytest.raises(ValueError, match="interpolation"):
        WeakViewConfig(interpolation="area")
    with pytest.raises(ValueError, match="scale"):
        StrongViewConfig(scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="hue"):
        StrongViewConfig(hue=0.7)
    with pytest.raises(ValueError, match="flip_prob"):
        StrongViewConfig(flip_prob=2.0)
