"""The three stages of the method, each one call of the same training loop with different data and weights.

The unified objective (paper Eq. 3) on a batch of labeled data ``Dˡ`` and pseudo-labeled data ``Dᵘ``:

.. math::

    J(θ; Dˡ, Dᵘ, λ_{semi}, λ_{pxl}) = L_{sup}(Dˡ) + λ_{semi} L_{semi}(Dᵘ) + λ_{pxl} L_{pxl}(Dˡ ∪ Dᵘ)

1. **adapt-teacher**: fine-tune the pretrained teacher on ``Dˡ`` (``J(θ; Dˡ, ∅, λ_pxl)``); pseudo-label
   ``Dᵘ`` with it; re-initialise from the pretrained weights and train on ``Dˡ ∪ Dᵘ``.
2. **distill**: pseudo-label ``Dᵘ`` with the adapted (frozen) teacher; train the student with ``J``.
3. **refine**: fine-tune the student on ``Dˡ`` only (``λ_semi = λ_pxl = 0``).

How one step computes ``J`` (:class:`Objective`): the *anchor* views — weak views of labeled images
and strong views of pseudo-labeled ones — go through the model with gradients; ``L_sup`` and
``L_semi`` are the set criterion on them (pseudo-labels are made on the unaugmented image and
follow the strong view's geometry). For ``L_pxl``, the *other* view of each image goes through the
model without gradients (the library's default already detaches that branch, so it costs one
forward pass, not a forward and a backward), its embeddings are warped onto the anchor view's grid
with :func:`instcontrast.views.align_views`, and the library's instance-aware loss samples negatives
from the model's own detached mask/class predictions on the anchor view, as in the paper.

Every stage writes into ``run_dir/<stage>/`` (checkpoints, ``metrics.jsonl``, ``model.safetensors``)
and reads the previous stage's ``model.safetensors``, so stages can be run one by one or all at once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from instcontrast import InstanceAwarePixelContrast, PixelMemoryBank
from instcontrast.views import ViewGeometry

from .atomic import atomic_write_text
from .checkpoint import check_writable, load_weights, save_weights
from .config import TrainConfig
from .data import CityscapesInstanceDataset, CocoInstanceDataset, SubsetDataset, make_label_split
from .data.ade20k import ADE20KInstanceDataset
from .data.augment import StrongViewConfig, TwoViewTransform, WeakViewConfig
from .data.semi import (
    PseudoLabeledDataset,
    SemiBatch,
    SemiSupervisedDataset,
    TwoViewDataset,
    collate_semi,
)
from .data.structures import InstanceDataset
from .data.synthetic import GENERATOR_VERSION, SyntheticConfig, generate_dataset, load_synthetic_split
from .engine import _barrier, _resolve_device, distributed_info, train
from .evaluate import CocoMaskEvaluator
from .inference import evaluate_model, predict_dataset
from .losses import SetCriterion, pixel_contrast_term, unified_objective
from .models.demo import DEMO_TEACHER_NAME
from .models.outputs import InstanceTargets, SegmentationOutput
from .models.student import Student, count_parameters
from .pipeline_config import ContrastConfig, PipelineConfig, StageConfig
from .pseudo_labels import PseudoInstances, pseudo_label, read_pseudo_labels, write_pseudo_labels

__all__ = [
    "Datasets",
    "Objective",
    "StageResult",
    "adapt_teacher",
    "build_contrast",
    "build_student",
    "build_teacher",
    "distill",
    "evaluate_stage",
    "load_datasets",
    "load_stage_model",
    "make_pseudo_labels",
    "pretrained_teacher",
    "refine",
    "supervised_baseline",
    "train_stage",
]

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"


# ----------------------------------------------------------------------------------------- data
@dataclass
class Datasets:
    """The splits a run uses.

    Attributes:
        labeled: labeled training images ``Dˡ``.
        unlabeled: unlabeled training images ``Dᵘ`` (their annotations, if any, feed diagnostics only).
        val: evaluation images.
        source: synthetic only: the source domain the demo teacher is pretrained on.
        class_names: class index -> name.
    """

    labeled: InstanceDataset
    unlabeled: InstanceDataset
    val: InstanceDataset
    source: InstanceDataset | None
    class_names: list[str]


def _split(dataset: InstanceDataset, fraction: float, seed: int) -> tuple[InstanceDataset, InstanceDataset]:
    ids = [int(i) for i in dataset.image_ids]
    if not ids:
        where = getattr(dataset, "annotation_file", None) or getattr(dataset, "root", "the training set")
        raise ValueError(f"the labeled split is empty: {where} holds no training images")
    labeled_ids = make_label_split(ids, fraction, seed=seed)
    chosen = set(labeled_ids)
    return SubsetDataset(dataset, labeled_ids), SubsetDataset(dataset, [i for i in ids if i not in chosen])


def _first(dataset: InstanceDataset, count: int) -> InstanceDataset:
    if count <= 0 or count >= len(dataset):
        return dataset
    return SubsetDataset(dataset, [int(i) for i in list(dataset.image_ids)[:count]])


def load_datasets(cfg: PipelineConfig, *, progress: bool = True) -> Datasets:
    """Open (and for the synthetic format, generate on first use) the run's splits.

    Raises:
        FileNotFoundError: if a dataset path is missing (the message names it and the expected layout).
        ValueError: if the labeled split would be empty.
    """
    data = cfg.data
    source = None
    if data.format == "synthetic":
        source_n, labeled_n, unlabeled_n, val_n = data.synthetic_size
        synthetic = SyntheticConfig(
            image_size=data.synthetic_image_size, source_train=source_n, target_labeled=labeled_n,
            target_unlabeled=unlabeled_n, target_val=val_n, seed=data.synthetic_seed,
            object_scale=data.synthetic_object_scale,
        )
        root = generate_dataset(data.root, synthetic, progress=progress)
        pool = load_synthetic_split(root, "target_labeled")
        labeled = _split(pool, data.label_fraction, data.split_seed)[0] if data.label_fraction < 1.0 else pool
        unlabeled = load_synthetic_split(root, "target_unlabeled")
        val = load_synthetic_split(root, "target_val")
        source = load_synthetic_split(root, "source_train")
    elif data.format == "coco":
        if not data.train_annotations or not data.val_annotations:
            raise ValueError("data.format=coco needs data.train_annotations and data.val_annotations (COCO JSON paths)")
        train_set = CocoInstanceDataset(data.train_annotations, data.root)
        labeled, unlabeled = _split(train_set, data.label_fraction, data.split_seed)
        val = CocoInstanceDataset(data.val_annotations, data.val_images or data.root)
    elif data.format == "cityscapes":
        labeled, unlabeled = _split(CityscapesInstanceDataset(data.root, "train"), data.label_fraction, data.split_seed)
        val = CityscapesInstanceDataset(data.root, "val")
    else:
        labeled, unlabeled = _split(ADE20KInstanceDataset(data.root, "training"), data.label_fraction, data.split_seed)
        val = ADE20KInstanceDataset(data.root, "validation")
    if len(labeled) == 0:
        raise ValueError(
            f"the labeled split is empty (format={data.format}, root={data.root}, label_fraction={data.label_fraction})"
        )
    return Datasets(labeled, unlabeled, _first(val, data.max_val_images), source, list(labeled.class_names))


def view_transform(cfg: PipelineConfig) -> TwoViewTransform:
    """Weak view (flip + resize) and strong view (crop + flip + photometric) at ``data.image_size``."""
    size = tuple(cfg.data.image_size)
    return TwoViewTransform(WeakViewConfig(output_size=size), StrongViewConfig(output_size=size))


# --------------------------------------------------------------------------------------- models
def build_student(cfg: PipelineConfig, num_classes: int) -> Student:
    """The student described by ``cfg.student`` with ``num_classes`` classes."""
    return Student(_with_classes(cfg.student, num_classes))


def _with_classes(config: Any, num_classes: int) -> Any:
    return replace(config, num_classes=num_classes)


def build_teacher(cfg: PipelineConfig, class_names: Sequence[str]) -> nn.Module:
    """The teacher (untrained demo model, or the foundation ensemble loaded from local weights)."""
    if cfg.teacher_kind == "demo":
        return Student(_with_classes(cfg.demo_teacher, len(class_names)))
    from .models.teacher import FoundationTeacher

    return FoundationTeacher.from_pretrained_dirs(replace(cfg.foundation_teacher, class_names=tuple(class_names)))


def build_contrast(config: ContrastConfig, embedding_dim: int) -> InstanceAwarePixelContrast:
    """The library's loss module for the pixel contrastive term."""
    bank = PixelMemoryBank(config.memory_bank, embedding_dim) if config.memory_bank > 0 else None
    return InstanceAwarePixelContrast(
        temperature=config.temperature,
        num_negatives=config.num_negatives,
        strategy=config.strategy,
        score=config.score,
        loss=config.loss,
        memory_bank=bank,
    )


