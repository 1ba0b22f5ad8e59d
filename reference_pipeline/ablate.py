"""The paper's ablations at small scale: cells over seeds, shared teachers, resume, and ``ablations.md``.

An ablation **table** (``configs/ablations.yaml``) is a default row plus variants; each **row** is a list
of ``key=value`` overrides of the :class:`~reference_pipeline.config.PipelineConfig`, the
teacher the student is distilled from, and the student stages that run. One **cell** is one
``(table, row, seed)``; it runs in ``<root>/<table>/<row>/seed<k>/`` with the same stage functions as
the demo (:mod:`reference_pipeline.stages`; there is no second training loop) and ends by writing
``cell.json`` (its metrics) atomically, so a finished cell is never recomputed and a half-finished
one resumes from its stage checkpoints.

Expensive prefixes are shared instead of recomputed:

* the demo teacher's pretraining on the synthetic ``source`` domain (the stand-in for a foundation
  model, fixed across seeds as the paper's foundation models are) is done once and linked into the
  per-seed cache :func:`~reference_pipeline.teachers.pipeline_teacher_cache` looks in;
* teacher adaptation runs once per ``(seed, teacher-affecting settings)`` in
  ``<root>/_shared/teachers/<digest>/``; a cell links that teacher's weights and pseudo-labels into its own
  ``teacher_self_train/model.safetensors`` and ``pseudo_labels_teacher_self_train.json`` before
  :func:`~reference_pipeline.stages.distill` (which then reads them as it does in the demo);
* cells with identical effective settings (the default rows of several tables) are run once; the
  others copy its ``cell.json`` (``reused_from`` names the source).

The report compares every row with its table's default row *paired by seed*: for metric :math:`m`,

.. math::

    \\Delta_k = m_{row,k} - m_{default,k}, \\qquad
    \\bar\\Delta = \\frac{1}{n}\\sum_k \\Delta_k, \\qquad
    s_\\Delta = \\sqrt{\\frac{1}{n-1}\\sum_k (\\Delta_k - \\bar\\Delta)^2}

and states whether :math:`\\operatorname{sign}(\\bar\\Delta)` matches the paper's
:math:`\\operatorname{sign}(m^{paper}_{row} - m^{paper}_{default})`, or that the result is *within
noise* when :math:`|\\bar\\Delta| < s_\\Delta`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from . import stages
from .atomic import atomic_write_json, atomic_write_text, link_or_copy
from .checkpoint import save_weights
from .config import ConfigError, PipelineConfig, config_from_dict, config_to_dict, load_pipeline_config
from .engine import read_metrics
from .errors import UserError
from .teachers import pretrains_teacher

__all__ = [
    "METRICS",
    "AblationConfig",
    "Agreement",
    "CellSpec",
    "QuickConfig",
    "RowSpec",
    "Summary",
    "TableSpec",
    "agreement",
    "expected_direction",
    "format_summary",
    "load_ablation_config",
    "paired_difference",
    "plan_cells",
    "run_ablations",
    "summarize",
    "teacher_key",
    "training_fnr",
    "write_ablation_report",
]

logger = logging.getLogger(__name__)

TeacherSource = Literal["adapted", "finetuned", "zero_shot", "none"]

#: Student stages a row can run, and the folder each writes under the cell's run directory.
STUDENT_STAGES: dict[str, str] = {
    "distill": "distill",
    "refine": "refine",
    "supervised": "baseline",
}

#: Teacher sources and the evaluable stage whose weights / metrics they are.
TEACHER_STAGES: dict[str, str] = {
    "adapted": "teacher_self_train",
    "finetuned": "teacher_finetune",
    "zero_shot": "teacher_zero_shot",
}

#: Metric name -> (column label, number format). Every metric a table can list.
METRICS: dict[str, tuple[str, str]] = {
    "student_AP": ("student AP", "{:.2f}"),
    "student_AP50": ("student AP50", "{:.2f}"),
    "distill_AP": ("distilled AP", "{:.2f}"),
    "refine_AP": ("refined AP", "{:.2f}"),
    "teacher_AP": ("teacher AP", "{:.2f}"),
    "teacher_AP50": ("teacher AP50", "{:.2f}"),
    "fnr": ("FNR (training)", "{:.3f}"),
    "margin": ("final margin Δ", "{:.3f}"),
    "student_params_M": ("student params (M)", "{:.2f}"),
    "teacher_params_M": ("teacher params (M)", "{:.2f}"),
    "distill_time": ("distill time (s)", "{:.0f}"),
}

CELL_FILE = "cell.json"
REPORT_FILE = "ablations.md"


# ------------------------------------------------------------------------------------ the config
@dataclass
class RowSpec:
    """One row of an ablation table.

    Attributes:
        name: the row's name (also its folder name).
        set: ``key=value`` overrides of the pipeline config for this row.
        teacher: the teacher the student is distilled from: ``"adapted"`` (stage 1's result),
            ``"finetuned"`` (stage 1a only: fine-tuned on the labeled split, no self-training),
            ``"zero_shot"`` (the pretrained teacher, no adaptation) or ``"none"`` (no distillation).
        teacher_settings: ``"base"``: the teacher is adapted with the ablation's base settings and
            shared by every row that asks for it; ``"row"``: adapted with this row's overrides too
            (rows whose teacher settings are equal still share it).
        stages: student stages, in order (``"distill"``, ``"refine"``, ``"supervised"``).
        paper: the paper's numbers of this row, metric name -> value (e.g. ``{student_AP: 32.2}``).
        note: shown beside the row in the report.
    """

    name: str
    set: list[str] = field(default_factory=list)
    teacher: TeacherSource = "adapted"
    teacher_settings: Literal["base", "row"] = "base"
    stages: list[str] = field(default_factory=lambda: ["distill"])
    paper: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith((".", "_")):
            raise UserError(f"row name {self.name!r} must be a plain folder name")
        unknown = [s for s in self.stages if s not in STUDENT_STAGES]
        if unknown or not self.stages:
            raise UserError(f"row {self.name!r}: stages {self.stages} must be a non-empty list of {list(STUDENT_STAGES)}")
        if "distill" in self.stages and self.teacher == "none":
            raise UserError(f"row {self.name!r}: the distill stage needs a teacher (teacher is 'none')")
        if "refine" in self.stages and "distill" not in self.stages:
            raise UserError(f"row {self.name!r}: refine needs the distill stage before it")
        bad = [m for m in self.paper if m not in METRICS]
        if bad:
            raise UserError(f"row {self.name!r}: unknown paper metrics {bad}; valid: {list(METRICS)}")


@dataclass
class TableSpec:
    """One ablation table.

    Attributes:
        title: heading in the report.
        default: name of the row the others are compared with.
        rows: the rows.
        columns: metrics shown (names of :data:`METRICS`).
        compare: metrics compared with the default row and the paper's direction.
        paper_source: where the paper's numbers come from (shown under the heading).
        description: what the small-scale analogue does (shown under the heading).
    """

    title: str
    default: str
    rows: list[RowSpec]
    columns: list[str] = field(default_factory=lambda: ["student_AP", "student_AP50"])
    compare: list[str] = field(default_factory=lambda: ["student_AP"])
    paper_source: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        names = [row.name for row in self.rows]
        if len(set(names)) != len(names):
            raise UserError(f"table {self.title!r}: duplicate row names in {names}")
        if self.default not in names:
            raise UserError(f"table {self.title!r}: default row {self.default!r} is not one of {names}")
        bad = [m for m in [*self.columns, *self.compare] if m not in METRICS]
        if bad:
            raise UserError(f"table {self.title!r}: unknown metrics {bad}; valid: {list(METRICS)}")


@dataclass
class QuickConfig:
    """``--quick``: tiny sizes for CI.

    Attributes:
        seeds: seeds per cell.
        root: output folder.
        overrides: pipeline overrides applied after ``reference_pipeline.config.QUICK_OVERRIDES``.
    """

    seeds: int = 2
    root: str = "runs/ablations_quick"
    overrides: list[str] = field(default_factory=list)


@dataclass
class AblationConfig:
    """``configs/ablations.yaml``: the base pipeline, the ablation sizes, the seeds and the tables.

    Attributes:
        pipeline: the base pipeline YAML (relative paths are relative to the ablation file).
        overrides: pipeline overrides for the ablation size (applied after ``pipeline``).
        root: output folder.
        seeds: seeds per cell (cell seed ``k`` runs with ``seed = base seed + k``).
        quick: the ``--quick`` settings.
        tables: table key (e.g. ``table4``) -> table.
    """

    pipeline: str = "demo.yaml"
    overrides: list[str] = field(default_factory=list)
    root: str = "runs/ablations"
    seeds: int = 3
    quick: QuickConfig = field(default_factory=QuickConfig)
    tables: dict[str, TableSpec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.quick.seeds < 1:
            raise UserError(f"seeds must be >= 1, got seeds={self.seeds}, quick.seeds={self.quick.seeds}")


def load_ablation_config(path: str | os.PathLike[str]) -> tuple[AblationConfig, Path]:
    """Read the ablation YAML; returns the config and the resolved base pipeline path.

    Raises:
        FileNotFoundError: if the file or its base pipeline file is missing.
        ConfigError: on unknown keys or bad values (naming them).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ablation config not found: {path}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    try:
        config = config_from_dict(AblationConfig, data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    pipeline = Path(config.pipeline)
    if not pipeline.is_absolute():
        pipeline = path.parent / pipeline
    if not pipeline.is_file():
        raise FileNotFoundError(f"{path}: base pipeline config {pipeline} not found")
    return config, pipeline


# ------------------------------------------------------------------------------------ statistics
@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (``ddof=1``; NaN for one value) of ``n`` finite values."""

    mean: float
    std: float
    n: int


def summarize(values: Sequence[float]) -> Summary:
    """Mean ± sample std of the finite ``values`` (NaN are dropped).

    .. math:: \\bar x = \\frac1n \\sum_k x_k, \\qquad s = \\sqrt{\\frac{1}{n-1}\\sum_k (x_k - \\bar x)^2}

    Args:
        values: one number per seed.

    Returns:
        The summary (``mean`` NaN when nothing is finite, ``std`` NaN when ``n < 2``).
    """
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return Summary(math.nan, math.nan, 0)
    std = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
    return Summary(float(finite.mean()), std, int(finite.size))


def paired_difference(row: Mapping[int, float], default: Mapping[int, float]) -> Summary:
    """Per-seed differences ``row[k] - default[k]`` over the seeds both have, summarized.

    Args:
        row: seed -> metric of the row.
        default: seed -> metric of the default row.

    Returns:
        :func:`summarize` of the differences (the std is the seed spread of the difference).
    """
    common = sorted(set(row) & set(default))
    return summarize([row[k] - default[k] for k in common])


def expected_direction(paper_row: float | None, paper_default: float | None, tolerance: float = 0.05) -> int | None:
    """The sign of the paper's difference: ``+1``, ``-1``, ``0`` (within ``tolerance``) or ``None`` (unknown)."""
    if paper_row is None or paper_default is None:
        return None
    difference = paper_row - paper_default
    if abs(difference) <= tolerance:
        return 0
    return 1 if difference > 0 else -1


@dataclass(frozen=True)
class Agreement:
    """A row's verdict against the paper.

    Attributes:
        verdict: ``"agrees"``, ``"disagrees"``, ``"within noise"``, ``"no paper value"`` or ``"not measured"``.
        text: the plain-language statement for the report.
    """

    verdict: str
    text: str


def agreement(difference: Summary, expected: int | None, paper_difference: float | None = None) -> Agreement:
    """Whether a measured paired difference agrees with the paper's direction, and how it compares with the seed spread.

    Rules: no seeds -> ``"not measured"``; ``n >= 2`` and ``|Δ̄| < s_Δ`` (or ``Δ̄ = 0`` exactly) -> ``"within noise"``; no paper
    value -> ``"no paper value"``; otherwise ``"agrees"`` when ``sign(Δ̄)`` equals the paper's sign, else
    ``"disagrees"`` (so a paper difference of 0 is contradicted by any difference beyond the spread).

    Args:
        difference: :func:`paired_difference` of the row against the default row.
        expected: :func:`expected_direction` of the paper's numbers.
        paper_difference: the paper's difference, quoted in the text.

    Returns:
        The verdict and its sentence.
    """
    if difference.n == 0 or not math.isfinite(difference.mean):
        return Agreement("not measured", "not measured")
    measured = f"Δ {difference.mean:+.2f}"
    spread = (
        f"seed spread of Δ {difference.std:.2f} over {difference.n} seeds" if difference.n >= 2
        else "one seed, so no spread estimate"
    )
    paper = f"paper Δ {paper_difference:+.1f}" if paper_difference is not None else "no paper number"
    if difference.mean == 0:
        return Agreement("within noise", f"{measured}: no measurable difference, within noise ({spread}); {paper}")
    if difference.n >= 2 and abs(difference.mean) < difference.std:
        return Agreement("within noise", f"{measured} is within noise ({spread}); {paper}")
    if expected is None:
        return Agreement("no paper value", f"{measured} ({spread}); {paper}")
    sign = 0 if difference.mean == 0 else (1 if difference.mean > 0 else -1)
    words = {1: "higher", -1: "lower", 0: "no change"}
    if sign == expected:
        return Agreement("agrees", f"{measured} ({spread}) agrees with the paper's direction ({words[expected]}; {paper})")
    return Agreement(
        "disagrees", f"{measured} ({spread}) disagrees with the paper's direction ({words[expected]}; {paper})"
    )


def training_fnr(metrics_file: Path) -> float:
    """Mean of the finite ``fnr`` values logged in a stage's ``metrics.jsonl`` (NaN if none).

    The values are the library's own diagnostic (``ContrastOutput.stats.fnr``, window-averaged by the
    engine); nothing is recomputed here.
    """
    values = [float(r["fnr"]) for r in read_metrics(metrics_file) if r.get("kind", "train") == "train" and "fnr" in r]
    return summarize(values).mean


def _final_value(metrics_file: Path, key: str) -> float:
    records = [r for r in read_metrics(metrics_file) if r.get("kind", "train") == "train" and key in r]
    return float(records[-1][key]) if records else math.nan


# --------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class CellSpec:
    """One ``(table, row, seed)`` to run."""

    table: str
    row: RowSpec
    seed_index: int

    @property
    def label(self) -> str:
        """``table/row/seed<k>``."""
        return f"{self.table}/{self.row.name}/seed{self.seed_index}"


def plan_cells(config: AblationConfig, only: Sequence[str] | None, seeds: int) -> list[CellSpec]:
    """The cells of the selected tables, seed-major so every row gets a first seed early.

    Raises:
        ValueError: if ``only`` names an unknown table (listing the valid ones).
    """
    names = list(config.tables)
    selected = list(only) if only else names
    unknown = [t for t in selected if t not in config.tables]
    if unknown:
        raise UserError(f"unknown ablation table(s) {unknown}; valid: {names}")
    return [
        CellSpec(table, row, k)
        for k in range(seeds)
        for table in selected
        for row in config.tables[table].rows
    ]


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


_TEACHER_KEYS = ("seed", "data", "teacher_kind", "foundation_teacher", "transformers_teacher", "demo_teacher",
                 "criterion", "contrast", "pseudo_labels", "teacher_pretrain", "teacher_finetune", "teacher_self_train",
                 "eval")


def teacher_key(cfg: PipelineConfig) -> str:
    """Digest of every setting that shapes the adapted teacher and its pseudo-labels."""
    data = config_to_dict(cfg)
    return _digest({k: data[k] for k in _TEACHER_KEYS})


# ------------------------------------------------------------------------------------- file helpers
# ------------------------------------------------------------------------------------- the runner
@dataclass
class _Context:
    config: AblationConfig
    pipeline_path: Path
    base_overrides: list[str]
    root: Path
    resume: bool
    progress: bool
    cleared: set[Path] = field(default_factory=set)
    datasets: dict[str, stages.Datasets] = field(default_factory=dict)

    def pipeline(self, extra: Sequence[str]) -> PipelineConfig:
        return load_pipeline_config(str(self.pipeline_path), [*self.base_overrides, *extra])

    def load_datasets(self, cfg: PipelineConfig) -> stages.Datasets:
        key = _digest(config_to_dict(cfg.data))
        if key not in self.datasets:
            self.datasets[key] = stages.load_datasets(cfg, progress=False)
        return self.datasets[key]

    def fresh(self, folder: Path) -> None:
        """``--no-resume``: remove ``folder`` once per invocation so it is recomputed."""
        if not self.resume and folder not in self.cleared:
            shutil.rmtree(folder, ignore_errors=True)
            self.cleared.add(folder)


def _seeded(cfg: PipelineConfig, seed: int) -> PipelineConfig:
    return dataclasses.replace(cfg, seed=seed)


def _share_pretrained_teacher(cfg: PipelineConfig, base_seed: int, datasets: stages.Datasets) -> None:
    """Pretrain the pipeline teacher once (``base_seed``) and link it into the cache of ``cfg.seed``."""
    if not pretrains_teacher(cfg):
        return
    target = stages.pipeline_teacher_cache(cfg, datasets.class_names)
    if (target / stages.WEIGHTS_FILE).is_file() and (target / "result.json").is_file():
        return
    source_cfg = _seeded(cfg, base_seed)
    stages.pretrained_teacher(source_cfg, datasets, progress=False)
    source = stages.pipeline_teacher_cache(source_cfg, datasets.class_names)
    if source != target:
        link_or_copy(source / stages.WEIGHTS_FILE, target / stages.WEIGHTS_FILE)
        link_or_copy(source / "result.json", target / "result.json")


@dataclass
class _Teacher:
    weights: Path
    pseudo: Path
    metrics: dict[str, float]
    folder: Path


def _prepare_teacher(ctx: _Context, cfg: PipelineConfig, source: str, base_seed: int) -> _Teacher:
    """Adapt (or take) the teacher of ``cfg`` once, pseudo-label with it, evaluate it; cached under ``_shared``."""
    folder = ctx.root / "_shared" / "teachers" / teacher_key(cfg)
    ctx.fresh(folder)
    cfg = dataclasses.replace(cfg, run_dir=str(folder))
    datasets = ctx.load_datasets(cfg)
    _share_pretrained_teacher(cfg, base_seed, datasets)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "teacher.json").is_file():
        atomic_write_json(folder / "teacher.json", {k: config_to_dict(cfg)[k] for k in _TEACHER_KEYS}, indent=2)
    stage = TEACHER_STAGES[source]
    if source == "zero_shot":
        weights = folder / stage / stages.WEIGHTS_FILE
        pseudo = folder / "pseudo_labels_zero_shot.json"
        if not (weights.is_file() and pseudo.is_file()):
            teacher, _ = stages.pretrained_teacher(cfg, datasets, progress=False)
            save_weights(teacher, weights)
            stages.make_pseudo_labels(teacher, cfg, datasets, pseudo, progress=False)
    else:
        results = stages.adapt_teacher(cfg, datasets, resume=True, progress=False)
        weights = folder / stage / stages.WEIGHTS_FILE
        if source == "finetuned":
            pseudo = folder / "pseudo_labels_teacher_finetune.json"  # written by adapt_teacher from the fine-tuned teacher
        else:
            pseudo = folder / "pseudo_labels_teacher_self_train.json"
            if not pseudo.is_file():
                teacher = stages.load_stage_model(cfg, datasets, "teacher_self_train")
                stages.make_pseudo_labels(teacher, cfg, datasets, pseudo, progress=False)
        atomic_write_json(folder / "timings.json", {r.name: r.wall_time for r in results}, indent=2)
    evaluation_file = folder / f"evaluation_{source}.json"
    if evaluation_file.is_file():
        metrics = json.loads(evaluation_file.read_text())
    else:
        metrics = stages.evaluate_stage(cfg, datasets, stage, progress=False)
        atomic_write_json(evaluation_file, metrics, indent=2)
    return _Teacher(weights, pseudo, metrics, folder)


def _cell_config(ctx: _Context, cell: CellSpec, *, with_row: bool, run_dir: Path | None) -> PipelineConfig:
    base = ctx.pipeline([])
    extra = list(cell.row.set) if with_row else []
    cfg = ctx.pipeline(extra)
    cfg = _seeded(cfg, base.seed + cell.seed_index)
    return dataclasses.replace(cfg, run_dir=str(run_dir)) if run_dir is not None else cfg


def _cell_key(cfg: PipelineConfig, cell: CellSpec, teacher_folder: str | None) -> str:
    data = config_to_dict(cfg)
    data.pop("run_dir", None)
    return _digest({"config": data, "teacher": cell.row.teacher, "teacher_folder": teacher_folder,
                    "stages": cell.row.stages})


def run_cell(ctx: _Context, cell: CellSpec, *, status: tqdm | None = None) -> dict[str, Any]:
    """Run one cell (or load / reuse its result); returns the content of its ``cell.json``."""
    folder = ctx.root / cell.table / cell.row.name / f"seed{cell.seed_index}"
    cell_file = folder / CELL_FILE
    ctx.fresh(folder)
    if ctx.resume and cell_file.is_file():
        return json.loads(cell_file.read_text())
    start = time.perf_counter()
    cfg = _cell_config(ctx, cell, with_row=True, run_dir=folder)
    base_seed = ctx.pipeline([]).seed
    teacher: _Teacher | None = None
    if cell.row.teacher != "none":
        if status is not None:
            status.set_postfix_str(f"{cell.label}: teacher ({cell.row.teacher})")
        teacher_cfg = _cell_config(ctx, cell, with_row=cell.row.teacher_settings == "row", run_dir=None)
        teacher = _prepare_teacher(ctx, teacher_cfg, cell.row.teacher, base_seed)
    key = _cell_key(cfg, cell, str(teacher.folder) if teacher else None)
    index = ctx.root / "_shared" / "cells" / f"{key}.json"
    if index.is_file():
        source = Path(json.loads(index.read_text())["cell"])
        if (source / CELL_FILE).is_file() and source != folder:
            record = json.loads((source / CELL_FILE).read_text())
            record.update(table=cell.table, row=cell.row.name, seed=cell.seed_index, reused_from=str(source))
            atomic_write_json(cell_file, record, indent=2)
            return record
    folder.mkdir(parents=True, exist_ok=True)
    datasets = ctx.load_datasets(cfg)
    if teacher is not None:
        link_or_copy(teacher.weights, folder / "teacher_self_train" / stages.WEIGHTS_FILE)
        link_or_copy(teacher.pseudo, folder / "pseudo_labels_teacher_self_train.json")
        atomic_write_json(folder / "distill_teacher.json", {"source": cell.row.teacher, "from": str(teacher.weights)}, indent=2)
    torch.manual_seed(cfg.seed)  # the student's initialisation depends on the cell's seed only
    functions = {"distill": stages.distill, "refine": stages.refine, "supervised": stages.supervised_baseline}
    evaluations: dict[str, dict[str, float]] = {}
    wall_times: dict[str, float] = {}
    for stage in cell.row.stages:
        if status is not None:
            status.set_postfix_str(f"{cell.label}: {stage}")
        result = functions[stage](cfg, datasets, resume=True, progress=False)
        wall_times[stage] = result.wall_time
        evaluations[stage] = stages.evaluate_stage(cfg, datasets, STUDENT_STAGES[stage], progress=False)
    last = evaluations[cell.row.stages[-1]]
    metrics: dict[str, float] = {
        "student_AP": last["AP"],
        "student_AP50": last["AP50"],
        "student_params_M": last["parameters"] / 1e6,
        "train_time": sum(wall_times.values()),
    }
    for stage, evaluation in evaluations.items():
        metrics[f"{stage}_AP"] = evaluation["AP"]
    if "distill" in wall_times:
        distill_log = folder / STUDENT_STAGES["distill"] / "metrics.jsonl"
        metrics["distill_time"] = wall_times["distill"]
        metrics["fnr"] = training_fnr(distill_log)
        metrics["margin"] = _final_value(distill_log, "margin")
    if teacher is not None:
        metrics.update(teacher_AP=teacher.metrics["AP"], teacher_AP50=teacher.metrics["AP50"],
                       teacher_params_M=teacher.metrics["parameters"] / 1e6)
    record = {
        "table": cell.table, "row": cell.row.name, "seed": cell.seed_index, "config_seed": cfg.seed,
        "run_dir": str(folder), "teacher": str(teacher.folder) if teacher else None, "metrics": metrics,
        "evaluations": evaluations, "wall_times": wall_times, "elapsed": time.perf_counter() - start,
    }
    atomic_write_json(cell_file, record, indent=2)  # last: its presence marks the cell finished
    atomic_write_json(index, {"cell": str(folder)}, indent=2)
    return record


def run_ablations(
    config: str | os.PathLike[str],
    *,
    overrides: Sequence[str] = (),
    only: Sequence[str] | None = None,
    seeds: int | None = None,
    quick: bool = False,
    resume: bool = True,
    progress: bool = True,
    run_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Run the selected ablation tables over seeds and write ``<root>/ablations.md``; returns its path.

    Args:
        config: the ablation YAML (``configs/ablations.yaml``).
        overrides: pipeline overrides for every cell (``--set``), applied before each row's own.
        only: table keys to run (default: all).
        seeds: seeds per cell (default: the config's, or its ``quick.seeds`` with ``quick``).
        quick: tiny sizes (``config.QUICK_OVERRIDES`` plus ``quick.overrides``) and ``quick.root``.
        resume: skip finished cells and resume half-finished ones; ``False`` recomputes the selected
            cells and the teachers they use.
        progress: show a progress bar over cells (with ETA).
        run_dir: output root (default: the config's ``root`` / ``quick.root``).

    Raises:
        FileNotFoundError: missing config files.
        ConfigError: bad keys or values in the config or the overrides.
        ValueError: an unknown table in ``only`` or ``seeds < 1``.
    """
    from .config import QUICK_OVERRIDES

    ablation, pipeline_path = load_ablation_config(config)
    seed_count = seeds if seeds is not None else (ablation.quick.seeds if quick else ablation.seeds)
    if seed_count < 1:
        raise UserError(f"seeds must be >= 1, got {seed_count}")
    base_overrides = list(ablation.overrides)
    if quick:
        base_overrides += [*QUICK_OVERRIDES, *ablation.quick.overrides]
    base_overrides += list(overrides)
    root = Path(run_dir) if run_dir is not None else Path(ablation.quick.root if quick else ablation.root)
    ctx = _Context(ablation, pipeline_path, base_overrides, root, resume, progress)
    cells = plan_cells(ablation, only, seed_count)
    base = ctx.pipeline([])
    for cell in cells[: len(cells) // seed_count]:  # fail before any training on a bad override
        ctx.pipeline(cell.row.set)
    if base.threads > 0:
        torch.set_num_threads(base.threads)
    root.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(cells), desc="ablation cells", unit="cell", disable=not progress, dynamic_ncols=True)
    try:
        for cell in cells:
            bar.set_postfix_str(cell.label)
            run_cell(ctx, cell, status=bar)
            bar.update(1)
    finally:
        bar.close()
    selected = list(only) if only else list(ablation.tables)
    return write_ablation_report(ablation, selected, root, seed_count, quick=quick)


# ------------------------------------------------------------------------------------- the report
def _collect(root: Path, table: str, row: RowSpec, seeds: int) -> dict[int, dict[str, Any]]:
    cells = {}
    for k in range(seeds):
        path = root / table / row.name / f"seed{k}" / CELL_FILE
        if path.is_file():
            cells[k] = json.loads(path.read_text())
    return cells


def _per_seed(cells: Mapping[int, Mapping[str, Any]], metric: str) -> dict[int, float]:
    return {k: float(c["metrics"][metric]) for k, c in cells.items() if metric in c["metrics"]}


def format_summary(summary: Summary, number: str = "{:.2f}") -> str:
    """``"mean ± std"`` (``"mean"`` for one seed, ``"—"`` for none); ``number`` formats the mean (a ``+`` in it
    signs the mean only)."""
    if summary.n == 0:
        return "—"
    if summary.n == 1:
        return number.format(summary.mean)
    return f"{number.format(summary.mean)} ± {number.replace('+', '').format(summary.std)}"


def _plot_table(path: Path, spec: TableSpec, summaries: Mapping[str, Summary], metric: str) -> bool:
    names = [row.name for row in spec.rows if summaries[row.name].n > 0]
    if not names:
        return False
    figure = Figure(figsize=(max(4.0, 0.9 * len(names) + 1.5), 3.2), dpi=100)
    FigureCanvasAgg(figure)
    axis = figure.add_subplot(1, 1, 1)
    means = [summaries[n].mean for n in names]
    errors = [summaries[n].std if math.isfinite(summaries[n].std) else 0.0 for n in names]
    colors = ["tab:orange" if n == spec.default else "tab:blue" for n in names]
    axis.bar(np.arange(len(names)), means, yerr=errors, color=colors, capsize=3)
    axis.set_xticks(np.arange(len(names)), names, fontsize=7, rotation=20)
    axis.set_ylabel(METRICS[metric][0])
    axis.set_title(f"{spec.title} (mean ± std over seeds; default in orange)", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return True


def _curves(root: Path, table: str, row: RowSpec, seeds: int, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean over seeds (by step) of ``key`` in the row's distill ``metrics.jsonl``."""
    by_step: dict[int, list[float]] = {}
    for cell in _collect(root, table, row, seeds).values():
        log = Path(cell["run_dir"]) / STUDENT_STAGES["distill"] / "metrics.jsonl"
        if "reused_from" in cell:
            log = Path(cell["reused_from"]) / STUDENT_STAGES["distill"] / "metrics.jsonl"
        for record in read_metrics(log):
            if record.get("kind", "train") == "train" and key in record and math.isfinite(float(record[key])):
                by_step.setdefault(int(record["step"]), []).append(float(record[key]))
    if not by_step:
        return None
    steps = np.asarray(sorted(by_step))
    return steps, np.asarray([np.mean(by_step[s]) for s in steps])


def _figure3(path: Path, config: AblationConfig, selected: Sequence[str], root: Path, seeds: int) -> bool:
    """Figure 3: margin over training for several λ_pxl, FNR with the p = 0.5 line, contrastive loss."""
    def rows_of(table: str, prefix: str = "") -> list[RowSpec]:
        if table not in selected or table not in config.tables:
            return []
        return [r for r in config.tables[table].rows if r.name.startswith(prefix) or r.name == config.tables[table].default]

    margin_rows = [("table8", r) for r in rows_of("table8", "lambda")] or [("table4", r) for r in rows_of("table4")]
    fnr_rows = [("table4", r) for r in rows_of("table4")] or margin_rows
    panels = [("margin", "empirical margin Δ = cos⁺ − cos⁻", margin_rows), ("fnr", "FNR of sampled negatives", fnr_rows),
              ("pxl", "pixel contrastive loss", margin_rows)]
    if not margin_rows and not fnr_rows:
        return False
    figure = Figure(figsize=(12, 3.4), dpi=100)
    FigureCanvasAgg(figure)
    drawn = False
    for index, (key, title, rows) in enumerate(panels):
        axis = figure.add_subplot(1, 3, index + 1)
        for table, row in rows:
            curve = _curves(root, table, row, seeds, key)
            if curve is not None:
                axis.plot(curve[0], curve[1], label=f"{row.name}", linewidth=1.2)
                drawn = True
        if key == "fnr":
            axis.axhline(0.5, color="grey", linestyle="--", linewidth=0.8, label="FNR 0.5 (p = 0.5)")
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("distillation step")
        axis.legend(fontsize=6)
    figure.suptitle("Figure 3 (small scale): student distillation, mean over seeds", fontsize=10)
    figure.tight_layout()
    if drawn:
        figure.savefig(path)
    return drawn


def write_ablation_report(
    config: AblationConfig, selected: Sequence[str], root: Path, seeds: int, *, quick: bool = False
) -> Path:
    """Write ``root/ablations.md`` and its PNG plots from the cells' ``cell.json`` files; returns its path.

    Per table: a Markdown table of mean ± std over seeds, the paired difference against the default
    row (mean and std of the per-seed differences), the paper's number, wall time and its ratio to
    the default row; then one sentence per row and compared metric (:func:`agreement`).
    """
    root.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Ablations at small scale" + (" (--quick: smoke-test sizes, numbers meaningless)" if quick else ""),
        "",
        (f"Each cell is one (table, row, seed) run of the pipeline's own stages on the built-in synthetic dataset; "
        f"{seeds} seed(s) per row. Numbers are mean ± sample std over seeds; Δ is the paired difference against "
        "the table's default row (mean ± std of the per-seed differences). A difference is called *within noise* "
        "when |Δ| is smaller than its seed spread. The teacher is the demo stand-in (a small model pretrained on the "
        "synthetic source domain), not Grounding-DINO + SAM2, and the students are small; the paper's numbers are "
        "Cityscapes at 10 % labels, so only directions are comparable, never magnitudes."),
        "",
    ]
    verdicts: dict[str, int] = {}
    for table in selected:
        spec = config.tables[table]
        rows = {row.name: _collect(root, table, row, seeds) for row in spec.rows}
        default_row = next(r for r in spec.rows if r.name == spec.default)
        lines += [f"## {table}: {spec.title}", ""]
        if spec.description:
            lines += [spec.description, ""]
        if spec.paper_source:
            lines += [f"Paper: {spec.paper_source}", ""]
        header = ["row", *[METRICS[m][0] for m in spec.columns]]
        header += [f"Δ {METRICS[m][0]}" for m in spec.compare] + [f"paper {METRICS[m][0]}" for m in spec.compare]
        header += ["wall time / seed (s)", "× default"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        default_time = summarize(list(_per_seed(rows[spec.default], "train_time").values())).mean
        statements = []
        for row in spec.rows:
            cells = rows[row.name]
            cols = [f"**{row.name}**" if row.name == spec.default else row.name]
            for metric in spec.columns:
                cols.append(format_summary(summarize(list(_per_seed(cells, metric).values())), METRICS[metric][1]))
            for metric in spec.compare:
                if row.name == spec.default:
                    cols.append("(default)")
                else:
                    diff = paired_difference(_per_seed(cells, metric), _per_seed(rows[spec.default], metric))
                    cols.append(format_summary(diff, "{:+.2f}"))
            for metric in spec.compare:
                cols.append(f"{row.paper[metric]:.1f}" if metric in row.paper else "—")
            time_summary = summarize(list(_per_seed(cells, "train_time").values()))
            cols.append(format_summary(time_summary, "{:.0f}"))
            ratio = time_summary.mean / default_time if default_time and math.isfinite(default_time) else math.nan
            cols.append(f"{ratio:.2f}" if math.isfinite(ratio) else "—")
            lines.append("| " + " | ".join(cols) + " |")
            if row.name == spec.default:
                continue
            for metric in spec.compare:
                diff = paired_difference(_per_seed(cells, metric), _per_seed(rows[spec.default], metric))
                paper_row, paper_default = row.paper.get(metric), default_row.paper.get(metric)
                paper_diff = paper_row - paper_default if paper_row is not None and paper_default is not None else None
                verdict = agreement(diff, expected_direction(paper_row, paper_default), paper_diff)
                verdicts[verdict.verdict] = verdicts.get(verdict.verdict, 0) + 1
                note = f" ({row.note})" if row.note else ""
                statements.append(f"- **{row.name}** vs {spec.default}, {METRICS[metric][0]}{note}: {verdict.text}.")
        missing = [name for name, cells in rows.items() if len(cells) < seeds]
        lines += ["", *statements, ""]
        if missing:
            lines += [f"Incomplete rows (fewer than {seeds} finished seeds): {', '.join(missing)}.", ""]
        for metric in spec.compare[:1]:
            summaries = {row.name: summarize(list(_per_seed(rows[row.name], metric).values())) for row in spec.rows}
            if _plot_table(root / f"{table}.png", spec, summaries, metric):
                lines += [f"![{table}]({table}.png)", ""]
    if _figure3(root / "figure3.png", config, selected, root, seeds):
        lines += ["## Figure 3: contrastive diagnostics during distillation", "",
                  ("Margin, FNR (dashed: FNR 0.5, i.e. p = 1 − FNR = 0.5, the threshold of Proposition 3.1) and the "
                  "pixel contrastive loss, logged by the library's own diagnostics (`ContrastOutput.stats`) during "
                  "the student's distillation, averaged over seeds."), "", "![Figure 3](figure3.png)", ""]
    if verdicts:
        lines += ["## Summary", "", ", ".join(f"{count} {verdict}" for verdict, count in sorted(verdicts.items())) + ".", ""]
    path = root / REPORT_FILE
    return atomic_write_text(path, "\n".join(lines) + "\n")
