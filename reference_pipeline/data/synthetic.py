"""The embedded default dataset: procedurally generated street-like instance-segmentation scenes.

Nothing can be downloaded, so the pipeline ships its own data. Each scene has background "stuff"
(sky, a skyline of buildings, a road) with texture, and instances of 6 "thing" classes
(:data:`THING_CLASSES`) whose colours and sizes overlap across classes, so that neither colour
nor size identifies a class; only shape does. Every scene contains *groups* of same-class
instances placed in rows or clusters that touch and occlude each other (rows of cars, groups of
people), the case an instance-aware contrastive loss exists for: pixels of two touching cars have
the same class but belong to different instances.

Two domains:

* ``source`` — broad, clean appearance; used to pretrain a stand-in "foundation" teacher.
* ``target`` — shifted appearance: a colour cast, haze, blur, sensor noise, different background
  textures (brick walls, speckled asphalt, grass), desaturated instance colours, smaller and more
  numerous instances. A model trained on ``source`` is useful but imperfect on ``target``.

Splits (:data:`SPLITS`): ``source_train`` (source), ``target_labeled`` (the labeled pool),
``target_unlabeled`` and ``target_val`` (target). The unlabeled split is written *with* its
annotations so that diagnostics (false-negative rate) can use ground truth; training code must
not read them as labels.

Every image is generated from its own :class:`numpy.random.Generator` seeded from
``(seed, domain, split, index)``, so generation is deterministic, parallel-safe and
order-independent. The dataset is written in COCO format (PNG images + instances JSON with
compressed RLE masks) and read back with :class:`~reference_pipeline.data.coco.CocoInstanceDataset`,
the same reader used for users' own data. Layout::

    <root>/manifest.json                           written last; holds the config hash
    <root>/annotations/instances_<split>.json
    <root>/images/<split>/<index:06d>.png
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from ..errors import UserError
from .coco import CocoInstanceDataset, encode_mask, write_coco_json
from .structures import InstanceSample

__all__ = [
    "GENERATOR_VERSION",
    "SPLITS",
    "THING_CLASSES",
    "SyntheticConfig",
    "generate_dataset",
    "load_synthetic_split",
    "read_manifest",
    "render_scene",
    "synthetic_sample",
    "touching_same_class_pairs",
]

logger = logging.getLogger(__name__)

#: Names of the thing classes, in contiguous index order.
THING_CLASSES: tuple[str, ...] = ("car", "person", "truck", "bicycle", "sign", "bush")

#: Split name -> domain.
SPLITS: dict[str, str] = {
    "source_train": "source",
    "target_labeled": "target",
    "target_unlabeled": "target",
    "target_val": "target",
}

#: Bumped whenever the rendering changes, so cached datasets are regenerated.
GENERATOR_VERSION = 3

_DOMAIN_CODE = {"source": 0, "target": 1}
_SPLIT_CODE = {"source_train": 1, "target_labeled": 2, "target_unlabeled": 3, "target_val": 4}
_ID_STRIDE = 1_000_000  # image_id = split code * stride + index  (unique across splits)

# Object height range (pixels at a 128-pixel-high image, nearest depth) per class.
_BASE_HEIGHT = {
    "car": (15.0, 24.0),
    "person": (19.0, 30.0),
    "truck": (21.0, 32.0),
    "bicycle": (12.0, 19.0),
    "sign": (20.0, 32.0),
    "bush": (12.0, 21.0),
}
# Centre of each class's hue prior; a spread of +-0.3 makes the priors overlap heavily.
_HUE_CENTRE = {"car": 0.0, "person": 0.6, "truck": 0.3, "bicycle": 0.8, "sign": 0.12, "bush": 0.35}
# Classes that form touching groups (rows / clusters), with their preferred layout.
_GROUP_LAYOUT = {"car": "row", "person": "cluster", "truck": "row", "bicycle": "row", "bush": "cluster", "sign": "row"}


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic dataset (all sizes are image counts).

    Attributes:
        image_size: ``(height, width)`` of every image.
        source_train: images in the ``source_train`` split.
        target_labeled: images in the ``target_labeled`` pool.
        target_unlabeled: images in the ``target_unlabeled`` split.
        target_val: images in the ``target_val`` split.
        seed: global seed.
        groups_per_image: inclusive range of touching same-class groups per image (per domain:
            ``source`` uses it as is, ``target`` adds one).
        group_size: inclusive range of instances per group.
        singletons_per_image: inclusive range of isolated instances per image.
        min_visible_area: instances with fewer visible pixels (after occlusion) are removed from
            the scene (not just from the labels), scaled by ``image area / 128²``.
        min_visible_fraction: instances with a smaller visible fraction of their full shape are
            removed from the scene.
        object_scale: multiplies every object's size (both domains keep their relative scale). Larger objects
            raise the AP ceiling that stride-4 masks allow at a given image size
            (:func:`~reference_pipeline.evaluate.resolution_ceiling`).

    Raises:
        ValueError: on non-positive sizes, negative counts, or inverted ranges.
    """

    image_size: tuple[int, int] = (128, 128)
    source_train: int = 400
    target_labeled: int = 300
    target_unlabeled: int = 2000
    target_val: int = 300
    seed: int = 0
    groups_per_image: tuple[int, int] = (1, 3)
    group_size: tuple[int, int] = (2, 4)
    singletons_per_image: tuple[int, int] = (1, 4)
    min_visible_area: int = 12
    min_visible_fraction: float = 0.2
    object_scale: float = 1.0

    def __post_init__(self) -> None:
        if len(self.image_size) != 2 or min(self.image_size) < 32:
            raise ValueError(f"image_size must be (height, width) with both >= 32, got {self.image_size}")
        for name in ("source_train", "target_labeled", "target_unlabeled", "target_val"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0 or value >= _ID_STRIDE:
                raise ValueError(f"{name} must be an int in [0, {_ID_STRIDE}), got {value!r}")
        for name in ("groups_per_image", "group_size", "singletons_per_image"):
            low, high = getattr(self, name)
            if low < 0 or high < low:
                raise ValueError(
                    f"{name} must be an inclusive range (low, high) with 0 <= low <= high, got {(low, high)}"
                )
        if self.group_size[0] < 2:
            raise ValueError(f"group_size must start at >= 2 (a group touches), got {self.group_size}")
        if self.min_visible_area < 1 or not 0.0 <= self.min_visible_fraction < 1.0:
            raise ValueError("min_visible_area must be >= 1 and min_visible_fraction in [0, 1)")
        if not 0.25 <= float(self.object_scale) <= 4.0:
            raise ValueError(f"object_scale must be in [0.25, 4], got {self.object_scale!r}")

    def split_sizes(self) -> dict[str, int]:
        """Number of images of each split, in :data:`SPLITS` order."""
        return {name: int(getattr(self, name)) for name in SPLITS}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SyntheticConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: on unknown keys.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown SyntheticConfig keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def config_hash(self) -> str:
        """SHA-256 of the config and :data:`GENERATOR_VERSION` (identifies a generated dataset)."""
        payload = json.dumps({"config": self.to_dict(), "version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------- appearance helpers
@dataclass(frozen=True)
class _DomainStyle:
    scale: float
    extra_groups: int
    saturation: tuple[float, float]
    value: tuple[float, float]
    outline_prob: float
    noise_sigma: tuple[float, float]
    blur_sigma: tuple[float, float]
    haze: tuple[float, float]
    cast: tuple[float, float, float]
    textures: str
    colour_jitter: float = 0.08


_STYLES = {
    "source": _DomainStyle(  # broad, like a foundation model's pretraining data: the target's shift is narrower
        scale=1.0,
        extra_groups=0,
        saturation=(0.2, 0.95),
        value=(0.3, 0.95),
        outline_prob=0.5,
        noise_sigma=(0.0, 6.0),
        blur_sigma=(0.0, 0.8),
        haze=(0.0, 0.15),
        cast=(1.0, 1.0, 1.0),
        textures="clean",
    ),
    "target": _DomainStyle(
        scale=0.8,
        extra_groups=1,
        saturation=(0.2, 0.7),
        value=(0.3, 0.85),
        outline_prob=0.3,
        noise_sigma=(2.0, 6.0),
        blur_sigma=(0.3, 0.8),
        haze=(0.05, 0.15),
        cast=(1.12, 1.0, 0.82),
        textures="gritty",
    ),
}


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (all in [0, 1]) to RGB float32 in [0, 1]."""
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1], ``shape`` (H, W), correlation length ``cell`` pixels."""
    height, width = shape
    coarse = rng.standard_normal((height // cell + 2, width // cell + 2), dtype=np.float32)
    upsampled = Image.fromarray(coarse, mode="F").resize(
        (coarse.shape[1] * cell, coarse.shape[0] * cell), Image.BILINEAR
    )
    fine = np.asarray(upsampled)[:height, :width]  # (H, W)
    return np.clip(fine, -2.5, 2.5) / 2.5


def _instance_colour(rng: np.random.Generator, cls: str, style: _DomainStyle) -> np.ndarray:
    hue = (_HUE_CENTRE[cls] + rng.uniform(-0.3, 0.3)) % 1.0
    return _hsv_to_rgb(hue, rng.uniform(*style.saturation), rng.uniform(*style.value))


# ---------------------------------------------------------------------------- shapes
# Each shape function returns (mask (h, w) bool, shade (h, w) float32 multiplier) for an object
# whose bounding box is h pixels high; the width is chosen by the shape.


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as broadcastable ``(h, 1)`` and ``(1, w)`` float32 arrays."""
    yy = np.arange(height, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(width, dtype=np.float32)[None, :] + 0.5
    return yy, xx


def _segment_distance(yy: np.ndarray, xx: np.ndarray, p: tuple[float, float], q: tuple[float, float]) -> np.ndarray:
    """Distance of every pixel centre to the segment p-q (points are (x, y))."""
    px, py = p
    dx, dy = q[0] - px, q[1] - py
    length2 = max(dx * dx + dy * dy, 1e-6)
    t = np.clip(((xx - px) * dx + (yy - py) * dy) / length2, 0.0, 1.0)
    return np.hypot(xx - (px + t * dx), yy - (py + t * dy))


def _shape_car(rng: np.random.Generator, h: int) -> tuple[np.ndarray, np.ndarray]:
    w = max(int(round(h * rng.uniform(1.6, 2.3))), 6)
    yy, xx = _grid(h, w)
    u, v = xx / w, yy / h
    body = (np.abs((u - 0.5) / 0.49) ** 4 + np.abs((v - 0.62) / 0.25) ** 4) <= 1.0
    offset = rng.uniform(-0.06, 0.06)
    half = 0.2 + 0.16 * (v - 0.08) / 0.37
    cabin = (v >= 0.08) & (v <= 0.47) & (np.abs(u - 0.5 - offset) <= half)
    radius = 0.17 * h
    wheel = np.zeros_like(body)
    for cu in (0.22, 0.78):
        wheel |= np.hypot(xx - cu * w, yy - 0.84 * h) <= radius
    mask = body | cabin | wheel
    shade = np.ones((h, w), dtype=np.float32)
    window = cabin & (v >= 0.14) & (np.abs(u - 0.5 - offset) <= half - 0.05)
    shade[window] = 0.5
    shade[wheel] = 0.18
    shade *= 1.08 - 0.2 * v  # light from above
    return mask, shade


def _shape_truck(rng: np.random.Generator, h: int) -> tuple[np.ndarray, np.ndarray]:
    w = max(int(round(h * rng.uniform(1.3, 1.9))), 6)
    yy, xx = _grid(h, w)
    u, v = xx / w, yy / h
    split = rng.uniform(0.62, 0.72)
    cargo = (u <= split) & (v <= 0.84)
    cab_top = 0.3 + 0.18 * np.clip((u - split) / (1 - split), 0, 1)
    cab = (u > split) & (u <= 0.99) & (v >= cab_top) & (v <= 0.84)
    radius = 0.15 * h
    wheel = np.zeros_like(cargo)
    for cu in (0.16, 0.45, 0.84):
        wheel |= np.hypot(xx - cu * w, yy - 0.86 * h) <= radius
    mask = cargo | cab | wheel
    shade = np.ones((h, w), dtype=np.float32)
    shade[cargo] = 1.06
    shade[cargo & (np.abs(v - 0.42) < 0.03)] = 0.8  # a stripe on the box
    shade[cab & (v < 0.55) & (v >= cab_top + 0.05) & (u < 0.95)] = 0.5  # cab window
    shade[wheel] = 0.18
    if rng.random() < 0.5:
        mask, shade = mask[:, ::-1], shade[:, ::-1]
    return np.ascontiguousarray(mask), np.ascontiguousarray(shade)


def _shape_person(rng: np.random.Generator, h: int) -> tuple[np.ndarray, np.ndarray]:
    w = max(int(round(h * rng.uniform(0.36, 0.5))), 4)
    yy, xx = _grid(h, w)
    u, v = xx / w, yy / h
    head = np.hypot(xx - 0.5 * w, yy - 0.1 * h) <= 0.1 * h
    torso = (np.abs((u - 0.5) / 0.34) ** 4 + np.abs((v - 0.39) / 0.2) ** 4) <= 1.0
    stride = rng.uniform(0.0, 0.18)
    legs = np.zeros_like(head)
    thickness = max(0.09 * h, 0.9)
    for side in (-1.0, 1.0):
        hip = (w * (0.5 + side * 0.13), 0.56 * h)
        foot = (w * (0.5 + side * (0.13 + stride)), 0.99 * h)
        legs |= _segment_distance(yy, xx, hip, foot) <= thickness * 0.6
    arms = np.zeros_like(head)
    for side in (-1.0, 1.0):
        shoulder = (w * (0.5 + side * 0.3), 0.24 * h)
        hand = (w * (0.5 + side * rng.uniform(0.32, 0.48)), 0.55 * h)
        arms |= _segment_distance(yy, xx, shoulder, hand) <= thickness * 0.45
    mask = head | torso | legs | arms
    shade = np.ones((h, w), dtype=np.float32)
    shade[legs & ~torso] = 0.55
    shade[head] = 1.25
    return mask, shade


def _shape_bicycle(rng: np.random.Generator, h: int) -> tuple[np.ndarray, np.ndarray]:
    w = max(int(round(h * rng.uniform(1.45, 1.8))), 6)
    yy, xx = _grid(h, w)
    radius = 0.3 * h
    thickness = max(0.09 * h, 0.85)
    rear = (radius + 0.5, h - radius - 0.5)
    front = (w - radius - 0.5, h - radius - 0.5)
    wheels = np.zeros((h, w), dtype=bool)
    for cx, cy in (rear, front):
        wheels |= np.abs(np.hypot(xx - cx, yy - cy) - radius * 0.85) <= thickness
    bracket = (0.46 * w, h - radius - 0.5)
    seat = (0.38 * w, 0.3 * h)
    handle = (0.72 * w, 0.18 * h)
    frame = np.zeros_like(wheels)
    for p, q in ((rear, bracket), (bracket, seat), (seat, rear), (bracket, handle), (seat, handle), (handle, front)):
        frame |= _segment_distance(yy, xx, p, q) <= thickness * 0.8
    frame |= _segment_distance(yy, xx, (seat[0] - 0.08 * w, seat[1]), (seat[0] + 0.06 * w, seat[1])) <= thickness
    mask = wheels | frame
    shade = np.ones((h, w), dtype=np.float32)
    shade[wheels & ~frame] = 0.25
    if rng.random() < 0.5:
        mask, shade = mask[:, ::-1], shade[:, ::-1]
    return np.ascontiguousarray(mask), np.ascontiguousarray(shade)


def _shape_sign(rng: np.random.Generator, h: int) -> tuple[np.ndarray, np.ndarray]:
    w = max(int(round(h * rng.uniform(0.45, 0.7))), 5)
    yy, xx = _grid(h, w)
    u, v = xx / w, yy / h
    pole = (np.abs(xx - 0.5 * w) <= max(0.07 * w, 0.75)) & (v >= 0.3)
    kind = int(rng.integers(3))
    plate_h = 0.42
    if kind == 0:  # disk
        plate = np.hypot((u - 0.5) / 0.5, (v - plate_h / 2) / (plate_h / 2)) <= 1.0
    elif kind == 1:  # triangle
        plate = (v <= plate_h) & (np.abs(u - 0.5) <= 0.5 * v / plate_h)
    else:  # square
        plate = (v <= plate_h) & (np.abs(u - 0.5) <= 0.48)
    mask = pole | plate
    shade = np.ones((h, w), dtype=np.float32)
    shade[pole & ~plate] = 0.55
    symbol = plate & (np.abs(u - 0.5) < 0.12) & (np.abs(v - plate_h * 0.55) < 0.08)
    shade[symbol] = 0.35
    return mask, shade


def _shape_bush(rng: np.random.Generator, h: int) -> tuple[np.ndarray, np.ndarray]:
    w = max(int(round(h * rng.uniform(1.0, 1.6))), 5)
    yy, xx = _grid(h, w)
    mask = np.zeros((h, w), dtype=bool)
    for _ in range(int(rng.integers(4, 8))):
        r = rng.uniform(0.22, 0.38) * h
        cx = rng.uniform(r, max(w - r, r + 1e-3))
        cy = rng.uniform(r, max(h - r, r + 1e-3))
        mask |= np.hypot(xx - cx, yy - cy) <= r
    mask |= (np.abs(xx - 0.5 * w) <= 0.38 * w) & (yy >= 0.55 * h)  # a solid base on the ground
    speckle = rng.uniform(0.75, 1.15, size=(h, w)).astype(np.float32)
    shade = ndimage.uniform_filter(speckle, size=2)
    return mask, shade


_SHAPES: dict[str, Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]] = {
    "car": _shape_car,
    "person": _shape_person,
    "truck": _shape_truck,
    "bicycle": _shape_bicycle,
    "sign": _shape_sign,
    "bush": _shape_bush,
}


# ---------------------------------------------------------------------------- scene assembly
@dataclass
class _Thing:
    class_id: int
    top: int
    left: int
    mask: np.ndarray  # (h, w) bool, full (unoccluded) shape
    shade: np.ndarray  # (h, w) float32
    colour: np.ndarray  # (3,) float32
    depth: float  # painter's order key: larger = closer = drawn later


def _clip_box(thing: _Thing, height: int, width: int) -> tuple[slice, slice, slice, slice] | None:
    """Image slices and the matching slices of the thing's local arrays, or None if off-image."""
    h, w = thing.mask.shape
    y0, x0 = max(thing.top, 0), max(thing.left, 0)
    y1, x1 = min(thing.top + h, height), min(thing.left + w, width)
    if y0 >= y1 or x0 >= x1:
        return None
    return (
        slice(y0, y1),
        slice(x0, x1),
        slice(y0 - thing.top, y1 - thing.top),
        slice(x0 - thing.left, x1 - thing.left),
    )


def _paint_ids(things: Sequence[_Thing], height: int, width: int) -> np.ndarray:
    """Instance index map (-1 = background) with later things occluding earlier ones."""
    ids = np.full((height, width), -1, dtype=np.int32)  # (H, W)
    for index, thing in enumerate(things):
        box = _clip_box(thing, height, width)
        if box is None:
            continue
        ys, xs, ly, lx = box
        region = ids[ys, xs]
        region[thing.mask[ly, lx]] = index
    return ids


def _place_things(
    rng: np.random.Generator, config: SyntheticConfig, style: _DomainStyle, horizon: float
) -> list[_Thing]:
    height, width = config.image_size
    size_scale = height / 128.0 * style.scale * config.object_scale
    ground_top = horizon * height
    things: list[_Thing] = []

    def make(cls: str, bottom: float, centre_x: float, colour: np.ndarray, base_height: float) -> _Thing:
        depth_t = np.clip((bottom - ground_top) / max(height - ground_top, 1.0), 0.0, 1.2)
        perspective = 0.6 + 0.55 * depth_t
        obj_h = max(int(round(base_height * perspective * size_scale)), 6)
        mask, shade = _SHAPES[cls](rng, obj_h)
        h, w = mask.shape
        return _Thing(
            class_id=THING_CLASSES.index(cls),
            top=int(round(bottom)) - h,
            left=int(round(centre_x - w / 2)),
            mask=mask,
            shade=shade,
            colour=colour,
            depth=float(bottom) + rng.uniform(-0.4, 0.4),
        )

    def sample_bottom() -> float:
        return float(rng.uniform(ground_top + 0.12 * (height - ground_top), height * 1.03))

    n_groups = int(rng.integers(config.groups_per_image[0], config.groups_per_image[1] + 1)) + style.extra_groups
    for _ in range(n_groups):
        cls = THING_CLASSES[int(rng.integers(len(THING_CLASSES)))]
        count = int(rng.integers(config.group_size[0], config.group_size[1] + 1))
        group_colour = _instance_colour(rng, cls, style)
        base_height = rng.uniform(*_BASE_HEIGHT[cls])
        bottom = sample_bottom()
        direction = 1.0 if rng.random() < 0.5 else -1.0
        members: list[_Thing] = []
        for member in range(count):
            if rng.random() < 0.5:  # similar-looking neighbours: the hard case
                colour = np.clip(group_colour + rng.normal(0.0, style.colour_jitter, 3), 0.0, 1.0).astype(np.float32)
            else:
                colour = _instance_colour(rng, cls, style)
            member_height = base_height * rng.uniform(0.9, 1.1)
            if _GROUP_LAYOUT[cls] == "row" or member == 0:
                member_bottom = bottom + rng.uniform(-2.0, 2.0) * size_scale
                if member == 0:
                    centre = rng.uniform(0.1, 0.9) * width
                    members.append(make(cls, member_bottom, centre, colour, member_height))
                    continue
                previous = members[-1]
                thing = make(cls, member_bottom, 0.0, colour, member_height)
                overlap = rng.uniform(0.12, 0.35)
                step = (previous.mask.shape[1] + thing.mask.shape[1]) / 2 * (1 - overlap)
                centre = previous.left + previous.mask.shape[1] / 2 + direction * step
                thing.left = int(round(centre - thing.mask.shape[1] / 2))
                members.append(thing)
            else:  # cluster around an earlier member, overlapping it
                anchor = members[int(rng.integers(len(members)))]
                ah, aw = anchor.mask.shape
                member_bottom = anchor.top + ah + rng.uniform(-0.15, 0.25) * ah
                side = 1.0 if rng.random() < 0.5 else -1.0
                centre = anchor.left + aw / 2 + side * aw * rng.uniform(0.45, 0.8)
                members.append(make(cls, member_bottom, centre, colour, member_height))
        things.extend(members)

    n_single = int(rng.integers(config.singletons_per_image[0], config.singletons_per_image[1] + 1))
    for _ in range(n_single):
        cls = THING_CLASSES[int(rng.integers(len(THING_CLASSES)))]
        things.append(
            make(
                cls,
                sample_bottom(),
                rng.uniform(0.05, 0.95) * width,
                _instance_colour(rng, cls, style),
                rng.uniform(*_BASE_HEIGHT[cls]),
            )
        )
    things.sort(key=lambda t: t.depth)
    return things


def _background(rng: np.random.Generator, config: SyntheticConfig, style: _DomainStyle, horizon: float) -> np.ndarray:
    height, width = config.image_size
    image = np.zeros((height, width, 3), dtype=np.float32)
    rows = np.arange(height, dtype=np.float32)[:, None, None] / height  # (H, 1, 1)
    gritty = style.textures == "gritty"
    # sky
    if gritty:
        top, bottom = (
            _hsv_to_rgb(rng.uniform(0.04, 0.12), rng.uniform(0.2, 0.45), rng.uniform(0.6, 0.85)),
            np.array([0.72, 0.7, 0.66], np.float32),
        )
    else:
        top, bottom = (
            _hsv_to_rgb(rng.uniform(0.52, 0.64), rng.uniform(0.35, 0.7), rng.uniform(0.7, 0.95)),
            np.array([0.85, 0.9, 0.95], np.float32),
        )
    image[:] = top + (bottom - top) * np.clip(rows / max(horizon, 1e-3), 0, 1)
    # skyline of buildings between the sky and the horizon
    ground = int(horizon * height)
    x = 0
    while x < width:
        bw = int(rng.integers(max(width // 12, 4), max(width // 4, 6)))
        top_y = int(rng.uniform(0.08, 0.8) * ground)
        colour = _hsv_to_rgb(rng.uniform(0.0, 0.15), rng.uniform(0.0, 0.35), rng.uniform(0.3, 0.75))
        block = image[top_y:ground, x : x + bw]
        block[:] = colour
        if gritty:  # brick courses: mortar lines every 4 px with staggered joints
            yy, xx = np.ogrid[top_y:ground, x : x + block.shape[1]]
            course = yy // 4
            mortar = (yy % 4 == 0) | (((xx + 4 * (course % 2)) % 8) == 0)
            block[mortar] *= 0.7
        elif rng.random() < 0.7:  # window grid
            yy, xx = np.ogrid[top_y:ground, x : x + block.shape[1]]
            windows = ((yy - top_y) % 7 >= 3) & ((xx - x) % 6 >= 3) & (yy < ground - 3)
            block[windows] = block[windows] * 0.55 + 0.15
        x += bw
    # road (and, in the target domain, grass verges)
    road_colour = np.array([0.33, 0.33, 0.35], np.float32) if gritty else np.full(3, rng.uniform(0.4, 0.55), np.float32)
    image[ground:] = road_colour
    if gritty:
        verge = int(rng.integers(0, max((height - ground) // 3, 1)))
        image[ground : ground + verge] = np.array([0.3, 0.45, 0.22], np.float32)
        image[ground:] *= rng.uniform(0.8, 1.2, size=(height - ground, width, 1)).astype(
            np.float32, copy=False
        )  # speckle
    else:
        lane_y = int(ground + rng.uniform(0.4, 0.7) * (height - ground))
        dash = (np.arange(width) // max(width // 10, 2)) % 2 == 0
        image[lane_y : lane_y + max(height // 64, 1), dash] = 0.92
    amplitude = 0.1 if gritty else 0.06
    image *= 1.0 + amplitude * _smooth_noise(rng, (height, width), cell=max(height // 12, 2))[..., None]
    return image


def render_scene(config: SyntheticConfig, split: str, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render image ``index`` of ``split`` (pure function of its arguments).

    Args:
        config: dataset parameters.
        split: one of :data:`SPLITS`.
        index: image index within the split (``>= 0``).

    Returns:
        ``image`` ``(H, W, 3)`` uint8, ``masks`` ``(N, H, W)`` bool (visible parts; pairwise
        disjoint), ``class_ids`` ``(N,)`` int64.

    Raises:
        ValueError: on an unknown split or a negative index.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    domain = SPLITS[split]
    style = _STYLES[domain]
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, _DOMAIN_CODE[domain], _SPLIT_CODE[split], index]))
    height, width = config.image_size
    horizon = float(rng.uniform(0.38, 0.55))
    background = _background(rng, config, style, horizon)  # (H, W, 3) float
    things = _place_things(rng, config, style, horizon)

    # Occlusion: drop instances that end up (almost) hidden or off-image, then repaint so that
    # no unlabeled fragment stays visible. Removing a thing only uncovers the others.
    min_area = max(1, int(round(config.min_visible_area * height * width / 128.0**2)))
    ids = _paint_ids(things, height, width)
    areas = np.bincount(ids[ids >= 0].ravel(), minlength=len(things))
    keep = [
        t
        for i, t in enumerate(things)
        if areas[i] >= min_area and areas[i] >= config.min_visible_fraction * t.mask.sum()
    ]
    if len(keep) != len(things):
        things = keep
        ids = _paint_ids(things, height, width)

    image = background
    for index_, thing in enumerate(things):
        box = _clip_box(thing, height, width)
        if box is None:
            continue
        ys, xs, ly, lx = box
        visible = ids[ys, xs] == index_  # (h', w')
        pixels = thing.colour[None, None, :] * thing.shade[ly, lx][..., None]  # (h', w', 3)
        region = image[ys, xs]
        region[visible] = pixels[visible]
    if rng.random() < style.outline_prob:  # darken visible instance boundaries (helps, not always there)
        padded = np.pad(ids, 1, mode="edge")
        edge = (
            (padded[:-2, 1:-1] != ids)
            | (padded[2:, 1:-1] != ids)
            | (padded[1:-1, :-2] != ids)
            | (padded[1:-1, 2:] != ids)
        ) & (ids >= 0)
        image[edge] *= 0.6

    # domain-level appearance: cast, haze, blur, sensor noise
    if style.cast != (1.0, 1.0, 1.0):
        cast = np.array(style.cast, np.float32) * rng.uniform(0.95, 1.05, 3).astype(np.float32)
        image = image * cast
    haze = rng.uniform(*style.haze)
    if haze > 0:
        image = (1 - haze) * image + haze * np.array([0.62, 0.6, 0.58], np.float32)
    sigma = rng.uniform(*style.blur_sigma)
    if sigma > 0:
        image = ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0), truncate=3.0)
    noise = rng.uniform(*style.noise_sigma) / 255.0
    if noise > 0:
        image += noise * rng.standard_normal(image.shape, dtype=np.float32)
    image_u8 = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)

    masks = ids[None] == np.arange(len(things), dtype=np.int32)[:, None, None]  # (N, H, W)
    class_ids = np.array([t.class_id for t in things], dtype=np.int64)
    nonempty = masks.reshape(len(things), -1).any(axis=1) if things else np.zeros(0, bool)
    return image_u8, masks[nonempty], class_ids[nonempty]


def _image_id(split: str, index: int) -> int:
    return _SPLIT_CODE[split] * _ID_STRIDE + index


def _file_name(split: str, index: int) -> str:
    return f"{split}/{index:06d}.png"


def synthetic_sample(config: SyntheticConfig, split: str, index: int) -> InstanceSample:
    """Render one image in memory as an :class:`InstanceSample` (same content as on disk).

    Args:
        config: dataset parameters.
        split: one of :data:`SPLITS`.
        index: image index within the split.

    Returns:
        The sample, with the same ``image_id`` and ``file_name`` :func:`generate_dataset` writes.

    Raises:
        ValueError: on an unknown split or a negative index.
    """
    image, masks, class_ids = render_scene(config, split, index)
    return InstanceSample(
        image=image,
        masks=masks,
        class_ids=class_ids,
        is_crowd=np.zeros(len(class_ids), dtype=bool),
        image_id=_image_id(split, index),
        file_name=_file_name(split, index),
    )


def touching_same_class_pairs(masks: np.ndarray, class_ids: np.ndarray) -> int:
    """Count pairs of same-class instances that share a 4-connected boundary.

    Two instances touch when some pixel of one is a 4-neighbour of some pixel of the other.

    Args:
        masks: ``(N, H, W)`` bool masks (any overlap also counts as touching).
        class_ids: ``(N,)`` class indices.

    Returns:
        The number of unordered touching pairs with equal class.
    """
    count = 0
    structure = ndimage.generate_binary_structure(2, 1)
    dilated = [ndimage.binary_dilation(m, structure=structure) for m in masks]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            if class_ids[i] == class_ids[j] and bool((dilated[i] & masks[j]).any()):
                count += 1
    return count


# ---------------------------------------------------------------------------- writing to disk
def _render_chunk(args: tuple[dict[str, Any], str, list[int], str]) -> list[tuple[int, list[dict[str, Any]], int, int]]:
    """Worker: render images, write PNGs, return annotations (picklable; runs in a subprocess)."""
    config_dict, split, indices, image_dir = args
    config = SyntheticConfig.from_dict(config_dict)
    results = []
    for index in indices:
        image, masks, class_ids = render_scene(config, split, index)
        Image.fromarray(image).save(Path(image_dir) / _file_name(split, index), compress_level=1)
        anns = []
        for mask, class_id in zip(masks, class_ids):
            rle = encode_mask(mask)
            compressed = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
            anns.append(
                {
                    "category_id": int(class_id) + 1,
                    "segmentation": rle,
                    "area": int(mask_utils.area(compressed)),
                    "bbox": [float(v) for v in mask_utils.toBbox(compressed)],
                    "iscrowd": 0,
                }
            )
        results.append((index, anns, image.shape[0], image.shape[1]))
    return results


def read_manifest(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Return the parsed ``manifest.json`` of a generated dataset, or ``None`` if there is none.

    Raises:
        ValueError: if the manifest exists but is not valid JSON.
    """
    path = Path(root) / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"corrupt synthetic dataset manifest {path}: {error}") from error


def generate_dataset(
    root: str | os.PathLike[str],
    config: SyntheticConfig | None = None,
    *,
    workers: int | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Generate the synthetic dataset in COCO format under ``root`` (skipped if already there).

    If ``root/manifest.json`` records the same :meth:`SyntheticConfig.config_hash`, nothing is
    done. Otherwise the dataset is written to a temporary sibling folder and renamed into place
    only when complete (the manifest is written last), so an interrupted run never leaves a
    dataset that looks complete. A previous generated dataset with another config is replaced.

    Args:
        root: destination folder.
        config: dataset parameters (default :class:`SyntheticConfig`).
        workers: worker processes; ``None`` = ``min(cpu_count, 8)``, ``0`` or ``1`` = in-process.
        progress: show a tqdm progress bar.
        force: regenerate even if an identical dataset exists.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: if ``root`` exists, is not empty and is not a generated dataset (it is never
            overwritten), or ``workers`` is negative.
    """
    config = config or SyntheticConfig()
    root = Path(root)
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be >= 0 or None, got {workers}")
    digest = config.config_hash()
    manifest = read_manifest(root)
    if manifest is not None and manifest.get("config_hash") == digest and not force:
        logger.info("synthetic dataset at %s is up to date (config hash %s); skipping generation", root, digest[:12])
        return root
    if root.exists() and manifest is None and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(
            f"{root} exists and is not a generated synthetic dataset (no manifest.json); refusing to overwrite it"
        )

    start = time.perf_counter()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        instance_counts = _write_dataset(tmp, config, workers, progress)
        manifest_out = {
            "generator_version": GENERATOR_VERSION,
            "config": config.to_dict(),
            "config_hash": digest,
            "class_names": list(THING_CLASSES),
            "splits": {},
            "seconds": round(time.perf_counter() - start, 2),
        }
        for split, size in config.split_sizes().items():
            manifest_out["splits"][split] = {
                "domain": SPLITS[split],
                "images": size,
                "instances": instance_counts[split],
                "annotation_file": f"annotations/instances_{split}.json",
                "image_root": "images",
            }
        (tmp / "manifest.json").write_text(json.dumps(manifest_out, indent=2), encoding="utf-8")
        _swap_into_place(tmp, root, digest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("generated synthetic dataset at %s in %.1f s", root, time.perf_counter() - start)
    return root


def _write_dataset(out: Path, config: SyntheticConfig, workers: int | None, progress: bool) -> dict[str, int]:
    """Render every split into ``out``; return the number of instances per split."""
    image_dir = out / "images"
    tasks: list[tuple[dict[str, Any], str, list[int], str]] = []
    chunk = 32
    for split, size in config.split_sizes().items():
        (image_dir / split).mkdir(parents=True, exist_ok=True)
        for begin in range(0, size, chunk):
            tasks.append((config.to_dict(), split, list(range(begin, min(begin + chunk, size))), str(image_dir)))
    total = sum(config.split_sizes().values())
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    per_split: dict[str, list[tuple[int, list[dict[str, Any]], int, int]]] = {s: [] for s in SPLITS}
    bar = tqdm(total=total, desc="synthetic dataset", unit="img", disable=not progress)
    try:
        done = False
        if workers > 1 and total >= 2 * chunk:
            # The platform's default start method (like torch's DataLoader). Workers use only
            # numpy / PIL / scipy / pycocotools, never torch, so forking a torch process is safe.
            context = multiprocessing.get_context()
            try:
                with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                    for task, result in zip(tasks, pool.map(_render_chunk, tasks)):
                        per_split[task[1]].extend(result)
                        bar.update(len(result))
                done = True
            except BrokenProcessPool as error:
                # e.g. a "spawn" start method from a script read on stdin; images are
                # deterministic, so rendering everything again in-process gives the same files.
                logger.warning("worker processes failed (%s); generating in this process instead", error)
                per_split = {s: [] for s in SPLITS}
                bar.reset()
        if not done:
            for task in tasks:
                result = _render_chunk(task)
                per_split[task[1]].extend(result)
                bar.update(len(result))
    finally:
        bar.close()
    counts: dict[str, int] = {}
    for split, results in per_split.items():
        results.sort(key=lambda r: r[0])
        images, annotations = [], []
        for index, anns, height, width in results:
            image_id = _image_id(split, index)
            images.append(
                {
                    "id": image_id,
                    "file_name": _file_name(split, index),
                    "height": height,
                    "width": width,
                    "domain": SPLITS[split],
                }
            )
            for ann in anns:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
        categories = [{"id": i + 1, "name": name, "supercategory": "thing"} for i, name in enumerate(THING_CLASSES)]
        write_coco_json(
            out / "annotations" / f"instances_{split}.json",
            {"images": images, "annotations": annotations, "categories": categories},
        )
        counts[split] = len(annotations)
    return counts


def _swap_into_place(tmp: Path, root: Path, digest: str) -> None:
    """Rename the finished ``tmp`` folder to ``root``, replacing an outdated dataset."""
    old = None
    if root.exists():
        old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(root, old)
    try:
        os.rename(tmp, root)
    except OSError:
        # another process finished first: keep its dataset if it is the same one
        theirs = read_manifest(root) if root.exists() else None
        if theirs is None or theirs.get("config_hash") != digest:
            if old is not None and not root.exists():
                os.rename(old, root)  # put the previous dataset back
                old = None
            raise
        logger.info("another process generated %s concurrently; keeping its copy", root)
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def load_synthetic_split(root: str | os.PathLike[str], split: str, **kwargs: Any) -> CocoInstanceDataset:
    """Open one split of a generated dataset with the COCO reader.

    Args:
        root: folder written by :func:`generate_dataset`.
        split: one of :data:`SPLITS`.
        **kwargs: forwarded to :class:`~reference_pipeline.data.coco.CocoInstanceDataset`.

    Returns:
        The dataset; ``class_names`` equals :data:`THING_CLASSES`.

    Raises:
        ValueError: on an unknown split.
        FileNotFoundError: if ``root`` holds no generated dataset.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    root = Path(root)
    if read_manifest(root) is None:
        raise FileNotFoundError(f"no synthetic dataset at {root} (manifest.json missing); run generate_dataset first")
    return CocoInstanceDataset(root / "annotations" / f"instances_{split}.json", root / "images", **kwargs)
