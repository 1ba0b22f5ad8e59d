"""The common instance structure every reader returns.

Every dataset in :mod:`reference_pipeline.data` (the synthetic default, COCO-format sets,
Cityscapes, ADE20K) yields :class:`InstanceSample` objects, so training, pseudo-labelling,
evaluation and visualisation never depend on where an image came from.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from ..errors import UserError

__all__ = [
    "InstanceDataset",
    "InstanceSample",
    "instance_id_map",
    "load_rgb_image",
]

logger = logging.getLogger(__name__)


@dataclass
class InstanceSample:
    """One image with its instance annotations.

    Attributes:
        image: RGB image, ``(H, W, 3)`` ``uint8``.
        masks: one binary mask per instance, ``(N, H, W)`` ``bool`` (``N`` may be 0).
        class_ids: contiguous class index of each instance in ``0 .. C-1``, ``(N,)`` ``int64``.
        is_crowd: whether each instance is a crowd / group region (COCO ``iscrowd``), ``(N,)``
            ``bool``. Crowd regions are ignored by COCO evaluation and usually by training.
        image_id: integer image id, unique within its dataset (used by COCO evaluation).
        file_name: path of the image relative to the dataset's image root.

    Raises:
        ValueError: if the arrays have inconsistent shapes or wrong dtypes.
    """

    image: np.ndarray
    masks: np.ndarray
    class_ids: np.ndarray
    is_crowd: np.ndarray
    image_id: int
    file_name: str

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(
                f"InstanceSample.image must be (H, W, 3) uint8, got shape {self.image.shape} "
                f"dtype {self.image.dtype} (image {self.file_name!r})"
            )
        height, width = self.image.shape[:2]
        if self.masks.ndim != 3 or self.masks.shape[1:] != (height, width) or self.masks.dtype != np.bool_:
            raise ValueError(
                f"InstanceSample.masks must be (N, {height}, {width}) bool, got shape {self.masks.shape} "
                f"dtype {self.masks.dtype} (image {self.file_name!r})"
            )
        num = self.masks.shape[0]
        if self.class_ids.shape != (num,) or self.class_ids.dtype != np.int64:
            raise ValueError(
                f"InstanceSample.class_ids must be ({num},) int64, got shape {self.class_ids.shape} "
                f"dtype {self.class_ids.dtype} (image {self.file_name!r})"
            )
        if self.is_crowd.shape != (num,) or self.is_crowd.dtype != np.bool_:
            raise ValueError(
                f"InstanceSample.is_crowd must be ({num},) bool, got shape {self.is_crowd.shape} "
                f"dtype {self.is_crowd.dtype} (image {self.file_name!r})"
            )
        if num and int(self.class_ids.min()) < 0:
            raise ValueError(f"InstanceSample.class_ids must be >= 0, got {self.class_ids.tolist()}")

    @property
    def height(self) -> int:
        """Image height in pixels."""
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        """Image width in pixels."""
        return int(self.image.shape[1])

    @property
    def num_instances(self) -> int:
        """Number of instances ``N`` (crowd regions included)."""
        return int(self.masks.shape[0])

    def without_crowd(self) -> InstanceSample:
        """Return a copy holding only the non-crowd instances."""
        keep = ~self.is_crowd
        return InstanceSample(
            image=self.image,
            masks=self.masks[keep],
            class_ids=self.class_ids[keep],
            is_crowd=self.is_crowd[keep],
            image_id=self.image_id,
            file_name=self.file_name,
        )

    def instance_id_map(self, ignore_id: int = -1, include_crowd: bool = False) -> np.ndarray:
        """Per-pixel instance index (see :func:`instance_id_map`)."""
        masks = self.masks if include_crowd else self.masks[~self.is_crowd]
        return instance_id_map(masks, ignore_id=ignore_id)


def instance_id_map(masks: np.ndarray, ignore_id: int = -1) -> np.ndarray:
    """Collapse instance masks into one map of instance indices.

    Where masks overlap, the later instance wins (painter's order). Pixels covered by no mask get
    ``ignore_id``. This is the ``instance_ids`` input of the :mod:`instcontrast` diagnostics.

    Args:
        masks: ``(N, H, W)`` bool masks.
        ignore_id: value for pixels that belong to no instance; must be negative.

    Returns:
        ``(H, W)`` ``int64`` map with values in ``{ignore_id} ∪ {0, ..., N-1}``.

    Raises:
        ValueError: if ``masks`` is not 3-D or ``ignore_id`` is not negative.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    if ignore_id >= 0:
        raise ValueError(f"ignore_id must be negative so it cannot collide with an instance index, got {ignore_id}")
    ids = np.full(masks.shape[1:], ignore_id, dtype=np.int64)  # (H, W)
    for index in range(masks.shape[0]):
        ids[masks[index]] = index
    return ids


@runtime_checkable
class InstanceDataset(Protocol):
    """What every reader provides (a map-style dataset of :class:`InstanceSample`).

    Attributes:
        class_names: name of each contiguous class index ``0 .. C-1``.
        image_ids: the integer id of each item, in index order.
    """

    class_names: Sequence[str]
    image_ids: Sequence[int]

    def __len__(self) -> int:
        """Number of images."""
        ...

    def __getitem__(self, index: int) -> InstanceSample:
        """Load image ``index`` with its instances."""
        ...


def load_rgb_image(path: Path) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` ``uint8`` RGB.

    Args:
        path: image file.

    Returns:
        The decoded image (grayscale / palette / RGBA images are converted to RGB; 16-bit grayscale is
        scaled to 8 bits, ``v // 257``, not clipped as PIL's own conversion does).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file cannot be decoded as an image.
    """
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as handle:
            if handle.mode.startswith("I;16") or handle.mode == "I":  # 16-bit grayscale (PNG opens as I;16 or I)
                wide = np.asarray(handle, dtype=np.int64)  # (H, W)
                gray = (np.clip(wide, 0, 65535) // 257).astype(np.uint8)  # (H, W) 0..65535 -> 0..255
                return np.repeat(gray[..., None], 3, axis=2)  # (H, W, 3)
            return np.asarray(handle.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, SyntaxError) as error:  # PIL raises these for truncated / unknown files
        raise UserError(f"cannot decode image {path}: {error}") from error


def check_index(index: int, length: int, name: str) -> int:
    """Normalise a possibly negative index, raising ``IndexError`` when out of range."""
    if not isinstance(index, (int, np.integer)):
        raise TypeError(f"{name} index must be an int, got {type(index).__name__}")
    index = int(index)
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"{name} index {index} out of range for {length} images")
    return index
