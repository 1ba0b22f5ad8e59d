"""Reader for Cityscapes instance segmentation in the standard on-disk layout.

Expected layout (as distributed by cityscapes-dataset.com)::

    <root>/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png
    <root>/gtFine/<split>/<city>/<stem>_gtFine_instanceIds.png

``*_instanceIds.png`` is a single-channel (16-bit) image of the same size as the photo. A pixel
value ``v >= 1000`` belongs to instance ``v % 1000`` of class ``v // 1000``; a value ``v < 1000``
is a plain class id without instance information. When that class is one of the 8 instance
classes (person 24, rider 25, car 26, truck 27, bus 28, train 31, motorcycle 32, bicycle 33) the
region is a *group* (e.g. a crowd of people) and is returned as one crowd instance
(``is_crowd=True``), the same convention as COCO's ``iscrowd``. Every other class (stuff,
``caravan``/``trailer``, void) is ignored, as in the official instance-level evaluation.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError
from .structures import InstanceSample, check_index, load_rgb_image

__all__ = ["CITYSCAPES_LAYOUT", "CITYSCAPES_THING_CLASSES", "CityscapesInstanceDataset"]

logger = logging.getLogger(__name__)

#: ``(name, Cityscapes label id)`` of the 8 instance classes, in contiguous index order.
CITYSCAPES_THING_CLASSES: tuple[tuple[str, int], ...] = (
    ("person", 24),
    ("rider", 25),
    ("car", 26),
    ("truck", 27),
    ("bus", 28),
    ("train", 31),
    ("motorcycle", 32),
    ("bicycle", 33),
)

CITYSCAPES_LAYOUT = (
    "expected <root>/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png with "
    "<root>/gtFine/<split>/<city>/<stem>_gtFine_instanceIds.png (single-channel, same size; "
    "value = classId*1000 + index for instances, plain classId below 1000)"
)


class CityscapesInstanceDataset:
    """Map-style dataset over one split of Cityscapes' fine instance annotations.

    Args:
        root: Cityscapes root folder (holding ``leftImg8bit/`` and ``gtFine/``).
        split: ``"train"``, ``"val"`` or ``"test"`` (any folder name under ``leftImg8bit``).
        include_crowd: return group regions (values ``< 1000`` of an instance class) as crowd
            instances; if ``False`` they are dropped.
        annotation_dir: name of the annotation folder (``"gtFine"``; ``"gtCoarse"`` also works,
            its files are named ``*_gtCoarse_instanceIds.png``).

    Attributes:
        class_names: the 8 instance classes (see :data:`CITYSCAPES_THING_CLASSES`).
        image_ids: ``0 .. len-1`` in sorted file-name order.
        file_names: image paths relative to ``<root>/leftImg8bit/<split>``.

    Raises:
        FileNotFoundError: if the split folder is missing, holds no images, or an image has no
            annotation file.
    """

    class_names: list[str] = [name for name, _ in CITYSCAPES_THING_CLASSES]

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        *,
        include_crowd: bool = True,
        annotation_dir: str = "gtFine",
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.include_crowd = include_crowd
        self.annotation_dir = annotation_dir
        self.image_root = self.root / "leftImg8bit" / split
        self.annotation_root = self.root / annotation_dir / split
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"Cityscapes image folder not found: {self.image_root}; {CITYSCAPES_LAYOUT}")
        if not self.annotation_root.is_dir():
            raise FileNotFoundError(
                f"Cityscapes annotation folder not found: {self.annotation_root}; {CITYSCAPES_LAYOUT}"
            )
        images = sorted(self.image_root.glob("*/*_leftImg8bit.png"))
        if not images:
            raise FileNotFoundError(f"no *_leftImg8bit.png files under {self.image_root}/<city>/; {CITYSCAPES_LAYOUT}")
        stray = [p for p in self.image_root.glob("*/*.png") if not p.name.endswith("_leftImg8bit.png")]
        if stray:
            logger.warning("%s: ignored %d PNG file(s) not named *_leftImg8bit.png", self.image_root, len(stray))
        self.file_names: list[str] = [str(p.relative_to(self.image_root)) for p in images]
        self._annotation_files: list[Path] = []
        missing: list[Path] = []
        for path in images:
            stem = path.name[: -len("_leftImg8bit.png")]
            ann = self.annotation_root / path.parent.name / f"{stem}_{annotation_dir}_instanceIds.png"
            self._annotation_files.append(ann)
            if not ann.is_file():
                missing.append(ann)
        if missing:
            shown = ", ".join(map(str, missing[:5]))
            raise FileNotFoundError(
                f"{len(missing)} Cityscapes annotation file(s) missing, e.g. {shown}; {CITYSCAPES_LAYOUT}"
            )
        self.image_ids: list[int] = list(range(len(images)))
        self._label_to_class = {label: index for index, (_, label) in enumerate(CITYSCAPES_THING_CLASSES)}
        logger.info("Cityscapes %s: %d images from %s", split, len(images), self.root)

    def __len__(self) -> int:
        return len(self.file_names)

    def read_instance_ids(self, index: int) -> np.ndarray:
        """Read the raw ``*_instanceIds.png`` of image ``index`` as ``(H, W)`` ``int64``.

        Raises:
            ValueError: if the PNG is not single-channel.
        """
        index = check_index(index, len(self), "Cityscapes")
        path = self._annotation_files[index]
        try:
            with Image.open(path) as handle:
                ids = np.array(handle)
        except (OSError, SyntaxError) as error:
            raise UserError(f"cannot decode Cityscapes annotation {path}: {error}") from error
        if ids.ndim != 2:
            raise UserError(
                f"Cityscapes annotation {path} has shape {ids.shape}; expected a single-channel (H, W) "
                f"16-bit image; {CITYSCAPES_LAYOUT}"
            )
        return ids.astype(np.int64)

    def __getitem__(self, index: int) -> InstanceSample:
        """Load image ``index`` with its instances and group (crowd) regions.

        Raises:
            FileNotFoundError: if a file disappeared since construction.
            ValueError: if the annotation is not single-channel or its size differs from the image.
        """
        index = check_index(index, len(self), "Cityscapes")
        image = load_rgb_image(self.image_root / self.file_names[index])
        ids = self.read_instance_ids(index)  # (H, W)
        if ids.shape != image.shape[:2]:
            raise UserError(
                f"Cityscapes annotation {self._annotation_files[index]} has size {ids.shape} but image "
                f"{self.image_root / self.file_names[index]} has size {image.shape[:2]}; {CITYSCAPES_LAYOUT}"
            )
        masks: list[np.ndarray] = []
        class_ids: list[int] = []
        crowd: list[bool] = []
        for value in np.unique(ids):
            value = int(value)
            label = value // 1000 if value >= 1000 else value
            class_id = self._label_to_class.get(label)
            if class_id is None:
                continue
            is_group = value < 1000
            if is_group and not self.include_crowd:
                continue
            masks.append(ids == value)
            class_ids.append(class_id)
            crowd.append(is_group)
        height, width = ids.shape
        return InstanceSample(
            image=image,
            masks=np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool),
            class_ids=np.array(class_ids, dtype=np.int64),
            is_crowd=np.array(crowd, dtype=bool),
            image_id=self.image_ids[index],
            file_name=self.file_names[index],
        )
