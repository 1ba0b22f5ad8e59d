"""The three stages of the method, each one call of the same training loop with different data and weights.

The unified objective (paper Eq. 3) on a batch of labeled data ``Dˡ`` and pseudo-labeled data ``Dᵘ``:

.. math::

    J(θ; Dˡ, Dᵘ, λ_{semi}, λ_{pxl}) = L_{sup}(Dˡ) + λ_{semi} L_{semi}(Dᵘ) + λ_{pxl} L_{pxl}(Dˡ ∪ Dᵘ)

1. **adapt-teacher**: fine-tune the pretrained teacher on ``Dˡ`` (``J(θ; Dˡ, ∅, λ_pxl)``); pseudo-label
   ``Dᵘ`` with it; re-initialise from the pretrained weights and train on ``Dˡ ∪ Dᵘ``.
2. **distill**: pseudo-label ``Dᵘ`` with the adapted (frozen) teacher; train the student with ``J``.
3. **refine**: fine-tune the student on ``Dˡ`` only (``λ_semi = λ_pxl = 0``).

How one step computes ``J`` (:class:`~reference_pipeline.losses.Objective`): the *anchor* views — weak views of labeled images
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
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from instcontrast import InstanceAwarePixelContrast, PixelMemoryBank

from .atomic import atomic_write_text
from .checkpoint import check_writable, load_weights, save_weights
from .config import STAGES, ContrastConfig, PipelineConfig, StageConfig, TrainConfig, config_to_dict, save_config
from .config import stage as stage_entry
from .data.augment import StrongViewConfig, TwoViewTransform, WeakViewConfig
from .data.loading import Datasets, load_datasets, require_unlabeled
from .data.semi import (
    PseudoLabeledDataset,
    SemiSupervisedDataset,
    TwoViewDataset,
    collate_semi,
)
from .data.structures import InstanceDataset
from .engine import barrier, distributed_info, resolve_device, train
from .errors import UserError
from .evaluate import CocoMaskEvaluator
from .inference import evaluate_model, predict_dataset
from .losses import Objective, SetCriterion
from .models.student import Student, count_parameters
from .pseudo_labels import PseudoInstances, pseudo_label, read_pseudo_labels, write_pseudo_labels
from .teachers import build_teacher, demo_teacher_cache, pipeline_teacher_cache, pretrained_teacher
from .trained import CARD_FILE, describe, load_trained, save_trained

__all__ = [
    "Datasets",
    "StageResult",
    "adapt_teacher",
    "build_contrast",
    "build_student",
    "build_teacher",
    "demo_teacher_cache",
    "distill",
    "evaluate_stage",
    "load_datasets",
    "load_stage_model",
    "make_pseudo_labels",
    "pipeline_teacher_cache",
    "pretrained_teacher",
    "refine",
    "supervised_baseline",
    "train_stage",
]

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"


# ----------------------------------------------------------------------------------------- data
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


def build_contrast(config: ContrastConfig) -> InstanceAwarePixelContrast:
    """The library's loss module for the pixel contrastive term (with a memory bank of ``config.memory_bank``
    pixels when > 0; the bank takes its widths from the first batch, whatever the strategy)."""
    bank = PixelMemoryBank(size=config.memory_bank) if config.memory_bank > 0 else None
    return InstanceAwarePixelContrast(
        temperature=config.temperature,
        num_negatives=config.num_negatives,
        strategy=config.strategy,
        score=config.score,
        loss=config.loss,
        memory_bank=bank,
        gather_distributed=config.gather_distributed,  # no effect without a process group
        max_anchors=config.max_anchors,
    )


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

    A finished stage (its ``model.safetensors`` and ``result.json`` exist) is not re-run: its weights are
    loaded; an interrupted one continues from its latest checkpoint. Either way the stage's folder must have
    been made with the same settings (:func:`check_same_settings`). The folder gets ``run_config.yaml``
    (the whole config the stage ran with) and, at the end, a self-describing model
    (:func:`~reference_pipeline.trained.save_trained`: ``model.safetensors`` + ``config.json``).

    Args:
        name: folder under ``run_dir``.
        model: the model to train (student or teacher), modified in place.
        cfg: the run's configuration.
        stage: this stage's loop settings and loss weights.
        datasets: the run's splits.
        pseudo: pseudo-instances of the unlabeled images (``None``: labeled data only).
        resume: ``False`` removes the stage's folder first and trains it from scratch (``--no-resume``).
        progress: show progress bars.
        seed_offset: added to the seeds so different stages draw different augmentations.
    """
    run = cfg.run_path / name
    final = run / WEIGHTS_FILE
    result_file = run / "result.json"
    info = distributed_info()
    if not resume:  # --no-resume: this stage is recomputed from scratch
        if info.is_main and run.exists():
            shutil.rmtree(run)
        barrier(info)
    check_same_settings(cfg, name, run)
    if final.is_file() and result_file.is_file():
        load_weights(model, final)
        data = json.loads(result_file.read_text())
        logger.info("stage %s already finished: loaded %s", name, final)
        return StageResult(name, final, data["wall_time"], data["steps"], data["final_logs"])
    if info.is_main:
        save_config(cfg, run / RUN_CONFIG_FILE)  # what this stage runs with; later stages compare against it
    seed = cfg.seed + seed_offset
    transform = view_transform(cfg)
    labeled = TwoViewDataset(datasets.labeled, transform, seed)
    uses_unlabeled = pseudo is not None and (stage.lambda_semi > 0 or stage.lambda_pxl > 0)
    unlabeled = TwoViewDataset(PseudoLabeledDataset(datasets.unlabeled, pseudo), transform, seed + 1) if uses_unlabeled else None
    train_set = SemiSupervisedDataset(labeled, unlabeled)
    num_classes = len(datasets.class_names)
    contrast = build_contrast(cfg.contrast) if stage.lambda_pxl > 0 else None
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
    if info.is_main:  # one writer; the others wait so the next stage finds the weights
        try:
            card = describe(model, kind=_model_kind(cfg, name), stage=name, class_names=datasets.class_names,
                            category_ids=getattr(datasets, "category_ids", None), image_size=cfg.data.image_size,
                            top_k=cfg.eval.top_k)
        except TypeError:  # a model of the caller's own: its weights only
            logger.warning("stage %s: %s cannot describe itself; writing its weights only", name, type(model).__name__)
            save_weights(getattr(model, "module", model), final)
        else:
            save_trained(model, run, card)
        atomic_write_text(result_file, json.dumps({"wall_time": result.wall_time, "steps": result.steps,
                                                    "final_logs": result.final_logs}))
    barrier(info)
    return result