# ------------------------------------------------------------------------------------ objective
def _slice_output(output: SegmentationOutput, start: int, stop: int) -> SegmentationOutput:
    return SegmentationOutput(
        mask_logits=output.mask_logits[start:stop],
        class_logits=output.class_logits[start:stop],
        pixel_embeddings=output.pixel_embeddings[start:stop],
        aux_outputs=[{key: value[start:stop] for key, value in aux.items()} for aux in output.aux_outputs],
    )


def _cat_geometry(parts: Sequence[ViewGeometry], device: torch.device) -> ViewGeometry:
    return ViewGeometry(
        boxes=torch.cat([g.boxes for g in parts]).to(device), flips=torch.cat([g.flips for g in parts]).to(device)
    )


class Objective:
    """``J = L_sup + λ_semi·L_semi + λ_pxl·L_pxl`` on a :class:`~reference_pipeline.data.semi.SemiBatch`.

    Args:
        criterion: the set criterion (Hungarian matching, mask BCE + dice, class CE).
        contrast: the library's instance-aware contrastive loss, or ``None`` (no pixel term).
        lambda_semi: weight of the pseudo-label term.
        lambda_pxl: weight of the pixel contrastive term.
    """

    def __init__(
        self, criterion: SetCriterion, contrast: InstanceAwarePixelContrast | None, lambda_semi: float, lambda_pxl: float
    ) -> None:
        self.criterion = criterion
        self.contrast = contrast if lambda_pxl > 0 else None
        self.lambda_semi = float(lambda_semi)
        self.lambda_pxl = float(lambda_pxl)

    def __call__(self, model: nn.Module, batch: SemiBatch) -> tuple[Tensor, dict[str, float]]:
        """One step's objective and its logged terms (each loss term, FNR, margin, acceptance)."""
        device = next(model.parameters()).device
        labeled, unlabeled = batch.labeled, batch.unlabeled
        num_labeled = len(labeled)
        anchor_images = [labeled.weak.images]
        if unlabeled is not None:
            anchor_images.append(unlabeled.strong.images)
        output = model(torch.cat(anchor_images).to(device))  # anchors: (B_l + B_u, ...)
        sup = self.criterion(_slice_output(output, 0, num_labeled), _to(labeled.targets("weak"), device))
        semi = None
        if unlabeled is not None and self.lambda_semi > 0:
            semi = self.criterion(
                _slice_output(output, num_labeled, output.mask_logits.shape[0]), _to(unlabeled.targets("strong"), device)
            )
        pxl, stats = None, {}
        if self.contrast is not None:
            contrast_out = self._pixel_term(model, output, batch, device)
            pxl = contrast_out.loss
            stats = _contrast_stats(contrast_out.stats)
        loss, logs = unified_objective(sup, semi, pxl, self.lambda_semi, self.lambda_pxl)
        logs.update(stats)
        return loss, logs

    def _pixel_term(self, model: nn.Module, output: SegmentationOutput, batch: SemiBatch, device: torch.device) -> Any:
        labeled, unlabeled = batch.labeled, batch.unlabeled
        target_images = [labeled.strong.images]
        anchor_geometry, target_geometry = [labeled.weak.geometry], [labeled.strong.geometry]
        instance_ids = [labeled.weak_ids]
        if unlabeled is not None:
            target_images.append(unlabeled.weak.images)
            anchor_geometry.append(unlabeled.strong.geometry)
            target_geometry.append(unlabeled.weak.geometry)
            instance_ids.append(unlabeled.strong_ids)
        core = getattr(model, "module", model)  # the DDP wrapper's forward is for gradient passes only
        with torch.no_grad():
            target = core(torch.cat(target_images).to(device))  # the other view of each image
        return pixel_contrast_term(
            self.contrast,  # type: ignore[arg-type]
            output,
            target,
            _cat_geometry(anchor_geometry, device),
            _cat_geometry(target_geometry, device),
            instance_ids=torch.cat(instance_ids).to(device),
        )


