"""The splits a run uses, opened from ``cfg.data``: labeled, unlabeled, validation (and the synthetic source).

Where each split comes from:

* **labeled** — the training annotations (``data.train_annotations`` + ``data.root`` for COCO; the dataset's
  training split for Cityscapes / ADE20K; the ``target_labeled`` pool for the synthetic dataset). Every
  annotated image stays labeled unless a subset is asked for: ``data.label_fraction < 1`` (a seeded draw) or
  ``data.split_file`` (one labeled image id per line, :func:`~reference_pipeline.data.splits.read_split_file`).
* **unlabeled** — with a labeled subset, the rest of the training images (their annotations then only feed
  diagnostics); otherwise ``data.unlabeled_annotations`` (a COCO JSON whose ``images`` are read and whose
  annotations are ignored, files under ``data.unlabeled_images`` or ``data.root``) or ``data.unlabeled_images``
  (a folder of images); otherwise empty. The synthetic dataset has its own ``target_unlabeled`` split. The
  semi-supervised stages refuse an empty unlabeled set (:func:`require_unlabeled`).
* **val** — ``data.val_annotations`` + ``data.val_images`` (COCO; its categories must equal the training
  annotations'), the dataset's validation split otherwise; at most ``data.max_val_images``.

Category ids and names, image ids and file names are the user's own: ``Datasets.category_ids`` holds the
COCO category id of each contiguous class index, and every sample carries its file's image id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UserError
from .ade20k import ADE20KInstanceDataset
from .cityscapes import CityscapesInstanceDataset
from .coco import CocoInstanceDataset
from .splits import SubsetDataset, make_label_split, read_split_file
from .structures import InstanceDataset, InstanceSample
from .synthetic import SyntheticConfig, generate_dataset, load_synthetic_split
from .unlabeled import CocoImageListDataset, ImageFolderDataset

if TYPE_CHECKING:
    from ..config import DataConfig, PipelineConfig

__all__ = [
    "ClassMappedDataset",
    "Datasets",
    "first_images",
    "load_datasets",
    "load_source_dataset",
    "load_validation",
    "require_unlabeled",
]


@dataclass
class Datasets:
    """The splits a run uses.

    Attributes:
        labeled: labeled training images ``Dˡ``.
        unlabeled: unlabeled training images ``Dᵘ`` (their annotations, if any, feed diagnostics only); may be empty.
        val: evaluation images.
        source: synthetic only: the source domain the pipeline teacher is pretrained on by default.
        class_names: class index -> name.
        category_ids: class index -> the dataset's category id (default ``index + 1``).

    Raises:
        ValueError: if ``category_ids`` and ``class_names`` differ in length.
    """

    labeled: InstanceDataset
    unlabeled: InstanceDataset
    val: InstanceDataset
    source: InstanceDataset | None
    class_names: list[str]
    category_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.category_ids:
            self.category_ids = list(range(1, len(self.class_names) + 1))
        if len(self.category_ids) != len(self.class_names):
            raise UserError(f"{len(self.category_ids)} category ids for {len(self.class_names)} class names")


def _split(dataset: InstanceDataset, fraction: float, seed: int) -> tuple[InstanceDataset, InstanceDataset]:
    ids = [int(i) for i in dataset.image_ids]
    if not ids:
        where = getattr(dataset, "annotation_file", None) or getattr(dataset, "root", "the training set")
        raise UserError(f"the labeled split is empty: {where} holds no training images")
    labeled_ids = make_label_split(ids, fraction, seed=seed)
    chosen = set(labeled_ids)
    return SubsetDataset(dataset, labeled_ids), SubsetDataset(dataset, [i for i in ids if i not in chosen])


def first_images(dataset: InstanceDataset, count: int) -> InstanceDataset:
    """The first ``count`` images of ``dataset`` (all of them when ``count`` is 0 or covers it)."""
    if count <= 0 or count >= len(dataset):
        return dataset
    return SubsetDataset(dataset, [int(i) for i in list(dataset.image_ids)[:count]])


def _labeled_part(pool: InstanceDataset, data: DataConfig) -> tuple[InstanceDataset, InstanceDataset | None]:
    """``(labeled, rest)``: the subset ``data.split_file`` / ``data.label_fraction`` asks for, or ``(pool, None)``."""
    if data.split_file:
        labeled_ids = read_split_file(data.split_file)
        known = {int(i) for i in pool.image_ids}
        unknown = [i for i in labeled_ids if i not in known]
        if unknown:
            raise UserError(
                f"{len(unknown)} image id(s) of the split file {data.split_file} are not in the training set, "
                f"e.g. {unknown[:5]}"
            )
        chosen = set(labeled_ids)
        return SubsetDataset(pool, labeled_ids), SubsetDataset(pool, [int(i) for i in pool.image_ids if int(i) not in chosen])
    if data.label_fraction < 1.0:
        return _split(pool, data.label_fraction, data.split_seed)
    return pool, None


def _unlabeled_images(data: DataConfig, labeled: InstanceDataset) -> InstanceDataset:
    """The unlabeled images the config names (a COCO JSON's images, or a folder), or an empty set."""
    names = list(labeled.class_names)
    if data.unlabeled_annotations:
        return CocoImageListDataset(data.unlabeled_annotations, data.unlabeled_images or data.root, names)
    if data.unlabeled_images:
        return ImageFolderDataset(data.unlabeled_images, names)
    return SubsetDataset(labeled, [])


def _check_same_categories(train: CocoInstanceDataset, val: CocoInstanceDataset) -> None:
    train_cats = list(zip(train.category_ids, train.class_names))
    val_cats = list(zip(val.category_ids, val.class_names))
    if train_cats != val_cats:
        raise UserError(
            f"the categories (id, name) of {val.annotation_file} {val_cats} differ from those of "
            f"{train.annotation_file} {train_cats}; both files must list the same categories"
        )


def _synthetic_root(data: DataConfig, progress: bool) -> Path:
    """The built-in dataset's folder for ``data``, generated first if it is not on disk yet."""
    source_n, labeled_n, unlabeled_n, val_n = data.synthetic_size
    synthetic = SyntheticConfig(
        image_size=data.synthetic_image_size, source_train=source_n, target_labeled=labeled_n,
        target_unlabeled=unlabeled_n, target_val=val_n, seed=data.synthetic_seed,
        object_scale=data.synthetic_object_scale,
    )
    return generate_dataset(data.root, synthetic, progress=progress)


def load_datasets(cfg: PipelineConfig, *, progress: bool = True) -> Datasets:
    """Open (and for the synthetic format, generate on first use) the run's splits.

    Raises:
        FileNotFoundError: if a dataset path is missing (the message names it and the expected layout).
        ValueError: if the labeled split would be empty, a split file names unknown ids, or the COCO
            validation categories differ from the training ones.
    """
    data = cfg.data
    source = None
    category_ids: list[int] = []
    if data.format == "synthetic":
        root = _synthetic_root(data, progress)
        pool = load_synthetic_split(root, "target_labeled")
        labeled = _labeled_part(pool, data)[0]  # the rest of the pool is not used: the target has its own unlabeled split
        unlabeled: InstanceDataset = load_synthetic_split(root, "target_unlabeled")
        val: InstanceDataset = load_synthetic_split(root, "target_val")
        source = load_synthetic_split(root, "source_train")
        category_ids = list(pool.category_ids)
    elif data.format == "coco":
        if not data.train_annotations or not data.val_annotations:
            raise UserError("data.format=coco needs data.train_annotations and data.val_annotations (COCO JSON paths)")
        train_set = CocoInstanceDataset(data.train_annotations, data.root)
        coco_val = CocoInstanceDataset(data.val_annotations, data.val_images or data.root)
        _check_same_categories(train_set, coco_val)
        labeled, rest = _labeled_part(train_set, data)
        unlabeled = rest if rest is not None else _unlabeled_images(data, labeled)
        val = coco_val
        category_ids = list(train_set.category_ids)
    elif data.format == "cityscapes":
        labeled, rest = _labeled_part(CityscapesInstanceDataset(data.root, "train"), data)
        unlabeled = rest if rest is not None else _unlabeled_images(data, labeled)
        val = CityscapesInstanceDataset(data.root, "val")
    else:
        labeled, rest = _labeled_part(ADE20KInstanceDataset(data.root, "training"), data)
        unlabeled = rest if rest is not None else _unlabeled_images(data, labeled)
        val = ADE20KInstanceDataset(data.root, "validation")
    if len(labeled) == 0:
        raise UserError(
            f"the labeled split is empty (format={data.format}, root={data.root}, label_fraction={data.label_fraction})"
        )
    class_names = list(labeled.class_names)
    return Datasets(labeled, unlabeled, first_images(val, data.max_val_images), source, class_names, category_ids)


def load_validation(cfg: PipelineConfig, *, progress: bool = True) -> InstanceDataset:
    """Only the validation split of ``cfg.data`` (at most ``max_val_images``): what evaluating a trained model needs.

    Reads no training annotations (the model's folder names its classes). The built-in dataset is generated
    first if it is not on disk yet.
    """
    data = cfg.data
    if data.format == "synthetic":
        val: InstanceDataset = load_synthetic_split(_synthetic_root(data, progress), "target_val")
    elif data.format == "coco":
        if not data.val_annotations:
            raise UserError("data.format=coco needs data.val_annotations (a COCO JSON) to evaluate")
        val = CocoInstanceDataset(data.val_annotations, data.val_images or data.root)
    elif data.format == "cityscapes":
        val = CityscapesInstanceDataset(data.root, "val")
    else:
        val = ADE20KInstanceDataset(data.root, "validation")
    return first_images(val, data.max_val_images)


def require_unlabeled(datasets: Datasets, stage: str) -> None:
    """Raise before a semi-supervised stage (``stage``: its command name) when the unlabeled set is empty.

    Raises:
        ValueError: naming the config fields that give unlabeled images.
    """
    if len(datasets.unlabeled) == 0:
        raise UserError(
            f"{stage} needs unlabeled images, but the unlabeled set is empty: set data.unlabeled_images (a folder of "
            "images) or data.unlabeled_annotations (a COCO JSON whose annotations are ignored), or keep part of the "
            "labeled images unlabeled with data.label_fraction < 1 or data.split_file"
        )


class ClassMappedDataset:
    """A dataset relabelled to other class names by name: instances of classes the target lacks are dropped.

    Used for a pipeline teacher's COCO *source*: its classes are matched to the run's (case-insensitively,
    surrounding spaces ignored); a source class the run does not have becomes background (its instances are
    removed, the images are kept); a run class the source does not have is simply never seen in pretraining.

    Args:
        base: the source dataset.
        class_names: the run's class names (the target of the mapping).

    Attributes:
        class_names: the run's class names.
        image_ids: forwarded from ``base``.
        mapping: source class index -> run class index, for the matched classes.

    Raises:
        ValueError: if no class name is shared (listing both sets of names).
    """

    def __init__(self, base: InstanceDataset, class_names: list[str]) -> None:
        target = {name.strip().lower(): index for index, name in enumerate(class_names)}
        self.mapping = {
            index: target[name.strip().lower()]
            for index, name in enumerate(base.class_names)
            if name.strip().lower() in target
        }
        if not self.mapping:
            where = getattr(base, "annotation_file", "the source dataset")
            raise UserError(
                f"no class of {where} ({list(base.class_names)}) is one of the dataset's classes ({class_names}); the "
                "pipeline teacher's source must share class names with the dataset (or use teacher_pretrain.source=none)"
            )
        self.base = base
        self.class_names = list(class_names)
        self.image_ids = list(base.image_ids)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> InstanceSample:
        sample = self.base[index]
        keep = np.array([int(c) in self.mapping for c in sample.class_ids], dtype=bool)  # (N,)
        class_ids = np.array([self.mapping[int(c)] for c in sample.class_ids[keep]], dtype=np.int64)  # (N',)
        return InstanceSample(
            image=sample.image, masks=sample.masks[keep], class_ids=class_ids, is_crowd=sample.is_crowd[keep],
            image_id=sample.image_id, file_name=sample.file_name,
        )


def load_source_dataset(source: str, source_images: str, class_names: list[str]) -> ClassMappedDataset:
    """The COCO dataset at ``source`` (images under ``source_images``, default its folder), mapped to ``class_names``.

    Raises:
        FileNotFoundError: if the JSON or the image folder is missing.
        ValueError: if no class name is shared.
    """
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"teacher_pretrain.source {source!r} is not a file: expected \"synthetic\", \"none\" or a COCO instances JSON"
        )
    return ClassMappedDataset(CocoInstanceDataset(path, source_images or path.parent), class_names)
