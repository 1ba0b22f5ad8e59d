"""Reader (and writer) for any COCO-format instance-segmentation dataset.

Expected on-disk layout::

    <annotation_file>.json      {"images": [...], "annotations": [...], "categories": [...]}
    <image_root>/<file_name>    one file per entry of "images" (file_name may contain folders)

Segmentations may be polygons (``[[x0, y0, x1, y1, ...], ...]``), uncompressed RLE
(``{"size": [h, w], "counts": [int, ...]}``) or compressed RLE (``{"size": [h, w], "counts":
"string"}``). ``iscrowd`` is honoured. Category ids (arbitrary, possibly sparse integers) are
remapped to contiguous class indices ``0 .. C-1`` in increasing id order.

This module also holds :func:`encode_mask` and :func:`samples_to_coco_dict`, which the synthetic
generator and the evaluator use to write the same format, so a dataset written here reads back
through :class:`CocoInstanceDataset` unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils

from ..atomic import atomic_write_json
from ..errors import UserError
from .structures import InstanceSample, check_index, load_rgb_image

__all__ = [
    "COCO_LAYOUT",
    "CocoInstanceDataset",
    "decode_segmentation",
    "encode_mask",
    "samples_to_coco_dict",
    "write_coco_json",
]

logger = logging.getLogger(__name__)

COCO_LAYOUT = (
    "expected a COCO instances JSON with top-level keys 'images' (id, file_name, height, width), "
    "'annotations' (id, image_id, category_id, segmentation, iscrowd) and 'categories' (id, name), "
    "and image files at <image_root>/<file_name>"
)


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Encode one binary mask as JSON-serialisable compressed COCO RLE.

    Args:
        mask: ``(H, W)`` bool or 0/1 array.

    Returns:
        ``{"size": [H, W], "counts": str}``.

    Raises:
        ValueError: if ``mask`` is not 2-D.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_segmentation(segmentation: Any, height: int, width: int, where: str) -> np.ndarray:
    """Decode one COCO ``segmentation`` field to a binary mask.

    Args:
        segmentation: polygons (list of flat coordinate lists), uncompressed RLE (dict with a list
            of counts) or compressed RLE (dict with a string of counts).
        height: image height.
        width: image width.
        where: description of the annotation used in error messages (file and annotation id).

    Returns:
        ``(height, width)`` bool mask.

    Raises:
        ValueError: if the segmentation is malformed or its size disagrees with the image.
    """
    if isinstance(segmentation, list):
        polygons = [list(map(float, poly)) for poly in segmentation if isinstance(poly, list)]
        if len(polygons) != len(segmentation):
            raise UserError(f"{where}: polygon segmentation must be a list of coordinate lists")
        polygons = [poly for poly in polygons if len(poly) >= 6 and len(poly) % 2 == 0]
        if not polygons:
            raise UserError(f"{where}: no polygon with at least 3 points (x, y pairs)")
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict):
        if "counts" not in segmentation or "size" not in segmentation:
            raise UserError(f"{where}: RLE segmentation must have 'size' and 'counts'")
        size = [int(v) for v in segmentation["size"]]
        if size != [height, width]:
            raise UserError(f"{where}: RLE size {size} differs from image size [{height}, {width}]")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            if sum(int(c) for c in counts) != height * width:
                raise UserError(f"{where}: uncompressed RLE counts sum to {sum(counts)}, expected {height * width}")
            rle = mask_utils.frPyObjects(segmentation, height, width)
        elif isinstance(counts, (str, bytes)):
            rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        else:
            raise UserError(f"{where}: RLE counts must be a list or a string, got {type(counts).__name__}")
    else:
        raise UserError(
            f"{where}: segmentation must be a polygon list or an RLE dict, got {type(segmentation).__name__}"
        )
    try:
        with warnings.catch_warnings():
            # pycocotools' Cython decode trips numpy 2's __array__(copy=...) DeprecationWarning
            warnings.simplefilter("ignore", DeprecationWarning)
            mask = mask_utils.decode(rle)
    except Exception as error:  # pycocotools raises bare Exceptions for corrupt RLE strings
        raise UserError(f"{where}: cannot decode RLE: {error}") from error
    if mask.shape != (height, width):
        raise UserError(f"{where}: decoded mask has shape {mask.shape}, expected ({height}, {width})")
    return mask.astype(bool)


class CocoInstanceDataset:
    """Map-style dataset over a COCO-format instance-segmentation annotation file.

    Annotations without a usable segmentation (missing, empty, or polygons with fewer than three
    points) are skipped and their number is logged; images without annotations are kept (they
    are valid negatives and unlabeled images).

    Args:
        annotation_file: path of the COCO instances JSON.
        image_root: folder that ``file_name`` entries are relative to.
        include_crowd: keep ``iscrowd=1`` regions (flagged in ``is_crowd``); if ``False`` they are
            dropped and counted in the log.
        check_files: verify at construction that every image file exists.

    Attributes:
        class_names: category names in contiguous index order.
        category_ids: original COCO category id of each contiguous index.
        image_ids: integer id of each item. These are the JSON ids when all of them are integers,
            otherwise the position in the JSON ``images`` list (Mask2Former's ADE20K JSON uses the
            file stem as id); ``source_image_ids`` keeps the originals.
        file_names: ``file_name`` of each item.

    Raises:
        FileNotFoundError: if the annotation file or (with ``check_files``) an image is missing.
        ValueError: if the JSON is malformed, an annotation references an unknown image or
            category, or ids are duplicated.
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike[str],
        image_root: str | os.PathLike[str],
        *,
        include_crowd: bool = True,
        check_files: bool = True,
    ) -> None:
        self.annotation_file = Path(annotation_file)
        self.image_root = Path(image_root)
        self.include_crowd = include_crowd
        if not self.annotation_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {self.annotation_file}; {COCO_LAYOUT}")
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"COCO image root is not a directory: {self.image_root}; {COCO_LAYOUT}")
        try:
            with self.annotation_file.open("r", encoding="utf-8") as handle:
                data = json.load(handle)
        except json.JSONDecodeError as error:
            raise UserError(f"{self.annotation_file} is not valid JSON ({error}); {COCO_LAYOUT}") from error
        self._parse(data)
        if check_files:
            missing = [name for name in self.file_names if not (self.image_root / name).is_file()]
            if missing:
                shown = ", ".join(str(self.image_root / name) for name in missing[:5])
                raise FileNotFoundError(
                    f"{len(missing)} image(s) listed in {self.annotation_file} are missing under "
                    f"{self.image_root}, e.g. {shown}; {COCO_LAYOUT}"
                )

    # ------------------------------------------------------------------ parsing
    def _parse(self, data: Any) -> None:
        path = self.annotation_file
        if not isinstance(data, dict):
            raise UserError(f"{path}: top level must be a JSON object; {COCO_LAYOUT}")
        for key in ("images", "categories"):
            if not isinstance(data.get(key), list):
                raise UserError(f"{path}: missing or non-list key {key!r}; {COCO_LAYOUT}")
        annotations = data.get("annotations")
        if annotations is None:
            logger.warning("%s has no 'annotations' key; every image is treated as unannotated", path)
            annotations = []
        if not isinstance(annotations, list):
            raise UserError(f"{path}: 'annotations' must be a list; {COCO_LAYOUT}")

        categories = data["categories"]
        try:
            cat_pairs = sorted((int(cat["id"]), str(cat["name"])) for cat in categories)
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"{path}: every category needs an integer 'id' and a 'name' ({error})") from error
        cat_ids = [cid for cid, _ in cat_pairs]
        if len(set(cat_ids)) != len(cat_ids):
            raise UserError(f"{path}: duplicate category ids {sorted(cat_ids)}")
        self.category_ids: list[int] = cat_ids
        self.class_names: list[str] = [name for _, name in cat_pairs]
        cat_to_class = {cid: index for index, cid in enumerate(cat_ids)}

        images = data["images"]
        source_ids: list[Any] = []
        self.file_names: list[str] = []
        self._sizes: list[tuple[int, int]] = []
        for position, image in enumerate(images):
            try:
                source_ids.append(image["id"])
                self.file_names.append(str(image["file_name"]))
                self._sizes.append((int(image["height"]), int(image["width"])))
            except (KeyError, TypeError, ValueError) as error:
                raise UserError(
                    f"{path}: images[{position}] needs 'id', 'file_name', 'height', 'width' ({error!r})"
                ) from error
        if len(set(map(repr, source_ids))) != len(source_ids):
            raise UserError(f"{path}: duplicate image ids in 'images'")
        self.source_image_ids: list[Any] = source_ids
        if all(isinstance(i, int) and not isinstance(i, bool) for i in source_ids):
            self.image_ids: list[int] = [int(i) for i in source_ids]
        else:
            logger.info(
                "%s: image ids are not all integers; using positions 0..%d as image_ids", path, len(source_ids) - 1
            )
            self.image_ids = list(range(len(source_ids)))
        position_of = {repr(i): p for p, i in enumerate(source_ids)}

        self._annotations: list[list[tuple[Any, int, bool, str]]] = [[] for _ in source_ids]
        skipped_empty = 0
        skipped_crowd = 0
        for position, ann in enumerate(annotations):
            if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann:
                raise UserError(f"{path}: annotations[{position}] needs 'image_id' and 'category_id'")
            where = f"{path}: annotation id {ann.get('id', position)}"
            image_pos = position_of.get(repr(ann["image_id"]))
            if image_pos is None:
                raise UserError(f"{where} references image_id {ann['image_id']!r}, which is not in 'images'")
            try:
                class_id = cat_to_class[int(ann["category_id"])]
            except (KeyError, TypeError, ValueError) as error:
                raise UserError(
                    f"{where} has category_id {ann['category_id']!r}, which is not in 'categories' {cat_ids}"
                ) from error
            crowd = bool(ann.get("iscrowd", 0))
            segmentation = ann.get("segmentation")
            if isinstance(segmentation, list) and any(not isinstance(p, list) for p in segmentation):
                raise UserError(
                    f"{where}: polygon segmentation must be a list of coordinate lists [[x0, y0, ...], ...]"
                )
            if not segmentation or (
                isinstance(segmentation, list) and not any(isinstance(p, list) and len(p) >= 6 for p in segmentation)
            ):
                skipped_empty += 1
                continue
            if crowd and not self.include_crowd:
                skipped_crowd += 1
                continue
            if not isinstance(segmentation, (list, dict)):
                raise UserError(f"{where}: segmentation must be polygons or RLE, got {type(segmentation).__name__}")
            self._annotations[image_pos].append((segmentation, class_id, crowd, where))
        if skipped_empty:
            logger.warning("%s: skipped %d annotation(s) without a usable segmentation", path, skipped_empty)
        if skipped_crowd:
            logger.info("%s: dropped %d crowd annotation(s) (include_crowd=False)", path, skipped_crowd)
        unannotated = sum(1 for anns in self._annotations if not anns)
        logger.info(
            "%s: %d images (%d without instances), %d instances, %d classes",
            path,
            len(source_ids),
            unannotated,
            sum(len(a) for a in self._annotations),
            len(cat_ids),
        )

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.file_names)

    def num_instances(self, index: int) -> int:
        """Number of (kept) annotations of image ``index`` without decoding anything."""
        return len(self._annotations[check_index(index, len(self), "COCO dataset")])

    def __getitem__(self, index: int) -> InstanceSample:
        """Load image ``index`` and decode its masks.

        Raises:
            FileNotFoundError: if the image file is missing.
            ValueError: if the image size disagrees with the JSON or a segmentation is malformed.
        """
        index = check_index(index, len(self), "COCO dataset")
        path = self.image_root / self.file_names[index]
        image = load_rgb_image(path)
        height, width = self._sizes[index]
        if image.shape[:2] != (height, width):
            raise UserError(
                f"image {path} has size {image.shape[1]}x{image.shape[0]} (WxH) but {self.annotation_file} "
                f"says {width}x{height}"
            )
        anns = self._annotations[index]
        masks = np.zeros((len(anns), height, width), dtype=bool)  # (N, H, W)
        for slot, (segmentation, _, _, where) in enumerate(anns):
            masks[slot] = decode_segmentation(segmentation, height, width, where)
        return InstanceSample(
            image=image,
            masks=masks,
            class_ids=np.array([a[1] for a in anns], dtype=np.int64),
            is_crowd=np.array([a[2] for a in anns], dtype=bool),
            image_id=self.image_ids[index],
            file_name=self.file_names[index],
        )