def _to(targets: list[InstanceTargets], device: torch.device) -> list[InstanceTargets]:
    return [InstanceTargets(t.masks.to(device), t.class_ids.to(device)) for t in targets]


def _contrast_stats(stats: Any) -> dict[str, float]:
    return {
        "margin": float(stats.margin),
        "acceptance": float(stats.acceptance),
        "fallbacks": float(stats.fallbacks),
        "fnr": float(stats.fnr) if stats.fnr is not None else float("nan"),  # same keys every step
    }


# ------------------------------------------------------------------------------- running a stage
@dataclass
class StageResult:
    """What a finished stage leaves behind.

    Attributes:
        name: the stage's folder name under ``run_dir``.
        weights: path of the final weights.
        wall_time: seconds spent training (summed over resumed sessions).
        steps: optimizer steps.
        final_logs: the last logged training terms.
    """

    name: str
    weights: Path
    wall_time: float
    steps: int
    final_logs: dict[str, float]


def _prob_dim(strategy: str, num_queries: int, num_classes: int) -> int:
    """Width of the fused probability rows the memory bank stores for ``strategy``."""
    return {"fusion": num_queries + num_classes + 1, "mask": num_queries, "class": num_classes + 1}.get(strategy, 1)


def _embedding_dim(model: nn.Module, images: Tensor) -> tuple[int, int]:
    """(embedding dim, num queries) of a model, from one tiny forward pass."""
    with torch.no_grad():
        output = getattr(model, "module", model)(images)
    return int(output.pixel_embeddings.shape[1]), int(output.mask_logits.shape[1])


