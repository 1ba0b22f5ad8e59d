"""Unlabeled images as users hold them: a folder of images, or a COCO JSON whose annotations are ignored.

Both yield :class:`~reference_pipeline.data.structures.InstanceSample` objects without instances, so the
pipeline pseudo-labels them like any unlabeled split:

* :class:`ImageFolderDataset` — every image file under a folder (sub-folders included), sorted by relative
  path; grayscale, palette, RGBA and 16-bit images are read as 8-bit RGB. Image ids are positions in that
  sorted order (``0 .. N-1``): the same folder always gives the same ids. A run's pseudo-labels are keyed by
  these ids, so adding or removing files between the stages of one run re-keys them (start a new run dir).
* :class:`CocoImageListDataset` — the ``images`` list of a COCO JSON (ids and file names as written there);
  its ``annotations`` and ``categories`` are not read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import UserError
from .structures import InstanceSample, check_index, load_rgb_image

__all__ = ["IMAGE_SUFFIXES", "CocoImageListDataset", "ImageFolderDataset"]

#: File suffixes read as images (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _unannotated(image: np.ndarray, image_id: int, file_name: str) -> InstanceSample:
    height, width = image.shape[:2]
    return InstanceSample(
        image=image, masks=np.zeros((0, height, width), dtype=bool), class_ids=np.zeros(0, dtype=np.int64),
        is_crowd=np.zeros(0, dtype=bool), image_id=image_id, file_name=file_name,
    )


class _UnannotatedImages:
    """Samples without instances from ``root / file_names[i]`` with ``image_ids[i]`` (set by the subclass)."""

    root: Path
    file_names: list[str]
    image_ids: list[int]
    _what = "unlabeled images"  # names the dataset in index errors

    def __len__(self) -> int:
        return len(self.file_names)

    def __getitem__(self, index: int) -> InstanceSample:
        index = check_index(index, len(self), self._what)
        image = load_rgb_image(self.root / self.file_names[index])
        return _unannotated(image, self.image_ids[index], self.file_names[index])


class ImageFolderDataset(_UnannotatedImages):
    """The images under a folder (recursively, sorted by relative path) as samples without instances.

    Args:
        root: the folder.
        class_names: the run's class names (the dataset has no annotations of its own).

    Attributes:
        class_names: as given.
        file_names: relative POSIX paths of the images, sorted.
        image_ids: ``0 .. N-1``, the position of each file in ``file_names``.

    Raises:
        FileNotFoundError: if ``root`` is not a folder or holds no image file.
    """

    def __init__(self, root: str | os.PathLike[str], class_names: Sequence[str]) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"unlabeled image folder not found: {self.root} (expected a folder of image files)")
        files = [
            path for path in self.root.rglob("*")
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in path.relative_to(self.root).parts)
        ]  # fmt: skip
        if not files:
            raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {self.root}")
        self.file_names: list[str] = sorted(path.relative_to(self.root).as_posix() for path in files)
        self.image_ids: list[int] = list(range(len(self.file_names)))
        self.class_names = list(class_names)

    _what = "image folder"


class CocoImageListDataset(_UnannotatedImages):
    """The images a COCO JSON lists (its ``images`` entries), without instances: annotations are ignored.

    Args:
        annotation_file: a COCO JSON; only ``images`` (``id``, ``file_name``) is read.
        image_root: the folder ``file_name`` is relative to.
        class_names: the run's class names.

    Attributes:
        class_names: as given.
        file_names: ``file_name`` of each entry, in JSON order.
        image_ids: the JSON's integer ids.

    Raises:
        FileNotFoundError: if the JSON, the folder or a listed image is missing.
        ValueError: if the JSON has no ``images`` list, an id is not an integer, or ids repeat.
    """

    def __init__(
        self, annotation_file: str | os.PathLike[str], image_root: str | os.PathLike[str], class_names: Sequence[str]
    ) -> None:
        self.annotation_file = Path(annotation_file)
        self.root = Path(image_root)
        if not self.annotation_file.is_file():
            raise FileNotFoundError(f"unlabeled COCO JSON not found: {self.annotation_file}")
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder of {self.annotation_file} not found: {self.root}")
        try:
            data = json.loads(self.annotation_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise UserError(f"{self.annotation_file} is not valid JSON ({error})") from error
        images = data.get("images") if isinstance(data, dict) else None
        if not isinstance(images, list):
            raise UserError(  # noqa: TRY004 (a malformed file: the CLI reports ValueError in one line)
                f"{self.annotation_file}: expected a top-level 'images' list of {{id, file_name}}"
            )
        try:
            self.image_ids: list[int] = [int(image["id"]) for image in images]
            self.file_names: list[str] = [str(image["file_name"]) for image in images]
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"{self.annotation_file}: every image needs an integer 'id' and a 'file_name' ({error})") from error
        if len(set(self.image_ids)) != len(self.image_ids):
            raise UserError(f"{self.annotation_file}: duplicate image ids")
        missing = [name for name in self.file_names if not (self.root / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) listed in {self.annotation_file} are missing under {self.root}, "
                f"e.g. {', '.join(missing[:5])}"
            )
        self.class_names = list(class_names)

    _what = "COCO image list"
