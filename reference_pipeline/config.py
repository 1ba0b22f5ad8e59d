"""The pipeline's configuration, top to bottom: one training loop's settings, data, models, loss terms, stages.

One :class:`PipelineConfig` describes a whole run. Each training stage is a :class:`StageConfig`: the
loop's :class:`TrainConfig` plus the weights of the unified objective
``J = L_sup + λ_semi·L_semi + λ_pxl·L_pxl``. Defaults are the paper's Table 7 at full scale; the shipped
YAML files (``configs/*.yaml``) override what differs (sizes, steps, data paths). Load with
:func:`load_pipeline_config`, which rejects unknown keys and bad values naming them (the generic
YAML-to-dataclass loader is :mod:`reference_pipeline.config_loader`).

:data:`STAGES` is the one table of stage names: the same name is the config section, the run-directory
folder and the report row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .config_loader import ConfigError, apply_overrides, config_from_dict, config_to_dict, load_config, save_config
from .losses import CriterionConfig
from .models.demo import demo_teacher_config
from .models.student import StudentConfig
from .models.teacher import TeacherConfig
from .models.transformers_teacher import TransformersTeacherConfig
from .pseudo_labels import PseudoLabelConfig
from .stage_names import STAGES, Stage, stage

__all__ = [
    "QUICK_OVERRIDES",
    "STAGES",
    "ConfigError",
    "ContrastConfig",
    "DataConfig",
    "EvalConfig",
    "PipelineConfig",
    "PretrainStageConfig",
    "Stage",
    "StageConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "load_pipeline_config",
    "save_config",
    "stage",
]


@dataclass
class TrainConfig:
    r"""What one call of the training loop needs (optimizer, schedule, precision, cadence, data loading).

    The paper's Table 7 values (the defaults of :class:`PipelineConfig`'s teacher and student stages):

    ==================  ==================================  =====================================
    Parameter           Teacher                             Student
    ==================  ==================================  =====================================
    learning rate       5e-5                                encoder 5e-5, decoder 5e-4
    scheduler           multi-step, milestones 0.9, 0.95    PolyLR, power 0.9
    batch size          4                                   8
    weight decay        0.01                                0.05
    gradient clipping   none                                l2 norm 0.1
    optimizer           AdamW (0.9, 0.999)                  AdamW (0.9, 0.999)
    ==================  ==================================  =====================================

    Learning rate at step :math:`t` of :math:`T` (``steps``), with warmup of :math:`W` steps:

    .. math::

        \eta_t = \eta_0 \cdot w_t \cdot d_t, \qquad
        w_t = \begin{cases} f + (1 - f)\,t / W & t < W \\ 1 & t \ge W \end{cases}

    where :math:`f` is ``warmup_factor`` and the decay :math:`d_t` is
    :math:`(1 - t/T)^{p}` for ``"poly"`` (power :math:`p`), :math:`\gamma^{\#\{m : t \ge m T\}}`
    for ``"multistep"`` (milestones :math:`m` as fractions of :math:`T`) and 1 for ``"constant"``.

    Attributes:
        steps: total optimizer steps of the run.
        batch_size: *global* batch size (summed over DDP processes; must divide by the world size).
        lr_encoder: learning rate of the ``"encoder"`` parameter group.
        lr_decoder: learning rate of every other parameter group (the whole model when no groups
            are given).
        weight_decay: AdamW decoupled weight decay.
        betas: AdamW ``(beta1, beta2)``.
        scheduler: ``"poly"``, ``"multistep"`` or ``"constant"``.
        poly_power: power of the polynomial decay.
        milestones: multi-step milestones as fractions of ``steps`` (e.g. ``(0.9, 0.95)``).
        gamma: multi-step decay factor.
        warmup_steps: linear warmup length (0 = none).
        warmup_factor: learning-rate multiplier at step 0 of the warmup.
        grad_clip: clip the global gradient l2 norm to this value (``None`` = no clipping).
        amp: ``"none"``, ``"bf16"`` (autocast, CPU or GPU) or ``"fp16"`` (autocast + gradient
            scaling, GPU only).
        eval_every: evaluate every this many steps (0 = only at the end).
        checkpoint_every: checkpoint every this many steps (0 = only at the end).
        keep_checkpoints: how many of the newest checkpoints to keep on disk (>= 1).
        log_every: log training metrics (averaged over the last ``log_every`` steps) this often.
        num_workers: ``DataLoader`` worker processes (0 = load in the main process).
        seed: seed of the model-side RNGs and of the data order.
        device: ``"auto"`` (the local GPU when available, else CPU), ``"cpu"`` or ``"cuda"``.
        ddp_find_unused_parameters: let DDP handle parameters that get a gradient in some steps but
            not in others; slower, so off by default. Parameters a stage never gives a gradient (a head
            it does not use) need nothing: :func:`~reference_pipeline.engine.train` leaves them out of DDP.

    Raises:
        ValueError: on an out-of-range value (naming it).
    """

    steps: int = 1000
    batch_size: int = 8
    lr_encoder: float = 5e-5
    lr_decoder: float = 5e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: Literal["poly", "multistep", "constant"] = "poly"
    poly_power: float = 0.9
    milestones: tuple[float, ...] = (0.9, 0.95)
    gamma: float = 0.1
    warmup_steps: int = 0
    warmup_factor: float = 0.001
    grad_clip: float | None = None
    amp: Literal["none", "bf16", "fp16"] = "none"
    eval_every: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 20
    num_workers: int = 2
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    ddp_find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "num_workers", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr_encoder", "lr_decoder", "weight_decay", "poly_power"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        if list(self.milestones) != sorted(self.milestones) or not all(0.0 < m <= 1.0 for m in self.milestones):
            raise ValueError(f"milestones must be increasing fractions in (0, 1], got {self.milestones}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if not 0.0 < self.warmup_factor <= 1.0:
            raise ValueError(f"warmup_factor must be in (0, 1], got {self.warmup_factor}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or None (no clipping), got {self.grad_clip}")


@dataclass
class DataConfig:
    """Where the images come from and how they are viewed.

    Attributes:
        format: ``"synthetic"`` (the built-in dataset, generated under ``root`` on first use),
            ``"coco"`` (any COCO-format folder), ``"cityscapes"`` or ``"ade20k"``.
        root: dataset folder (synthetic / Cityscapes / ADE20K) or COCO image root.
        train_annotations: COCO-format only: instances JSON of the training images (all labeled by default).
        val_annotations: COCO-format only: instances JSON of the validation images (same categories).
        val_images: COCO-format only: image folder of the validation split (default: ``root``).
        unlabeled_images: a folder of unlabeled images (any sizes; grayscale / RGBA / 16-bit are read as
            RGB), or with ``unlabeled_annotations`` the folder its file names are relative to (default ``root``).
        unlabeled_annotations: a COCO JSON listing the unlabeled images (``images``: ``id``, ``file_name``);
            its annotations are ignored.
        split_file: labeled image ids, one per line (:func:`~reference_pipeline.data.splits.read_split_file`);
            the other training images become the unlabeled set.
        label_fraction: fraction of the training images kept labeled; 1.0 (the default) keeps every
            annotated image labeled. Below 1, a seeded draw keeps that fraction labeled and the rest
            becomes the unlabeled set (the paper's 10 % setting: 0.1); the synthetic dataset draws it from
            its ``target_labeled`` pool and keeps its own unlabeled split.
        split_seed: seed of the labeled draw.
        image_size: ``(height, width)`` of the training views and of evaluation inputs.
        synthetic_size: synthetic only: images per split ``(source_train, target_labeled,
            target_unlabeled, target_val)``.
        synthetic_image_size: synthetic only: generated image size.
        synthetic_seed: synthetic only: generator seed.
        synthetic_object_scale: synthetic only: object size multiplier
            (:attr:`~reference_pipeline.data.synthetic.SyntheticConfig.object_scale`).
        max_val_images: evaluate on at most this many validation images (0 = all).
    """

    format: Literal["synthetic", "coco", "cityscapes", "ade20k"] = "synthetic"
    root: str = "data/synthetic"
    train_annotations: str = ""
    val_annotations: str = ""
    val_images: str = ""
    unlabeled_images: str = ""
    unlabeled_annotations: str = ""
    split_file: str = ""
    label_fraction: float = 1.0
    split_seed: int = 0
    image_size: tuple[int, int] = (512, 1024)
    synthetic_size: tuple[int, int, int, int] = (400, 300, 2000, 300)
    synthetic_image_size: tuple[int, int] = (128, 128)
    synthetic_seed: int = 0
    synthetic_object_scale: float = 1.0
    max_val_images: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.label_fraction <= 1.0:
            raise ValueError(f"label_fraction must be in (0, 1], got {self.label_fraction}")
        if self.split_file and self.label_fraction < 1.0:
            raise ValueError("set either data.split_file or data.label_fraction < 1 (both choose the labeled images)")
        unlabeled_given = bool(self.unlabeled_images or self.unlabeled_annotations)
        if unlabeled_given and self.format == "synthetic":
            raise ValueError("data.unlabeled_images / unlabeled_annotations: the synthetic dataset has its own unlabeled split")
        if unlabeled_given and (self.split_file or self.label_fraction < 1.0):
            raise ValueError(
                "data.label_fraction < 1 / data.split_file make the rest of the training images the unlabeled set; "
                "do not also set data.unlabeled_images / unlabeled_annotations (use one source of unlabeled images)"
            )
        if len(self.image_size) != 2 or min(self.image_size) < 16:
            raise ValueError(f"image_size must be (height, width) >= 16, got {self.image_size}")
        if self.max_val_images < 0:
            raise ValueError(f"max_val_images must be >= 0, got {self.max_val_images}")


@dataclass
class ContrastConfig:
    """The instance-aware pixel contrastive term (``instcontrast.InstanceAwarePixelContrast``).

    Attributes:
        temperature: InfoNCE temperature ``T`` (paper: 0.2).
        num_negatives: negatives per anchor ``R`` (paper: 256).
        strategy: ``"fusion"`` (paper), ``"mask"``, ``"class"`` or ``"uniform"``.
        score: ``"linear"`` (paper), ``"squared"`` or ``"sqrt"``.
        loss: ``"infonce"`` (paper) or ``"hinge"``.
        memory_bank: size of the pixel memory bank (0 = mini-batch negatives only).
        gather_distributed: under ``torchrun``, sample negatives from every rank's pixels (the library's
            cross-rank pool, as one large batch would); no effect in one process.
        max_anchors: average the loss over at most this many randomly chosen valid anchor pixels per step
            (an unbiased estimate of the paper's mean over all anchors, with more variance; the negatives
            are still drawn from every pixel). ``None`` (default, the paper): every anchor.
    """

    temperature: float = 0.2
    num_negatives: int = 256
    strategy: Literal["uniform", "mask", "class", "fusion"] = "fusion"
    score: Literal["linear", "squared", "sqrt"] = "linear"
    loss: Literal["infonce", "hinge"] = "infonce"
    memory_bank: int = 0
    gather_distributed: bool = True
    max_anchors: int | None = None


@dataclass
class StageConfig:
    """One training stage: the loop's settings and the objective's weights.

    Attributes:
        train: optimizer, schedule, batch, cadence.
        lambda_semi: weight of the pseudo-label term (0 = no unlabeled data in this stage).
        lambda_pxl: weight of the pixel contrastive term (paper: 0.2).
    """

    train: TrainConfig = field(default_factory=TrainConfig)
    lambda_semi: float = 1.0
    lambda_pxl: float = 0.2

    def __post_init__(self) -> None:
        if self.lambda_semi < 0 or self.lambda_pxl < 0:
            raise ValueError(f"loss weights must be >= 0, got λ_semi={self.lambda_semi}, λ_pxl={self.lambda_pxl}")


@dataclass
class PretrainStageConfig(StageConfig):
    """Pretraining of the pipeline teacher (``teacher_kind="pipeline"``) before adaptation: a stage plus its data.

    Attributes:
        source: what the teacher is pretrained on (supervised set criterion only): ``"synthetic"`` (the
            built-in dataset's source domain; needs ``data.format=synthetic``), the path of a COCO
            instances JSON (its classes are matched to the dataset's by name, case-insensitively; instances
            of classes the dataset lacks are dropped; at least one class must match), or ``"none"`` (no
            pretraining: adaptation starts from the ImageNet encoder and a fresh decoder).
        source_images: COCO source only: the image folder its ``file_name`` entries are relative to
            (default: the JSON's folder).
        cache_dir: where the pretrained teacher is cached for later runs (``""``: beside the source: the
            synthetic dataset's folder, or the COCO JSON's folder).
    """

    source: str = "synthetic"
    source_images: str = ""
    cache_dir: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.source.strip():
            raise ValueError('teacher_pretrain.source must be "synthetic", "none" or the path of a COCO JSON, got ""')


def _teacher_stage(steps: int, lambda_semi: float) -> StageConfig:
    return StageConfig(
        train=TrainConfig(
            steps=steps, batch_size=4, lr_encoder=5e-5, lr_decoder=5e-5, weight_decay=0.01,
            scheduler="multistep", milestones=(0.9, 0.95), grad_clip=None,
        ),
        lambda_semi=lambda_semi,
        lambda_pxl=0.2,
    )


def _pretrain_stage(steps: int) -> PretrainStageConfig:
    stage = _teacher_stage(steps, 0.0)
    return PretrainStageConfig(train=stage.train, lambda_semi=stage.lambda_semi, lambda_pxl=stage.lambda_pxl)


def _student_stage(steps: int, lambda_semi: float, lambda_pxl: float) -> StageConfig:
    return StageConfig(
        train=TrainConfig(
            steps=steps, batch_size=8, lr_encoder=5e-5, lr_decoder=5e-4, weight_decay=0.05,
            scheduler="poly", poly_power=0.9, grad_clip=0.1,
        ),
        lambda_semi=lambda_semi,
        lambda_pxl=lambda_pxl,
    )


@dataclass
class EvalConfig:
    """Evaluation and reporting.

    Attributes:
        batch_size: images per inference pass.
        top_k: predictions kept per image (Mask2Former's ``test_topk_per_image``).
        latency_repeats: forward passes timed per model for the report's latency column.
        overlay_images: validation images shown in the overlay figure.
    """

    batch_size: int = 8
    top_k: int = 100
    latency_repeats: int = 10
    overlay_images: int = 4


@dataclass
class PipelineConfig:
    """A whole run of the three-stage method.

    Attributes:
        run_dir: where checkpoints, metrics, pseudo-labels and the report go.
        seed: global seed (each stage derives its own).
        student_seeds: how many times the student-side trainings (distill, refine, supervised-only baseline) run,
            with seeds ``seed, seed + 1, …``, all from the same adapted teacher and pseudo-labels (the teacher is
            fixed, as the paper's foundation models are). Seed ``seed`` lives in ``run_dir``, the others in
            ``run_dir/seeds/seed<k>``; the report states every ordering against the seed spread.
        threads: CPU threads for torch (0 = leave torch's default).
        data: the dataset.
        teacher_kind: ``"foundation"`` (Grounding-DINO + SAM2 from local weights, the paper's teacher),
            ``"transformers"`` (a Mask2Former / MaskFormer checkpoint folder, its classes matched to the
            dataset's by name), ``"pipeline"`` (a larger model of the pipeline's own architectures,
            pretrained as ``teacher_pretrain.source`` says; it only stands in for a foundation model) or
            ``"demo"`` (another name of ``"pipeline"``, kept for existing configs).
        foundation_teacher: settings of the foundation teacher (``class_names`` are taken from the dataset).
        transformers_teacher: settings of the ``transformers`` checkpoint teacher.
        demo_teacher: architecture of the pipeline teacher (``num_classes`` is taken from the dataset; the
            key keeps its first name).
        student: the student's architecture (default: the paper's DINOv2-S student; ``num_classes`` is
            taken from the dataset).
        criterion: the set criterion's weights (mask 5, dice 5, class 2, no-object 0.1).
        contrast: the pixel contrastive term.
        pseudo_labels: how teacher outputs become pseudo-instances (threshold 0.3).
        teacher_pretrain: pipeline teacher only: its pretraining (``source``, loop, loss weights).
        teacher_finetune: stage 1a: fine-tune the teacher on the labeled split (``J(θ; Dˡ, ∅, λ_pxl)``).
        teacher_self_train: stage 1b: re-initialise from the pretrained teacher, train on labeled +
            pseudo-labeled data.
        distill: stage 2: the student with supervised, pseudo-label and contrastive terms.
        refine: stage 3: the student on labeled data only.
        baseline: the supervised-only student for comparison (same budget as distill + refine).
        eval: evaluation settings.
    """

    run_dir: str = "runs/default"
    seed: int = 0
    student_seeds: int = 1
    threads: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    teacher_kind: Literal["foundation", "transformers", "pipeline", "demo"] = "foundation"
    foundation_teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(class_names=("object",)))
    transformers_teacher: TransformersTeacherConfig = field(default_factory=TransformersTeacherConfig)
    demo_teacher: StudentConfig = field(default_factory=lambda: demo_teacher_config(num_classes=1))
    student: StudentConfig = field(default_factory=lambda: StudentConfig.paper(num_classes=1))
    criterion: CriterionConfig = field(default_factory=CriterionConfig)
    contrast: ContrastConfig = field(default_factory=ContrastConfig)
    pseudo_labels: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    teacher_pretrain: PretrainStageConfig = field(default_factory=lambda: _pretrain_stage(5000))
    teacher_finetune: StageConfig = field(default_factory=lambda: _teacher_stage(1000, 0.0))
    teacher_self_train: StageConfig = field(default_factory=lambda: _teacher_stage(5000, 1.0))
    distill: StageConfig = field(default_factory=lambda: _student_stage(90000, 1.0, 0.2))
    refine: StageConfig = field(default_factory=lambda: _student_stage(2000, 0.0, 0.0))
    baseline: StageConfig = field(default_factory=lambda: _student_stage(92000, 0.0, 0.0))
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_path(self) -> Path:
        """``run_dir`` as a path."""
        return Path(self.run_dir)


def load_pipeline_config(path: str | None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Load a :class:`PipelineConfig` from YAML plus ``key.sub=value`` overrides (see :func:`~reference_pipeline.config.load_config`)."""
    return load_config(PipelineConfig, path, overrides)


def stage_names() -> list[str]:
    """Names of the :class:`StageConfig` fields of :class:`PipelineConfig`, in pipeline order."""
    return [f.name for f in dataclasses.fields(PipelineConfig)
            if f.type in ("StageConfig", StageConfig, "PretrainStageConfig", PretrainStageConfig)]



#: ``--quick``: tiny sizes that exercise every stage and the report in about a minute (CI).
QUICK_OVERRIDES: tuple[str, ...] = (
    "data.root=data/synthetic_tiny",  # never replace the full demo dataset (and its cached teacher)
    "data.synthetic_size=[8,8,8,4]",
    "data.synthetic_image_size=[64,64]",
    "data.image_size=[64,64]",
    "data.label_fraction=0.5",
    "data.max_val_images=4",
    "teacher_pretrain.train.steps=4",
    "teacher_pretrain.train.batch_size=4",
    "teacher_finetune.train.steps=2",
    "teacher_finetune.train.batch_size=2",
    "teacher_self_train.train.steps=2",
    "teacher_self_train.train.batch_size=2",
    "distill.train.steps=3",
    "distill.train.batch_size=2",
    "refine.train.steps=2",
    "refine.train.batch_size=2",
    "baseline.train.steps=5",
    "baseline.train.batch_size=2",
    "contrast.num_negatives=32",
    "eval.latency_repeats=2",
    "eval.overlay_images=2",
)
