"""The teacher of each kind, and the pipeline teacher's pretraining (cached for later runs).

``cfg.teacher_kind`` selects one of:

* ``"foundation"`` — Grounding-DINO + SAM2 from local folders
  (:class:`~reference_pipeline.models.teacher.FoundationTeacher`);
* ``"transformers"`` — a Mask2Former / MaskFormer checkpoint folder, classes matched by name
  (:class:`~reference_pipeline.models.transformers_teacher.TransformersTeacher`);
* ``"pipeline"`` (or its first name ``"demo"``) — a larger model of the pipeline's own architectures
  (``cfg.demo_teacher``), pretrained on ``cfg.teacher_pretrain.source``: the synthetic source domain, a COCO
  dataset of the user's choice, or nothing (``"none"``: the ImageNet encoder and a fresh decoder).

Every kind is built with the same seed (:func:`pretrained_teacher`), so a resumed run re-initialises the
teacher to the same weights, and returns the same :class:`~reference_pipeline.models.outputs.SegmentationOutput`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_weights
from .config import PipelineConfig, config_to_dict
from .data.loading import Datasets, load_source_dataset
from .data.structures import InstanceDataset
from .data.synthetic import GENERATOR_VERSION
from .errors import UserError
from .models.demo import DEMO_TEACHER_NAME
from .models.student import Student, count_parameters

__all__ = [
    "PIPELINE_KINDS",
    "build_teacher",
    "demo_teacher_cache",
    "pipeline_teacher_cache",
    "pretrained_teacher",
    "pretrains_teacher",
]

logger = logging.getLogger(__name__)

#: The names of the pipeline-model teacher (``"demo"`` is its first name, kept for existing configs).
PIPELINE_KINDS = ("pipeline", "demo")
_NOT_KEYED = ("source_images", "cache_dir")  # where things are, not what they are: keyed through the source identity


def build_teacher(cfg: PipelineConfig, class_names: Sequence[str]) -> nn.Module:
    """The teacher of ``cfg.teacher_kind`` for ``class_names``, before any training of ours.

    Raises:
        FileNotFoundError: if a checkpoint folder of the chosen kind is missing (naming its files).
        ValueError: if a ``transformers`` checkpoint lacks a class of the dataset.
    """
    if cfg.teacher_kind in PIPELINE_KINDS:
        return Student(replace(cfg.demo_teacher, num_classes=len(class_names)))
    if cfg.teacher_kind == "transformers":
        from .models.transformers_teacher import TransformersTeacher

        return TransformersTeacher.from_pretrained_dir(cfg.transformers_teacher, class_names)
    from .models.teacher import FoundationTeacher

    return FoundationTeacher.from_pretrained_dirs(replace(cfg.foundation_teacher, class_names=tuple(class_names)))


def pretrains_teacher(cfg: PipelineConfig) -> bool:
    """Whether the run pretrains (and caches) a pipeline teacher: a pipeline kind with a source other than ``none``."""
    return cfg.teacher_kind in PIPELINE_KINDS and cfg.teacher_pretrain.source != "none"


def pipeline_teacher_cache(cfg: PipelineConfig, class_names: Sequence[str] = ()) -> Path:
    """Folder of the pretrained pipeline teacher, keyed by everything that shapes it.

    Synthetic source: beside the dataset (``<data.root>_demo_teacher/<digest>``), keyed as before this
    module existed, so existing caches stay valid. COCO source: beside its JSON
    (``<json stem>_pipeline_teacher/<digest>``), keyed also by the JSON's path, size and modification time,
    the image folder and ``class_names`` (the name mapping depends on them). ``teacher_pretrain.cache_dir``
    replaces the parent folder.

    Raises:
        ValueError: for ``source="none"`` (nothing is pretrained), or a COCO source without ``class_names``.
    """
    pretrain = cfg.teacher_pretrain
    if pretrain.source == "none":
        raise UserError("teacher_pretrain.source=none: the pipeline teacher is not pretrained, so it has no cache")
    stage = {k: v for k, v in config_to_dict(pretrain).items() if k not in (*_NOT_KEYED, "source")}
    key: dict[str, object] = {
        "teacher": config_to_dict(cfg.demo_teacher),
        "pretrain": stage,
        "criterion": config_to_dict(cfg.criterion),
        "image_size": list(cfg.data.image_size),
        "seed": cfg.seed,
    }
    if pretrain.source == "synthetic":
        key["data"] = [cfg.data.synthetic_size, cfg.data.synthetic_image_size, cfg.data.synthetic_seed,
                       cfg.data.synthetic_object_scale, GENERATOR_VERSION]
        parent = Path(cfg.data.root).parent / f"{Path(cfg.data.root).name}_demo_teacher"
    else:
        if not class_names:
            raise UserError("the cache of a pipeline teacher pretrained on a COCO source is keyed by the class names")
        source = Path(pretrain.source).resolve()
        stat = source.stat()
        images = Path(pretrain.source_images or source.parent).resolve()
        key["source"] = {"path": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "images": str(images)}
        key["classes"] = list(class_names)
        parent = source.parent / f"{source.stem}_pipeline_teacher"
    if pretrain.cache_dir:
        parent = Path(pretrain.cache_dir)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return parent / digest


def demo_teacher_cache(cfg: PipelineConfig) -> Path:
    """:func:`pipeline_teacher_cache` of a synthetic-source pipeline teacher (the demo's)."""
    return pipeline_teacher_cache(cfg)


def _source_dataset(cfg: PipelineConfig, datasets: Datasets) -> InstanceDataset:
    """What the pipeline teacher is pretrained on, in the run's classes."""
    source = cfg.teacher_pretrain.source
    if source == "synthetic":
        if datasets.source is None:
            raise UserError(
                "teacher_pretrain.source=synthetic pretrains on the built-in dataset's source domain and needs "
                "data.format=synthetic; for your own dataset set teacher_pretrain.source=none (no pretraining) or the "
                "path of a COCO instances JSON (with teacher_pretrain.source_images), or use teacher_kind=transformers"
            )
        return datasets.source
    return load_source_dataset(source, cfg.teacher_pretrain.source_images, list(datasets.class_names))


def pretrained_teacher(cfg: PipelineConfig, datasets: Datasets, *, progress: bool = True) -> tuple[nn.Module, float]:
    """The teacher before adaptation, and the seconds spent pretraining it now (0 when cached, loaded or none).

    The teacher is built under ``torch.manual_seed(cfg.seed)`` (the global generator is restored after), so
    its randomly initialised parts are the same in every process of a run. A pipeline teacher with a source
    is pretrained on it once (supervised set criterion only, ``cfg.teacher_pretrain``) and cached
    (:func:`pipeline_teacher_cache`); later runs load it. It stands in for a foundation model; it is not one.

    Raises:
        ValueError: for a synthetic source without the synthetic dataset, or a COCO source sharing no class.
        FileNotFoundError: for a missing source or checkpoint folder.
    """
    from . import stages  # the training loop of a stage (stages imports this module)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        teacher = build_teacher(cfg, datasets.class_names)
    if cfg.teacher_kind not in PIPELINE_KINDS:
        return teacher, 0.0
    logger.info("teacher: %s (%.2f M parameters)", DEMO_TEACHER_NAME, count_parameters(teacher) / 1e6)
    if not pretrains_teacher(cfg):
        logger.info("pipeline teacher: no pretraining (teacher_pretrain.source=none): adaptation starts from ImageNet")
        return teacher, 0.0
    source = _source_dataset(cfg, datasets)
    cache = pipeline_teacher_cache(cfg, datasets.class_names)
    if (cache / stages.WEIGHTS_FILE).is_file() and (cache / "result.json").is_file():
        load_weights(teacher, cache / stages.WEIGHTS_FILE)
        logger.info("pipeline teacher: loaded its pretraining on %s from %s", cfg.teacher_pretrain.source, cache)
        return teacher, 0.0
    logger.info("pipeline teacher: pretraining on %s (cached in %s for later runs)", cfg.teacher_pretrain.source, cache)
    source_only = Datasets(source, datasets.unlabeled, datasets.val, None, list(datasets.class_names),
                           list(datasets.category_ids))
    pretrain_cfg = replace(cfg, run_dir=str(cache.parent))
    result = stages.train_stage(cache.name, teacher, pretrain_cfg, cfg.teacher_pretrain, source_only,
                                progress=progress, seed_offset=100)
    return teacher, result.wall_time