def train_stage(
    name: str,
    model: nn.Module,
    cfg: PipelineConfig,
    stage: StageConfig,
    datasets: Datasets,
    *,
    pseudo: dict[int, PseudoInstances] | None = None,
    resume: bool = True,
    progress: bool = True,
    seed_offset: int = 0,
) -> StageResult:
    """Train ``model`` for one stage with the unified objective (one call of :func:`~reference_pipeline.engine.train`).

    A stage whose ``model.safetensors`` exists is not re-run: its weights are loaded (``resume``).

    Args:
        name: folder under ``run_dir``.
        model: the model to train (student or teacher), modified in place.
        cfg: the run's configuration.
        stage: this stage's loop settings and loss weights.
        datasets: the run's splits.
        pseudo: pseudo-instances of the unlabeled images (``None``: labeled data only).
        resume: continue from the stage's latest checkpoint / skip a finished stage.
        progress: show progress bars.
        seed_offset: added to the seeds so different stages draw different augmentations.
    """
    run = cfg.run_path / name
    final = run / WEIGHTS_FILE
    result_file = run / "result.json"
    if resume and final.is_file() and result_file.is_file():
        load_weights(model, final)
        data = json.loads(result_file.read_text())
        logger.info("stage %s already finished: loaded %s", name, final)
        return StageResult(name, final, data["wall_time"], data["steps"], data["final_logs"])
    seed = cfg.seed + seed_offset
    transform = view_transform(cfg)
    labeled = TwoViewDataset(datasets.labeled, transform, seed)
    uses_unlabeled = pseudo is not None and (stage.lambda_semi > 0 or stage.lambda_pxl > 0)
    unlabeled = TwoViewDataset(PseudoLabeledDataset(datasets.unlabeled, pseudo), transform, seed + 1) if uses_unlabeled else None
    train_set = SemiSupervisedDataset(labeled, unlabeled)
    num_classes = len(datasets.class_names)
    contrast = None
    if stage.lambda_pxl > 0:
        dim, queries = _embedding_dim(model, torch.zeros(1, 3, *cfg.data.image_size))
        contrast = build_contrast(cfg.contrast, dim)
        if cfg.contrast.memory_bank > 0:
            contrast.memory_bank = PixelMemoryBank(
                dim, _prob_dim(cfg.contrast.strategy, queries, num_classes), size=cfg.contrast.memory_bank
            )
    criterion = SetCriterion(num_classes, replace(cfg.criterion, mask_stride=mask_stride_of(model, cfg.criterion.mask_stride)))
    objective = Objective(criterion, contrast, stage.lambda_semi, stage.lambda_pxl)
    train_config = _with_seed(stage.train, seed)

    def evaluate_fn(trained: nn.Module) -> dict[str, float]:
        return evaluate_model(
            trained, datasets.val, image_size=tuple(cfg.data.image_size), batch_size=cfg.eval.batch_size,
            top_k=cfg.eval.top_k, progress=False,
        )

    core = getattr(model, "module", model)
    groups = core.parameter_groups() if hasattr(core, "parameter_groups") else None
    extra_state = {"memory_bank": contrast.memory_bank} if contrast is not None and contrast.memory_bank is not None else None
    outcome = train(
        model, objective, train_set, train_config, run, collate_fn=collate_semi,
        param_groups=groups, evaluate_fn=evaluate_fn if train_config.eval_every > 0 else None,
        extra_state=extra_state, resume=resume, desc=name, progress=progress,
    )
    logs = {k: float(v) for k, v in outcome.train_metrics.items() if isinstance(v, (int, float))}
    result = StageResult(name, final, float(outcome.wall_time), int(outcome.step), logs)
    info = distributed_info()
    if info.is_main:  # one writer; the others wait so the next stage finds the weights
        save_weights(getattr(model, "module", model), final)
        atomic_write_text(result_file, json.dumps({"wall_time": result.wall_time, "steps": result.steps,
                                                    "final_logs": result.final_logs}))
    _barrier(info)
    return result