RUN_CONFIG_FILE = "run_config.yaml"

#: Settings that shape what a stage leaves behind (its weights, the pseudo-labels made with them): a run
#: directory's stage is reused only by a command with the same values (``check_same_settings``).
_TEACHER_SECTIONS = ("teacher_kind", "foundation_teacher", "transformers_teacher", "demo_teacher", "teacher_pretrain")
SETTINGS_OF: dict[str, tuple[str, ...]] = {
    "teacher_finetune": ("data", *_TEACHER_SECTIONS, "criterion", "contrast", "teacher_finetune"),
}
SETTINGS_OF["teacher_self_train"] = (*SETTINGS_OF["teacher_finetune"], "pseudo_labels", "teacher_self_train")
SETTINGS_OF["distill"] = (*SETTINGS_OF["teacher_self_train"], "student", "distill")
SETTINGS_OF["refine"] = (*SETTINGS_OF["distill"], "refine")
SETTINGS_OF["baseline"] = ("data", "student", "criterion", "baseline")

#: Settings that change how a stage runs or is watched, not what it learns.
_NOT_SHAPING = {"max_val_images", "eval_every", "log_every", "checkpoint_every", "keep_checkpoints", "num_workers",
                "device", "latency_repeats", "overlay_images"}


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: data}


def check_same_settings(cfg: PipelineConfig, stage: str, folder: Path, *, upstream: bool = False) -> None:
    """Stop if ``folder`` (a stage of this run directory) was made with settings that contradict ``cfg``.

    For the stage's own folder (resuming it) the sections in :data:`SETTINGS_OF` ``[stage]`` and the seed
    are compared with the ``run_config.yaml`` the stage wrote; for an earlier stage whose weights this
    command reads (``upstream``), only what makes them that model: the data and the teacher (teacher
    stages) or the data and the student's architecture (student stages) — a student may be trained
    with other loss settings or seeds from the same teacher. Nothing to compare when the folder holds
    no such file (a fresh stage, or weights linked from elsewhere).

    Raises:
        UserError: naming every differing key with both values, and what to do.
    """
    saved_file = folder / RUN_CONFIG_FILE
    if stage not in SETTINGS_OF or not saved_file.is_file():
        return
    import yaml

    saved = yaml.safe_load(saved_file.read_text()) or {}
    current = config_to_dict(cfg)
    if upstream:
        sections = ("data", *_TEACHER_SECTIONS) if stage.startswith("teacher") else ("data", "student")
    else:
        sections = (*SETTINGS_OF[stage], "seed")
    before = {k: v for k, v in _flatten({s: saved.get(s) for s in sections}).items()
              if k.rsplit(".", 1)[-1] not in _NOT_SHAPING}
    now = {k: v for k, v in _flatten({s: current.get(s) for s in sections}).items()
           if k.rsplit(".", 1)[-1] not in _NOT_SHAPING}
    changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
               if before.get(k) != now.get(k)]
    if changed:
        shown = "; ".join(changed[:6]) + (f"; ... ({len(changed)} in all)" if len(changed) > 6 else "")
        raise UserError(
            f"{folder} was made with other settings than this command's ({shown}). Use another run directory "
            f"(--run-dir), or recompute with --no-resume."
        )