def samples_to_coco_dict(
    samples: Iterable[InstanceSample],
    class_names: Sequence[str],
    *,
    category_ids: Sequence[int] | None = None,
    extra_image_fields: Mapping[int, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Build a COCO instances dictionary from samples (masks as compressed RLE).

    Args:
        samples: the images and their instances; ``image_id`` must be unique.
        class_names: name of each contiguous class index.
        category_ids: COCO category id of each class index; defaults to ``index + 1``.
        extra_image_fields: optional extra keys per image id (e.g. ``{"domain": "target"}``).

    Returns:
        A dict with ``images``, ``annotations`` (ids from 1) and ``categories``.

    Raises:
        ValueError: on duplicate image ids, a class index outside ``class_names`` or a
            ``category_ids`` of the wrong length.
    """
    if category_ids is None:
        category_ids = list(range(1, len(class_names) + 1))
    if len(category_ids) != len(class_names):
        raise ValueError(f"category_ids has {len(category_ids)} entries, class_names {len(class_names)}")
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    seen: set[int] = set()
    for sample in samples:
        if sample.image_id in seen:
            raise ValueError(f"duplicate image_id {sample.image_id}")
        seen.add(sample.image_id)
        entry: dict[str, Any] = {
            "id": int(sample.image_id),
            "file_name": sample.file_name,
            "height": sample.height,
            "width": sample.width,
        }
        if extra_image_fields and sample.image_id in extra_image_fields:
            entry.update(extra_image_fields[sample.image_id])
        images.append(entry)
        for mask, class_id, crowd in zip(sample.masks, sample.class_ids, sample.is_crowd):
            if not 0 <= int(class_id) < len(class_names):
                raise ValueError(
                    f"class id {int(class_id)} outside 0..{len(class_names) - 1} in image {sample.image_id}"
                )
            rle = encode_mask(mask)
            bbox = mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": int(sample.image_id),
                    "category_id": int(category_ids[int(class_id)]),
                    "segmentation": rle,
                    "area": int(mask.sum()),
                    "bbox": [float(v) for v in bbox],
                    "iscrowd": int(bool(crowd)),
                }
            )
    categories = [{"id": int(cid), "name": str(name)} for cid, name in zip(category_ids, class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_coco_json(path: str | os.PathLike[str], coco_dict: Mapping[str, Any]) -> Path:
    """Write a COCO dictionary atomically (temporary file in the same folder, then rename).

    Args:
        path: destination ``.json`` file; parent folders are created.
        coco_dict: the dictionary to serialise.

    Returns:
        The destination path.
    """
    return atomic_write_json(path, coco_dict, separators=(",", ":"))  # dumps uses the C encoder, dump does not