def mask_stride_of(model: nn.Module, default: int | None = 4) -> int | None:
    """Output stride of a model's mask logits: its ``mask_stride`` attribute (DDP unwrapped), else ``default``."""
    return getattr(getattr(model, "module", model), "mask_stride", default)


def _with_seed(train_config: TrainConfig, seed: int) -> TrainConfig:
    return replace(train_config, seed=seed)


# ---------------------------------------------------------------------------------- pseudo-labels
def make_pseudo_labels(
    teacher: nn.Module, cfg: PipelineConfig, datasets: Datasets, path: Path, *, progress: bool = True
) -> dict[int, PseudoInstances]:
    """Pseudo-label the unlabeled split with ``teacher`` (cached in ``path`` as COCO-style RLE JSON).

    The pseudo-labels are kept as RLE in memory too (:class:`~reference_pipeline.pseudo_labels.PseudoInstances`);
    training decodes one sample's masks when it draws it. Also writes ``<path stem>_quality.json``: counts per image and, where the unlabeled images have
    ground truth (the synthetic dataset keeps it for diagnostics), the pseudo-labels' mask AP.
    """
    info = distributed_info()
    if not path.is_file() and not info.is_main:
        # rank 0 labels the unlabeled split (hours at full scale: longer than a collective's timeout, so the
        # others watch for its file instead of waiting in a barrier), then they read it
        _wait_for_file(path)
        _barrier(info)
    if path.is_file():
        return read_pseudo_labels(path)
    pseudo: dict[int, PseudoInstances] = {}
    label_config = replace(cfg.pseudo_labels, mask_stride=mask_stride_of(teacher, cfg.pseudo_labels.mask_stride))
    evaluator = CocoMaskEvaluator(datasets.class_names)  # streams RLE only: no image is kept in memory
    has_ground_truth = False  # the synthetic set keeps the unlabeled images' annotations for diagnostics
    for prediction in predict_dataset(
        teacher, datasets.unlabeled, image_size=tuple(cfg.data.image_size), batch_size=cfg.eval.batch_size,
        progress=progress, desc=f"pseudo-label ({path.stem})",
    ):
        sample = prediction.sample
        labels = pseudo_label(prediction.mask_logits, prediction.class_logits, (sample.height, sample.width),
                              label_config, input_size=tuple(cfg.data.image_size))  # logits of the resized input
        pseudo[int(sample.image_id)] = labels
        evaluator.add(sample, labels.to_predictions())
        has_ground_truth = has_ground_truth or sample.num_instances > 0
    counts = [p.num_instances for p in pseudo.values()]
    quality: dict[str, float] = {
        "images": float(len(counts)),
        "instances_per_image": float(np.mean(counts)) if counts else 0.0,
        "empty_images": float(sum(c == 0 for c in counts)),
    }
    if has_ground_truth:
        quality.update(evaluator.compute())  # the pseudo-labels' mask AP against ground truth
    logger.info("pseudo-labels %s: %s", path.name, quality)
    write_pseudo_labels(path, pseudo)
    atomic_write_text(path.with_name(f"{path.stem}_quality.json"), json.dumps(quality, indent=2))
    _barrier(info)
    return pseudo


