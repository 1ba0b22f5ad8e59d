"""Reader for ADE20K instance segmentation (the 100-class SceneParsing instance challenge).

Expected layout (``ADEChallengeData2016`` with the instance annotations unpacked)::

    <root>/images/<split>/<stem>.jpg                  split: "training" or "validation"
    <root>/annotations_instance/<split>/<stem>.png    RGB PNG of the same size

In an instance PNG the R channel is the category id (``1 .. 100``, ``0`` = no thing) and the G
channel is the instance id (``0`` = none; unique per image regardless of category). Each instance
must carry exactly one category. Category ``k`` becomes contiguous class ``k - 1``.

Mask2Former converts the same data to COCO JSON (``ade20k_instance_{train,val}.json`` produced by
``prepare_ade20k_ins_seg.py``); that file is read by :class:`~reference_pipeline.data.coco.CocoInstanceDataset`
(see :func:`mask2former_ade20k_json`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError
from .coco import CocoInstanceDataset
from .structures import InstanceSample, check_index, load_rgb_image

__all__ = ["ADE20K_INSTANCE_CLASSES", "ADE20K_LAYOUT", "ADE20KInstanceDataset", "mask2former_ade20k_json"]

logger = logging.getLogger(__name__)

#: Names of the 100 instance categories, index ``k - 1`` for category id ``k``
#: (order of ``instanceInfo100_train.txt`` of the SceneParsing instance challenge).
ADE20K_INSTANCE_CLASSES: tuple[str, ...] = (
    "bed", "windowpane", "cabinet", "person", "door", "table", "curtain", "chair", "car", "painting",
    "sofa", "shelf", "mirror", "armchair", "seat", "fence", "desk", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "box", "column", "signboard", "chest of drawers", "counter", "sink",
    "fireplace", "refrigerator", "stairs", "case", "pool table", "pillow", "screen door", "bookcase",
    "coffee table", "toilet", "flower", "book", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "arcade machine", "bus", "towel", "light",
    "truck", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "apparel", "pole", "bannister", "ottoman", "bottle", "van", "ship", "fountain", "washer",
    "plaything", "stool", "barrel", "basket", "bag", "minibike", "oven", "ball", "food", "step",
    "trade name", "microwave", "pot", "animal", "bicycle", "dishwasher", "screen", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "plate", "monitor", "bulletin board",
    "radiator", "glass", "clock", "flag",
)  # fmt: skip

ADE20K_LAYOUT = (
    "expected <root>/images/<split>/<stem>.jpg with <root>/annotations_instance/<split>/<stem>.png "
    "(RGB PNG of the same size: R = category id 1..100, G = instance id, 0 = none)"
)


class ADE20KInstanceDataset:
    """Map-style dataset over ADE20K's RG-encoded instance PNGs.

    Args:
        root: the ``ADEChallengeData2016`` folder.
        split: ``"training"`` or ``"validation"`` (any folder name under ``images``).
        image_extensions: image suffixes to look for.

    Attributes:
        class_names: the 100 instance categories (:data:`ADE20K_INSTANCE_CLASSES`).
        image_ids: ``0 .. len-1`` in sorted file-name order.
        file_names: image paths relative to ``<root>/images/<split>``.

    Raises:
        FileNotFoundError: if the split folders are missing, hold no images, or an image has no
            instance PNG.
    """

    class_names: list[str] = list(ADE20K_INSTANCE_CLASSES)

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "training",
        *,
        image_extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png"),
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.image_root = self.root / "images" / split
        self.annotation_root = self.root / "annotations_instance" / split
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"ADE20K image folder not found: {self.image_root}; {ADE20K_LAYOUT}")
        if not self.annotation_root.is_dir():
            raise FileNotFoundError(
                f"ADE20K instance annotation folder not found: {self.annotation_root}; {ADE20K_LAYOUT}"
            )
        entries = [p for p in self.image_root.iterdir() if p.is_file()]
        images = sorted(p for p in entries if p.suffix.lower() in image_extensions)
        if len(images) != len(entries):
            logger.warning(
                "%s: ignored %d file(s) without an image extension %s",
                self.image_root,
                len(entries) - len(images),
                image_extensions,
            )
        if not images:
            raise FileNotFoundError(f"no images ({', '.join(image_extensions)}) in {self.image_root}; {ADE20K_LAYOUT}")
        self.file_names: list[str] = [p.name for p in images]
        self._annotation_files = [self.annotation_root / f"{p.stem}.png" for p in images]
        missing = [a for a in self._annotation_files if not a.is_file()]
        if missing:
            shown = ", ".join(map(str, missing[:5]))
            raise FileNotFoundError(f"{len(missing)} ADE20K instance PNG(s) missing, e.g. {shown}; {ADE20K_LAYOUT}")
        self.image_ids: list[int] = list(range(len(images)))
        logger.info("ADE20K %s: %d images from %s", split, len(images), self.root)

    def __len__(self) -> int:
        return len(self.file_names)

    def __getitem__(self, index: int) -> InstanceSample:
        """Load image ``index`` and split its instance PNG into masks.

        Raises:
            ValueError: if the PNG is not RGB, its size differs from the image, a category id is
                outside ``1 .. 100``, or one instance id carries several categories.
        """
        index = check_index(index, len(self), "ADE20K")
        image_path = self.image_root / self.file_names[index]
        ann_path = self._annotation_files[index]
        image = load_rgb_image(image_path)
        try:
            with Image.open(ann_path) as handle:
                encoded = np.array(handle)
        except (OSError, SyntaxError) as error:
            raise UserError(f"cannot decode ADE20K annotation {ann_path}: {error}") from error
        if encoded.ndim != 3 or encoded.shape[2] not in (3, 4) or encoded.dtype != np.uint8:
            raise UserError(
                f"ADE20K annotation {ann_path} has shape {encoded.shape} dtype {encoded.dtype}; "
                f"expected an 8-bit RGB PNG; {ADE20K_LAYOUT}"
            )
        if encoded.shape[:2] != image.shape[:2]:
            raise UserError(
                f"ADE20K annotation {ann_path} has size {encoded.shape[:2]} but image {image_path} has "
                f"size {image.shape[:2]}; {ADE20K_LAYOUT}"
            )
        categories = encoded[..., 0].astype(np.int64)  # (H, W)
        instances = encoded[..., 1].astype(np.int64)  # (H, W)
        masks: list[np.ndarray] = []
        class_ids: list[int] = []
        for instance in np.unique(instances):
            if instance == 0:
                continue
            mask = instances == instance
            cats = np.unique(categories[mask])
            if len(cats) != 1:
                raise UserError(
                    f"ADE20K annotation {ann_path}: instance {int(instance)} has categories {cats.tolist()}; "
                    f"each instance must have exactly one"
                )
            category = int(cats[0])
            if not 1 <= category <= len(ADE20K_INSTANCE_CLASSES):
                raise UserError(
                    f"ADE20K annotation {ann_path}: instance {int(instance)} has category {category}, "
                    f"expected 1..{len(ADE20K_INSTANCE_CLASSES)}"
                )
            masks.append(mask)
            class_ids.append(category - 1)
        height, width = image.shape[:2]
        return InstanceSample(
            image=image,
            masks=np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool),
            class_ids=np.array(class_ids, dtype=np.int64),
            is_crowd=np.zeros(len(masks), dtype=bool),
            image_id=self.image_ids[index],
            file_name=self.file_names[index],
        )


def mask2former_ade20k_json(root: str | os.PathLike[str], split: str = "val") -> CocoInstanceDataset:
    """Open Mask2Former's converted ADE20K instance JSON with the COCO reader.

    Args:
        root: the ``ADEChallengeData2016`` folder holding ``ade20k_instance_{train,val}.json``.
        split: ``"train"`` or ``"val"``.

    Returns:
        A :class:`~reference_pipeline.data.coco.CocoInstanceDataset` over
        ``<root>/ade20k_instance_<split>.json`` with images in ``<root>/images/{training,validation}``.

    Raises:
        ValueError: if ``split`` is not ``"train"`` or ``"val"``.
        FileNotFoundError: if the JSON or an image is missing.
    """
    folders = {"train": "training", "val": "validation"}
    if split not in folders:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = Path(root)
    return CocoInstanceDataset(root / f"ade20k_instance_{split}.json", root / "images" / folders[split])
