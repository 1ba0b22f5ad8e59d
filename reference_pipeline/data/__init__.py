"""Datasets, label splits and weak / strong views for the reference pipeline.

Every reader returns :class:`~reference_pipeline.data.structures.InstanceSample` objects:

* :mod:`~reference_pipeline.data.synthetic` — the embedded procedural default dataset
  (written in COCO format, read back with the COCO reader);
* :mod:`~reference_pipeline.data.coco` — any COCO-format instance dataset;
* :mod:`~reference_pipeline.data.cityscapes` — Cityscapes ``leftImg8bit`` / ``gtFine``;
* :mod:`~reference_pipeline.data.ade20k` — ADE20K RG-encoded instance PNGs;
* :mod:`~reference_pipeline.data.splits` — labeled-fraction splits as ``perc_*.txt`` files;
* :mod:`~reference_pipeline.data.unlabeled` — unlabeled images as a folder or a COCO image list;
* :mod:`~reference_pipeline.data.loading` — the run's splits from its config (``load_datasets``);
* :mod:`~reference_pipeline.data.augment` — weak / strong views with their geometry (imports
  torch, so it is loaded lazily on first access).
"""

from __future__ import annotations

import importlib
from typing import Any

from .ade20k import ADE20K_INSTANCE_CLASSES, ADE20KInstanceDataset, mask2former_ade20k_json
from .cityscapes import CITYSCAPES_THING_CLASSES, CityscapesInstanceDataset
from .coco import CocoInstanceDataset, decode_segmentation, encode_mask, samples_to_coco_dict, write_coco_json
from .loading import Datasets, load_datasets
from .splits import (
    LabelSplit,
    SubsetDataset,
    make_label_split,
    make_label_splits,
    read_split_file,
    split_file_name,
    write_label_splits,
    write_split_file,
)
from .structures import InstanceDataset, InstanceSample, instance_id_map, load_rgb_image
from .synthetic import (
    SPLITS,
    THING_CLASSES,
    SyntheticConfig,
    generate_dataset,
    load_synthetic_split,
    read_manifest,
    render_scene,
    synthetic_sample,
    touching_same_class_pairs,
)
from .unlabeled import CocoImageListDataset, ImageFolderDataset

_LAZY = {
    "View": "augment",
    "WeakViewConfig": "augment",
    "StrongViewConfig": "augment",
    "TwoViewTransform": "augment",
    "weak_view": "augment",
    "strong_view": "augment",
    "collate_views": "augment",
}

__all__ = [
    "ADE20KInstanceDataset",
    "ADE20K_INSTANCE_CLASSES",
    "CITYSCAPES_THING_CLASSES",
    "CityscapesInstanceDataset",
    "CocoImageListDataset",
    "CocoInstanceDataset",
    "Datasets",
    "ImageFolderDataset",
    "InstanceDataset",
    "InstanceSample",
    "LabelSplit",
    "SPLITS",
    "SubsetDataset",
    "SyntheticConfig",
    "THING_CLASSES",
    "decode_segmentation",
    "encode_mask",
    "generate_dataset",
    "instance_id_map",
    "load_datasets",
    "load_rgb_image",
    "load_synthetic_split",
    "make_label_split",
    "make_label_splits",
    "mask2former_ade20k_json",
    "read_manifest",
    "read_split_file",
    "render_scene",
    "samples_to_coco_dict",
    "split_file_name",
    "synthetic_sample",
    "touching_same_class_pairs",
    "write_coco_json",
    "write_label_splits",
    "write_split_file",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    """Load :mod:`~reference_pipeline.data.augment` (torch) only when one of its names is used."""
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