def _model_kind(cfg: PipelineConfig, stage: str) -> str:
    """The :class:`~reference_pipeline.trained.ModelCard` kind of ``stage``'s model."""
    if EVALUABLE.get(stage) == "student":
        return "student"
    return "pipeline" if cfg.teacher_kind in ("demo", "pipeline") else cfg.teacher_kind


def mask_stride_of(model: nn.Module, default: int | None = 4) -> int | None:
    """Output stride of a model's mask logits: its ``mask_stride`` attribute (DDP unwrapped), else ``default``."""
    return getattr(getattr(model, "module", model), "mask_stride", default)


def _with_seed(train_config: TrainConfig, seed: int) -> TrainConfig:
    return replace(train_config, seed=seed)


# ---------------------------------------------------------------------------------- pseudo-labels
def make_pseudo_labels(
    teacher: nn.Module, cfg: PipelineConfig, datasets: Datasets, path: Path, *, resume: bool = True,
    progress: bool = True,
) -> dict[int, PseudoInstances]:
    """Pseudo-label the unlabeled split with ``teacher`` (cached in ``path`` as COCO-style RLE JSON).

    The pseudo-labels are kept as RLE in memory too (:class:`~reference_pipeline.pseudo_labels.PseudoInstances`);
    training decodes one sample's masks when it draws it. Also writes ``<path stem>_quality.json``: counts per image and, where the unlabeled images have
    ground truth (the synthetic dataset keeps it for diagnostics), the pseudo-labels' mask AP.
    """
    info = distributed_info()
    if not resume:  # --no-resume: label again
        if info.is_main:
            path.unlink(missing_ok=True)
        barrier(info)
    if not path.is_file() and not info.is_main:
        # rank 0 labels the unlabeled split (hours at full scale: longer than a collective's timeout, so the
        # others watch for its file instead of waiting in a barrier), then they read it
        _wait_for_file(path)
        barrier(info)
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
    barrier(info)
    return pseudo


def _wait_for_file(path: Path, poll_s: float = 2.0) -> None:
    """Wait until ``path`` exists (written atomically by rank 0; torchrun stops this rank if rank 0 fails)."""
    while not path.is_file():
        time.sleep(poll_s)


# ----------------------------------------------------------------------------------- the stages
def _stage_path(cfg: PipelineConfig, name: str) -> Path:
    return cfg.run_path / name / WEIGHTS_FILE


def _require(cfg: PipelineConfig, stage: str, *, same_settings: bool = True) -> Path:
    """The weights of an earlier ``stage`` of this run directory (made with settings that agree with ``cfg``,
    when ``same_settings``: a stage that trains on them; evaluating a trained model needs no such agreement)."""
    path = _stage_path(cfg, stage)
    if not path.is_file():
        command = stage_entry(stage).command
        raise FileNotFoundError(f"{path} not found: run `python -m reference_pipeline {command}` first (same --config)")
    if same_settings:
        check_same_settings(cfg, stage, path.parent, upstream=True)
    return path


def adapt_teacher(cfg: PipelineConfig, datasets: Datasets, *, resume: bool = True, progress: bool = True) -> list[StageResult]:
    """Stage 1: fine-tune on ``Dˡ``, pseudo-label ``Dᵘ``, re-initialise and self-train on ``Dˡ ∪ Dᵘ``.

    Writes ``teacher_finetune/``, ``pseudo_labels_teacher_finetune.json`` and ``teacher_self_train/``.
    """
    check_writable(cfg.run_path)
    require_unlabeled(datasets, "adapt-teacher")
    teacher, _ = pretrained_teacher(cfg, datasets, progress=progress)
    initial = {k: v.clone() for k, v in teacher.state_dict().items()}
    finetune = train_stage("teacher_finetune", teacher, cfg, cfg.teacher_finetune, datasets, resume=resume,
                           progress=progress, seed_offset=1)
    pseudo = make_pseudo_labels(teacher, cfg, datasets, cfg.run_path / "pseudo_labels_teacher_finetune.json",
                                resume=resume, progress=progress)
    teacher.load_state_dict(initial)  # re-initialise from the pretrained teacher (paper Sec. 3.3)
    adapted = train_stage("teacher_self_train", teacher, cfg, cfg.teacher_self_train, datasets, pseudo=pseudo,
                          resume=resume, progress=progress, seed_offset=2)
    return [finetune, adapted]


