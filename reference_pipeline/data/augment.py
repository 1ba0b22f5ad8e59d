"""Weak and strong views of one image, with the geometry needed to align them.

* **Weak view**: optional horizontal flip + resize of the whole image to the output size.
* **Strong view**: random resized crop + optional flip (geometry), then colour jitter, random
  grayscale and Gaussian blur (photometric), applied to the *same original image*.

Masks follow the geometry exactly (nearest-neighbour resampling); photometric operations touch
only the image. Each view records its geometry as a crop box ``(x0, y0, x1, y1)`` in normalized
original-image coordinates plus a flip flag, the convention of :mod:`instcontrast.views`, so a
batch collates to a :class:`instcontrast.views.ViewGeometry` and the strong view's features can be
warped onto the weak grid with :func:`instcontrast.views.align_views`::

    batch_w, batch_s = collate_views(weak_views), collate_views(strong_views)
    aligned, valid = align_views(z_strong, batch_s.geometry, batch_w.geometry, z_weak.shape[-2:])

Resampling conventions: crops are whole pixels, resizing maps pixel *centres* (``align_corners=False``;
nearest uses ``NEAREST_EXACT``, i.e. source index ``floor((i + 0.5) * scale)``), matching
:func:`torch.nn.functional.grid_sample` with ``align_corners=False`` used by ``align_views``.

Randomness comes from an explicit :class:`numpy.random.Generator`; derive one per sample (e.g.
:meth:`TwoViewTransform.rng_for`) so results do not depend on worker scheduling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode

from instcontrast.views import ViewGeometry

from .structures import InstanceSample

__all__ = [
    "StrongViewConfig",
    "TwoViewTransform",
    "View",
    "ViewBatch",
    "WeakViewConfig",
    "apply_geometry",
    "collate_views",
    "sample_crop",
    "strong_view",
    "weak_view",
]

_INTERPOLATION = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST_EXACT,
}


def _check_size(name: str, size: tuple[int, int]) -> None:
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{name} must be (height, width) with positive entries, got {size}")


def _check_prob(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


def _check_range(name: str, value: tuple[float, float], low: float = 0.0) -> None:
    if len(value) != 2 or value[0] < low or value[1] < value[0]:
        raise ValueError(f"{name} must be a range (low, high) with {low} <= low <= high, got {value}")


@dataclass(frozen=True)
class WeakViewConfig:
    """Weak view: optional horizontal flip + resize of the whole image.

    Attributes:
        output_size: ``(height, width)`` of the view.
        flip_prob: probability of a horizontal flip.
        interpolation: image resampling, ``"bilinear"``, ``"bicubic"`` or ``"nearest"``.

    Raises:
        ValueError: on a bad size, probability or interpolation name.
    """

    output_size: tuple[int, int] = (128, 128)
    flip_prob: float = 0.5
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        _check_size("output_size", self.output_size)
        _check_prob("flip_prob", self.flip_prob)
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {list(_INTERPOLATION)}, got {self.interpolation!r}")


@dataclass(frozen=True)
class StrongViewConfig:
    """Strong view: random resized crop + flip, colour jitter, grayscale, blur.

    Attributes:
        output_size: ``(height, width)`` of the view.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio (width / height), sampled log-uniformly.
        flip_prob: probability of a horizontal flip.
        jitter_prob: probability of applying colour jitter.
        brightness: brightness factor drawn from ``[1 - b, 1 + b]``.
        contrast: contrast factor drawn from ``[1 - c, 1 + c]``.
        saturation: saturation factor drawn from ``[1 - s, 1 + s]``.
        hue: hue shift drawn from ``[-h, h]`` (``h <= 0.5``).
        grayscale_prob: probability of converting to grayscale (3 channels kept).
        blur_prob: probability of a Gaussian blur.
        blur_sigma: range of the blur standard deviation in pixels of the view.
        interpolation: image resampling, ``"bilinear"``, ``"bicubic"`` or ``"nearest"``.

    Raises:
        ValueError: on an out-of-range value.
    """

    output_size: tuple[int, int] = (128, 128)
    scale: tuple[float, float] = (0.3, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        _check_size("output_size", self.output_size)
        _check_range("scale", self.scale)
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        _check_range("ratio", self.ratio)
        if self.ratio[0] <= 0:
            raise ValueError(f"ratio must be positive, got {self.ratio}")
        for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob"):
            _check_prob(name, getattr(self, name))
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        _check_range("blur_sigma", self.blur_sigma)
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {list(_INTERPOLATION)}, got {self.interpolation!r}")


@dataclass
class View:
    """One augmented view of a sample.

    Attributes:
        image: ``(3, h, w)`` float32 in ``[0, 1]``.
        masks: ``(M, h, w)`` bool, the instances still visible in the view.
        class_ids: ``(M,)`` int64.
        is_crowd: ``(M,)`` bool.
        instance_index: ``(M,)`` int64, index of each kept instance in the original sample (to
            match instances across views).
        box: ``(4,)`` float32 crop box ``(x0, y0, x1, y1)`` in normalized original coordinates.
        flip: whether the crop was flipped horizontally.
        image_id: id of the original image.
    """

    image: Tensor
    masks: Tensor
    class_ids: Tensor
    is_crowd: Tensor
    instance_index: Tensor
    box: Tensor
    flip: bool
    image_id: int


@dataclass
class ViewBatch:
    """A collated batch of views (instances stay per-image lists).

    Attributes:
        images: ``(B, 3, h, w)`` float32.
        geometry: boxes ``(B, 4)`` and flips ``(B,)`` for :func:`instcontrast.views.align_views`.
        masks: per image ``(M_b, h, w)`` bool.
        class_ids: per image ``(M_b,)`` int64.
        is_crowd: per image ``(M_b,)`` bool.
        instance_index: per image ``(M_b,)`` int64.
        image_ids: ``(B,)`` int64.
    """

    images: Tensor
    geometry: ViewGeometry
    masks: list[Tensor]
    class_ids: list[Tensor]
    is_crowd: list[Tensor]
    instance_index: list[Tensor]
    image_ids: Tensor


def sample_crop(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """Draw a random resized crop (the algorithm of ``torchvision.transforms.RandomResizedCrop``).

    Ten attempts draw an area fraction uniformly from ``scale`` and an aspect ratio log-uniformly
    from ``ratio``; if none fits, the largest centred crop with a clamped ratio is used.

    Args:
        rng: random generator.
        height: image height.
        width: image width.
        scale: area fraction range.
        ratio: aspect ratio (width / height) range.

    Returns:
        ``(top, left, crop_height, crop_width)`` in whole pixels.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_h, crop_w = height, int(round(height * ratio[1]))
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def apply_geometry(
    image: Tensor,
    masks: Tensor,
    crop: tuple[int, int, int, int],
    flip: bool,
    output_size: tuple[int, int],
    interpolation: str = "bilinear",
) -> tuple[Tensor, Tensor]:
    """Crop, resize and optionally flip an image and its masks consistently.

    Args:
        image: ``(3, H, W)`` float image.
        masks: ``(N, H, W)`` bool masks.
        crop: ``(top, left, crop_height, crop_width)`` in pixels of the original.
        flip: flip horizontally after resizing.
        output_size: ``(h, w)`` of the result.
        interpolation: image resampling (masks always use nearest, pixel-centre aligned).

    Returns:
        ``(3, h, w)`` image and ``(N, h, w)`` bool masks.

    Raises:
        ValueError: on bad shapes, a crop outside the image or an unknown interpolation.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    if masks.ndim != 3 or masks.shape[1:] != image.shape[1:]:
        raise ValueError(f"masks must be (N, {image.shape[1]}, {image.shape[2]}), got {tuple(masks.shape)}")
    if interpolation not in _INTERPOLATION:
        raise ValueError(f"interpolation must be one of {list(_INTERPOLATION)}, got {interpolation!r}")
    top, left, crop_h, crop_w = crop
    height, width = image.shape[1:]
    if top < 0 or left < 0 or crop_h < 1 or crop_w < 1 or top + crop_h > height or left + crop_w > width:
        raise ValueError(f"crop {crop} (top, left, h, w) lies outside the {height}x{width} image")
    size = [int(output_size[0]), int(output_size[1])]
    out_image = TF.resized_crop(
        image, top, left, crop_h, crop_w, size, interpolation=_INTERPOLATION[interpolation], antialias=True
    )  # (3, h, w)
    if masks.shape[0]:
        out_masks = TF.resized_crop(
            masks.to(torch.uint8), top, left, crop_h, crop_w, size, interpolation=InterpolationMode.NEAREST_EXACT
        ).bool()  # (N, h, w)
    else:
        out_masks = torch.zeros((0, *size), dtype=torch.bool)
    if flip:
        out_image = TF.horizontal_flip(out_image)
        out_masks = TF.horizontal_flip(out_masks)
    return out_image.clamp_(0.0, 1.0), out_masks


def _to_tensors(sample: InstanceSample) -> tuple[Tensor, Tensor]:
    image = torch.from_numpy(np.ascontiguousarray(sample.image)).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)
    masks = torch.from_numpy(np.ascontiguousarray(sample.masks))  # (N, H, W)
    return image, masks


def _make_view(
    sample: InstanceSample,
    image: Tensor,
    masks: Tensor,
    crop: tuple[int, int, int, int],
    flip: bool,
    keep_empty: bool,
) -> View:
    top, left, crop_h, crop_w = crop
    height, width = sample.height, sample.width
    box = torch.tensor(
        [left / width, top / height, (left + crop_w) / width, (top + crop_h) / height], dtype=torch.float32
    )  # (4,)
    index = torch.arange(masks.shape[0], dtype=torch.int64)  # (N,)
    if not keep_empty and masks.shape[0]:
        keep = masks.flatten(1).any(dim=1)  # (N,)
        masks, index = masks[keep], index[keep]
    return View(
        image=image,
        masks=masks,
        class_ids=torch.from_numpy(sample.class_ids)[index],
        is_crowd=torch.from_numpy(sample.is_crowd)[index],
        instance_index=index,
        box=box,
        flip=flip,
        image_id=int(sample.image_id),
    )


def weak_view(
    sample: InstanceSample, config: WeakViewConfig, rng: np.random.Generator, *, keep_empty: bool = False
) -> View:
    """The weak view: whole image, optional flip, resized to ``config.output_size``.

    Args:
        sample: the original image and instances.
        config: weak view parameters.
        rng: random generator (used for the flip only).
        keep_empty: keep instances whose mask vanished when resizing (default: drop them).

    Returns:
        The view; its box is ``(0, 0, 1, 1)``.
    """
    flip = bool(rng.random() < config.flip_prob)
    crop = (0, 0, sample.height, sample.width)
    image, masks = _to_tensors(sample)
    image, masks = apply_geometry(image, masks, crop, flip, config.output_size, config.interpolation)
    return _make_view(sample, image, masks, crop, flip, keep_empty)


def _photometric(image: Tensor, config: StrongViewConfig, rng: np.random.Generator) -> Tensor:
    """Colour jitter (random order), grayscale, blur on a ``(3, h, w)`` float image."""
    if rng.random() < config.jitter_prob:
        ops = [
            (TF.adjust_brightness, config.brightness, "factor"),
            (TF.adjust_contrast, config.contrast, "factor"),
            (TF.adjust_saturation, config.saturation, "factor"),
            (TF.adjust_hue, config.hue, "shift"),
        ]
        for op_index in rng.permutation(len(ops)):
            op, strength, kind = ops[int(op_index)]
            if strength <= 0:
                continue
            if kind == "factor":
                image = op(image, float(rng.uniform(1.0 - strength, 1.0 + strength)))
            else:
                image = op(image, float(rng.uniform(-strength, strength)))
    if rng.random() < config.grayscale_prob:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if rng.random() < config.blur_prob:
        sigma = float(rng.uniform(*config.blur_sigma))
        largest_odd = min(image.shape[1:]) - (1 - min(image.shape[1:]) % 2)  # kernel must fit the view
        kernel = min(2 * int(math.ceil(3.0 * sigma)) + 1, largest_odd)
        if kernel >= 3 and sigma > 0:
            image = TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
    return image.clamp(0.0, 1.0)


def strong_view(
    sample: InstanceSample, config: StrongViewConfig, rng: np.random.Generator, *, keep_empty: bool = False
) -> View:
    """The strong view: random resized crop + flip, then photometric distortions.

    Args:
        sample: the original image and instances.
        config: strong view parameters.
        rng: random generator.
        keep_empty: keep instances that fall outside the crop (default: drop them).

    Returns:
        The view with its crop box and flip flag.
    """
    crop = sample_crop(rng, sample.height, sample.width, config.scale, config.ratio)
    flip = bool(rng.random() < config.flip_prob)
    image, masks = _to_tensors(sample)
    image, masks = apply_geometry(image, masks, crop, flip, config.output_size, config.interpolation)
    image = _photometric(image, config, rng)
    return _make_view(sample, image, masks, crop, flip, keep_empty)


class TwoViewTransform:
    """Produce ``(weak, strong)`` views of the same sample.

    Args:
        weak: weak view parameters.
        strong: strong view parameters.
        keep_empty: keep instances that vanish from a view.
    """

    def __init__(
        self,
        weak: WeakViewConfig | None = None,
        strong: StrongViewConfig | None = None,
        *,
        keep_empty: bool = False,
    ) -> None:
        self.weak = weak or WeakViewConfig()
        self.strong = strong or StrongViewConfig()
        self.keep_empty = keep_empty

    @staticmethod
    def rng_for(seed: int, epoch: int, index: int) -> np.random.Generator:
        """A generator determined by ``(seed, epoch, index)`` (independent of worker order)."""
        return np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))

    def __call__(self, sample: InstanceSample, rng: np.random.Generator) -> tuple[View, View]:
        """Return the weak and the strong view of ``sample``."""
        weak = weak_view(sample, self.weak, rng, keep_empty=self.keep_empty)
        strong = strong_view(sample, self.strong, rng, keep_empty=self.keep_empty)
        return weak, strong


def collate_views(views: Sequence[View]) -> ViewBatch:
    """Stack views of equal size into a batch whose geometry is a :class:`~instcontrast.views.ViewGeometry`.

    Args:
        views: views with the same image size.

    Returns:
        The batch.

    Raises:
        ValueError: if ``views`` is empty or sizes differ.
    """
    if not views:
        raise ValueError("cannot collate an empty list of views")
    sizes = {tuple(v.image.shape) for v in views}
    if len(sizes) != 1:
        raise ValueError(f"all views must have the same image shape to collate, got {sorted(sizes)}")
    return ViewBatch(
        images=torch.stack([v.image for v in views]),  # (B, 3, h, w)
        geometry=ViewGeometry(
            boxes=torch.stack([v.box for v in views]),  # (B, 4)
            flips=torch.tensor([v.flip for v in views], dtype=torch.bool),  # (B,)
        ),
        masks=[v.masks for v in views],
        class_ids=[v.class_ids for v in views],
        is_crowd=[v.is_crowd for v in views],
        instance_index=[v.instance_index for v in views],
        image_ids=torch.tensor([v.image_id for v in views], dtype=torch.int64),  # (B,)
    )