def _wait_for_file(path: Path, poll_s: float = 2.0) -> None:
    """Wait until ``path`` exists (written atomically by rank 0; torchrun stops this rank if rank 0 fails)."""
    while not path.is_file():
        time.sleep(poll_s)


# ----------------------------------------------------------------------------------- the stages
def _stage_path(cfg: PipelineConfig, name: str) -> Path:
    return cfg.run_path / name / WEIGHTS_FILE


def _require(path: Path, produced_by: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `python -m reference_pipeline {produced_by}` first (same --config)")
    return path


def demo_teacher_cache(cfg: PipelineConfig) -> Path:
    """Folder of the pretrained demo teacher, beside the dataset, keyed by everything that shapes it."""
    import hashlib

    from .config import config_to_dict

    key = {
        "teacher": config_to_dict(cfg.demo_teacher),
        "pretrain": config_to_dict(cfg.teacher_pretrain),
        "criterion": config_to_dict(cfg.criterion),
        "image_size": list(cfg.data.image_size),
        "data": [cfg.data.synthetic_size, cfg.data.synthetic_image_size, cfg.data.synthetic_seed,
                 cfg.data.synthetic_object_scale, GENERATOR_VERSION],
        "seed": cfg.seed,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(cfg.data.root).parent / f"{Path(cfg.data.root).name}_demo_teacher" / digest


def pretrained_teacher(cfg: PipelineConfig, datasets: Datasets, *, progress: bool = True) -> tuple[nn.Module, float]:
    """The teacher before adaptation, and the seconds spent pretraining it now (0 when cached / loaded).

    ``teacher_kind="demo"``: the demo teacher is pretrained on the synthetic ``source`` domain once
    (supervised set criterion only) and cached beside the dataset, so later runs load it. It stands in
    for a foundation model; it is not one. ``"foundation"``: Grounding-DINO + SAM2 from local weights.
    """
    teacher = build_teacher(cfg, datasets.class_names)
    if cfg.teacher_kind != "demo":
        return teacher, 0.0
    if datasets.source is None:
        raise ValueError("teacher_kind=demo needs the synthetic dataset's source domain (data.format=synthetic)")
    cache = demo_teacher_cache(cfg)
    logger.info("teacher: %s (%.2f M parameters)", DEMO_TEACHER_NAME, count_parameters(teacher) / 1e6)
    if (cache / WEIGHTS_FILE).is_file() and (cache / "result.json").is_file():
        load_weights(teacher, cache / WEIGHTS_FILE)
        logger.info("demo teacher: loaded its source-domain pretraining from %s", cache)
        return teacher, 0.0
    logger.info("demo teacher: pretraining on the source domain (cached in %s for later runs)", cache)
    source_only = Datasets(datasets.source, datasets.unlabeled, datasets.val, None, datasets.class_names)
    pretrain_cfg = _at_run_dir(cfg, cache.parent)
    result = train_stage(cache.name, teacher, pretrain_cfg, cfg.teacher_pretrain, source_only, progress=progress,
                         seed_offset=100)
    return teacher, result.wall_time


def _at_run_dir(cfg: PipelineConfig, run_dir: Path) -> PipelineConfig:
    return replace(cfg, run_dir=str(run_dir))


def adapt_teacher(cfg: PipelineConfig, datasets: Datasets, *, resume: bool = True, progress: bool = True) -> list[StageResult]:
    """Stage 1: fine-tune on ``Dˡ``, pseudo-label ``Dᵘ``, re-initialise and self-train on ``Dˡ ∪ Dᵘ``.

    Writes ``teacher_finetune/``, ``pseudo_labels_finetuned.json`` and ``teacher_adapted/``.
    """
    check_writable(cfg.run_path)
    teacher, _ = pretrained_teacher(cfg, datasets, progress=progress)
    initial = {k: v.clone() for k, v in teacher.state_dict().items()}
    finetune = train_stage("teacher_finetune", teacher, cfg, cfg.teacher_finetune, datasets, resume=resume,
                           progress=progress, seed_offset=1)
    pseudo = make_pseudo_labels(teacher, cfg, datasets, cfg.run_path / "pseudo_labels_finetuned.json", progress=progress)
    teacher.load_state_dict(initial)  # re-initialise from the pretrained teacher (paper Sec. 3.3)
    adapted = train_stage("teacher_adapted", teacher, cfg, cfg.teacher_self_train, datasets, pseudo=pseudo,
                          resume=resume, progress=progress, seed_offset=2)
    return [finetune, adapted]


def distill(cfg: PipelineConfig, datasets: Datasets, *, resume: bool = True, progress: bool = True) -> StageResult:
    """Stage 2: pseudo-label ``Dᵘ`` with the frozen adapted teacher and train the student with ``J``.

    Everything the stage reads or writes is checked first (the adapted teacher, the teacher's and the
    student's pretrained weights, a writable run directory), not after hours of pseudo-labelling.
    """
    check_writable(cfg.run_path)
    adapted = _require(_stage_path(cfg, "teacher_adapted"), "adapt-teacher")
    student = build_student(cfg, len(datasets.class_names))  # reads student.encoder_weights
    teacher = build_teacher(cfg, datasets.class_names)
    load_weights(teacher, adapted)
    teacher.requires_grad_(False).to(_resolve_device(cfg.distill.train.device, distributed_info()))  # label on the GPU
    pseudo = make_pseudo_labels(teacher, cfg, datasets, cfg.run_path / "pseudo_labels_adapted.json", progress=progress)
    del teacher
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the student trains in the teacher's memory
    return train_stage("student_distill", student, cfg, cfg.distill, datasets, pseudo=pseudo, resume=resume,
                       progress=progress, seed_offset=3)


def refine(cfg: PipelineConfig, datasets: Datasets, *, resume: bool = True, progress: bool = True) -> StageResult:
    """Stage 3: fine-tune the distilled student on ``Dˡ`` only."""
    check_writable(cfg.run_path)
    distilled = _require(_stage_path(cfg, "student_distill"), "distill")
    student = build_student(cfg, len(datasets.class_names))
    load_weights(student, distilled)
    return train_stage("student_refine", student, cfg, cfg.refine, datasets, resume=resume, progress=progress,
                       seed_offset=4)


def supervised_baseline(
    cfg: PipelineConfig, datasets: Datasets, *, resume: bool = True, progress: bool = True
) -> StageResult:
    """The supervised-only student: labeled data only, from the same initialisation as the distilled one."""
    student = build_student(cfg, len(datasets.class_names))
    return train_stage("student_supervised", student, cfg, cfg.baseline, datasets, resume=resume, progress=progress,
                       seed_offset=5)


#: Model of each evaluable stage: (folder, "student" or "teacher").
EVALUABLE = {
    "teacher_zero_shot": "teacher",
    "teacher_finetune": "teacher",
    "teacher_adapted": "teacher",
    "student_distill": "student",
    "student_refine": "student",
    "student_supervised": "student",
}


def load_stage_model(cfg: PipelineConfig, datasets: Datasets, stage: str) -> nn.Module:
    """The trained model of ``stage`` (one of :data:`EVALUABLE`)."""
    if stage not in EVALUABLE:
        raise ValueError(f"unknown stage {stage!r}; expected one of {list(EVALUABLE)}")
    if stage == "teacher_zero_shot":
        return pretrained_teacher(cfg, datasets, progress=False)[0]
    if EVALUABLE[stage] == "teacher":
        model = build_teacher(cfg, datasets.class_names)
    else:
        model = build_student(cfg, len(datasets.class_names))
    load_weights(model, _require(_stage_path(cfg, stage), "demo"))
    return model


def evaluate_stage(cfg: PipelineConfig, datasets: Datasets, stage: str, *, progress: bool = True) -> dict[str, float]:
    """Mask AP / AP50 on the validation split, parameters and latency per image of ``stage``'s model (GPU if any)."""
    model = load_stage_model(cfg, datasets, stage).to(_resolve_device(cfg.refine.train.device, distributed_info()))
    metrics = evaluate_model(
        model, datasets.val, image_size=tuple(cfg.data.image_size), batch_size=cfg.eval.batch_size,
        top_k=cfg.eval.top_k, progress=progress, desc=f"evaluate {stage}",
    )
    from .inference import measure_latency

    metrics["parameters"] = float(count_parameters(model))
    metrics["latency_s"] = measure_latency(model, tuple(cfg.data.image_size), repeats=cfg.eval.latency_repeats)
    return metrics