def distill(cfg: PipelineConfig, datasets: Datasets, *, resume: bool = True, progress: bool = True) -> StageResult:
    """Stage 2: pseudo-label ``Dᵘ`` with the frozen adapted teacher and train the student with ``J``.

    Everything the stage reads or writes is checked first (the adapted teacher, the teacher's and the
    student's pretrained weights, a writable run directory), not after hours of pseudo-labelling.
    """
    check_writable(cfg.run_path)
    require_unlabeled(datasets, "distill")
    adapted = _require(cfg, "teacher_self_train")
    student = build_student(cfg, len(datasets.class_names))  # reads student.encoder_weights
    teacher = build_teacher(cfg, datasets.class_names)
    load_weights(teacher, adapted)
    teacher.requires_grad_(False).to(resolve_device(cfg.distill.train.device, distributed_info()))  # label on the GPU
    pseudo = make_pseudo_labels(teacher, cfg, datasets, cfg.run_path / "pseudo_labels_teacher_self_train.json",
                                resume=resume, progress=progress)
    del teacher
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the student trains in the teacher's memory
    return train_stage("distill", student, cfg, cfg.distill, datasets, pseudo=pseudo, resume=resume,
                       progress=progress, seed_offset=3)


def refine(cfg: PipelineConfig, datasets: Datasets, *, resume: bool = True, progress: bool = True) -> StageResult:
    """Stage 3: fine-tune the distilled student on ``Dˡ`` only."""
    check_writable(cfg.run_path)
    distilled = _require(cfg, "distill")
    student = build_student(cfg, len(datasets.class_names))
    load_weights(student, distilled)
    return train_stage("refine", student, cfg, cfg.refine, datasets, resume=resume, progress=progress,
                       seed_offset=4)


def supervised_baseline(
    cfg: PipelineConfig, datasets: Datasets, *, resume: bool = True, progress: bool = True
) -> StageResult:
    """The supervised-only student: labeled data only, from the same initialisation as the distilled one."""
    student = build_student(cfg, len(datasets.class_names))
    return train_stage("baseline", student, cfg, cfg.baseline, datasets, resume=resume, progress=progress,
                       seed_offset=5)


#: Model of each evaluable stage: its name (see :data:`~reference_pipeline.config.STAGES`) -> "student" or "teacher".
EVALUABLE = {s.name: s.model for s in STAGES}


def load_stage_model(cfg: PipelineConfig, datasets: Datasets, stage: str) -> nn.Module:
    """The trained model of ``stage`` (one of :data:`EVALUABLE`), from its self-describing folder."""
    if stage not in EVALUABLE:
        raise UserError(f"unknown stage {stage!r}; expected one of {list(EVALUABLE)}")
    if stage == "teacher_zero_shot":
        return pretrained_teacher(cfg, datasets, progress=False)[0]
    weights = _require(cfg, stage, same_settings=False)
    if (weights.parent / CARD_FILE).is_file():
        return load_trained(weights.parent)[0]
    # a folder written before models described themselves (or by a model that cannot): build it from cfg
    if EVALUABLE[stage] == "teacher":
        model = build_teacher(cfg, datasets.class_names)
    else:
        model = build_student(cfg, len(datasets.class_names))
    load_weights(model, weights)
    return model


def evaluate_stage(cfg: PipelineConfig, datasets: Datasets, stage: str, *, progress: bool = True) -> dict[str, float]:
    """Mask AP / AP50 on the validation split, parameters and latency per image of ``stage``'s model (GPU if any)."""
    return evaluate_on(cfg, load_stage_model(cfg, datasets, stage), datasets.val, stage, progress=progress)


def evaluate_trained(cfg: PipelineConfig, stage: str, val: InstanceDataset, *, progress: bool = True) -> dict[str, float]:
    """:func:`evaluate_stage` for a stage whose folder describes its model: needs only the validation split."""
    model, _ = load_trained(_require(cfg, stage, same_settings=False).parent)
    return evaluate_on(cfg, model, val, stage, progress=progress)


def evaluate_on(cfg: PipelineConfig, model: nn.Module, val: InstanceDataset, stage: str, *,
                progress: bool = True) -> dict[str, float]:
    """Mask AP / AP50 of ``model`` on ``val`` at ``data.image_size``, its parameters and its latency per image."""
    model = model.to(resolve_device(cfg.refine.train.device, distributed_info()))
    metrics = evaluate_model(
        model, val, image_size=tuple(cfg.data.image_size), batch_size=cfg.eval.batch_size,
        top_k=cfg.eval.top_k, progress=progress, desc=f"evaluate {stage}",
    )
    from .inference import measure_latency

    metrics["parameters"] = float(count_parameters(model))
    metrics["latency_s"] = measure_latency(model, tuple(cfg.data.image_size), repeats=cfg.eval.latency_repeats)
    return metrics
