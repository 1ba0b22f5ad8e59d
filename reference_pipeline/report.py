"""``report.md`` and its plots: AP per stage, loss curves per term, FNR and margin, overlays.

Everything is read back from the run directory (``evaluation.json``, each stage's
``metrics.jsonl``, the pseudo-label files), so a report can be rewritten without retraining.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .atomic import atomic_write_text
from .config import STAGES, PipelineConfig
from .data.loading import first_images
from .data.structures import InstanceSample
from .engine import read_metrics
from .evaluate import InstancePredictions, postprocess_mask2former
from .pseudo_labels import read_pseudo_labels
from .teachers import PIPELINE_KINDS, pipeline_teacher_cache, pretrains_teacher
from .visualize import OverlayPanel, panel_from_predictions, panel_from_sample, save_overlay_grid

__all__ = ["STAGE_LABELS", "OrderCheck", "order_verdict", "paper_order_checks", "seed_values", "write_report"]

#: Row label and what each evaluated model is (from :data:`~reference_pipeline.config.STAGES`).
STAGE_LABELS: dict[str, tuple[str, str]] = {s.name: (s.label, s.description) for s in STAGES}

#: Training stages whose curves are plotted, in pipeline order.
TRAINED_STAGES = tuple(s.name for s in STAGES if s.name != "teacher_zero_shot")

_NON_LOSS_KEYS = {"step", "lr", "lr_encoder", "lr_decoder", "data_time", "step_time", "images_per_s", "fnr", "margin",
                  "acceptance", "fallbacks", "epoch", "time", "kind", "wall_time", "grad_norm", "data_share"}


def _train_records(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in records if r.get("kind", "train") == "train" and "step" in r]


def seed_values(results: Mapping[str, Mapping[str, float]], name: str, metric: str = "AP") -> dict[int, float]:
    """``{seed offset: metric}`` of one evaluated model: ``name`` is seed 0, ``name@seed<k>`` seed ``k``."""
    values = {0: float(results[name][metric])} if name in results else {}
    for key, metrics in results.items():
        if key.startswith(f"{name}@seed"):
            values[int(key.rsplit("@seed", 1)[1])] = float(metrics[metric])
    return values


@dataclass(frozen=True)
class OrderCheck:
    """One of the paper's orderings, judged against the seed spread.

    Attributes:
        claim: the ordering, e.g. ``"distilled student > supervised-only student"``.
        verdict: ``"holds"``, ``"does not hold"``, ``"within noise"`` or ``"not measured"``.
        text: the numbers behind the verdict.
    """

    claim: str
    verdict: str
    text: str


def order_verdict(left: Mapping[int, float], right: Mapping[int, float], *, strict: bool) -> tuple[str, str]:
    r"""Judge ``left > right`` (``strict``) or ``left ≥ right`` on the seeds both have.

    With per-seed differences :math:`\Delta_k = \mathrm{left}_k - \mathrm{right}_k`, mean :math:`\bar\Delta`
    and sample standard deviation :math:`s_\Delta` over :math:`n \ge 2` seeds:

    - strict: **holds** if :math:`\bar\Delta \ge 2 s_\Delta` (and :math:`> 0`), **does not hold** if
      :math:`\bar\Delta \le -2 s_\Delta`, else **within noise**;
    - non-strict: **holds** if :math:`\bar\Delta \ge -s_\Delta`, else **does not hold**.

    With one seed there is no spread: the sign decides, and the text says so.

    Returns:
        ``(verdict, text)``.
    """
    from .ablate import paired_difference

    difference = paired_difference(left, right)
    if difference.n == 0:
        return "not measured", "not measured"
    common = sorted(set(left) & set(right))
    means = f"{np.mean([left[k] for k in common]):.2f} vs {np.mean([right[k] for k in common]):.2f}"
    if difference.n == 1:
        holds = difference.mean > 0 if strict else difference.mean >= 0
        return ("holds" if holds else "does not hold"), f"{means}, Δ {difference.mean:+.2f}; one seed, no spread"
    spread = f"Δ {difference.mean:+.2f} ± {difference.std:.2f} (seed std over {difference.n} seeds)"
    text = f"{means}, {spread}"
    if not strict:
        return ("holds" if difference.mean >= -difference.std else "does not hold"), text
    if difference.mean > 0 and difference.mean >= 2 * difference.std:
        return "holds", text + ", beyond 2× the spread"
    if difference.mean <= -2 * difference.std:
        return "does not hold", text + ", beyond 2× the spread"
    return "within noise", text + ", within 2× the spread"


def paper_order_checks(results: Mapping[str, Mapping[str, float]]) -> list[OrderCheck]:
    """The paper's Table 3 orderings, each judged by :func:`order_verdict` over the seeds that were run."""
    claims = [
        ("refined student ≥ distilled student (− one seed std)", "refine", "distill", False),
        ("distilled student > supervised-only student", "distill", "baseline", True),
        ("refined student > supervised-only student", "refine", "baseline", True),
        ("adapted teacher > zero-shot teacher", "teacher_self_train", "teacher_zero_shot", True),
    ]
    checks = []
    for claim, left, right, strict in claims:
        verdict, text = order_verdict(seed_values(results, left), seed_values(results, right), strict=strict)
        checks.append(OrderCheck(claim, verdict, text))
    return checks


def _plot_learning_curves(run: Path, path: Path, ceiling: float | None, extra: Mapping[str, Path] | None = None) -> bool:
    """Validation AP vs step of every trained stage (the engine's periodic evaluations), plus ``extra`` logs."""
    logs = {STAGE_LABELS[stage][0]: run / stage / "metrics.jsonl" for stage in TRAINED_STAGES}
    curves = {}
    for label, log in {**(extra or {}), **logs}.items():
        records = [r for r in read_metrics(log) if r.get("kind") == "eval" and "AP" in r]
        if records:
            curves[label] = records
    if not curves:
        return False
    figure = Figure(figsize=(7.5, 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.add_subplot(1, 1, 1)
    for label, records in curves.items():
        axis.plot([r["step"] for r in records], [r["AP"] for r in records], marker="o", markersize=3, label=label)
    if ceiling is not None:
        axis.axhline(ceiling, color="grey", linestyle="--", linewidth=0.8, label=f"resolution ceiling {ceiling:.0f}")
    axis.set_xlabel("step of the stage")
    axis.set_ylabel("mask AP on target val (%)")
    axis.set_title("Learning curves (validation AP during training)")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.savefig(path)
    return True


def _plot_ap(results: Mapping[str, Mapping[str, float]], path: Path) -> None:
    names = [n for n in STAGE_LABELS if n in results]
    figure = Figure(figsize=(9, 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.add_subplot(1, 1, 1)
    x = np.arange(len(names))
    axis.bar(x - 0.2, [results[n]["AP"] for n in names], width=0.4, label="mask AP")
    axis.bar(x + 0.2, [results[n]["AP50"] for n in names], width=0.4, label="AP50")
    axis.set_xticks(x, [STAGE_LABELS[n][0].replace(" ", "\n", 1) for n in names], fontsize=7)
    axis.set_ylabel("% on target val")
    axis.legend(fontsize=8)
    axis.set_title("Mask AP per stage")
    figure.savefig(path)


def _plot_losses(run: Path, path: Path) -> None:
    stages = [s for s in TRAINED_STAGES if _train_records(read_metrics(run / s / "metrics.jsonl"))]
    if not stages:
        return
    figure = Figure(figsize=(4.2 * len(stages), 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    for index, stage in enumerate(stages):
        axis = figure.add_subplot(1, len(stages), index + 1)
        records = _train_records(read_metrics(run / stage / "metrics.jsonl"))
        keys = sorted({  # the objective's terms; their sub-terms (``sup/loss_dice_3`` ...) stay in metrics.jsonl
            k for r in records for k, v in r.items()
            if isinstance(v, (int, float)) and k not in _NON_LOSS_KEYS and "/" not in k and k != "loss"
        })
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            axis.plot([p[0] for p in points], [p[1] for p in points], label=key, linewidth=1.2)
        axis.set_title(STAGE_LABELS.get(stage, (stage,))[0], fontsize=9)
        axis.set_xlabel("step")
        axis.set_yscale("log")
        axis.legend(fontsize=6)
    figure.suptitle("Terms of J during training (unweighted, log scale)", fontsize=10)
    figure.savefig(path)


def _plot_contrast(run: Path, path: Path) -> bool:
    stages = [s for s in TRAINED_STAGES if any("fnr" in r for r in read_metrics(run / s / "metrics.jsonl"))]
    if not stages:
        return False
    figure = Figure(figsize=(11, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    panels = [("fnr", "false-negative rate of sampled negatives"), ("margin", "empirical margin Δ = cos⁺ − cos⁻"),
              ("pxl", "pixel contrastive loss")]
    for index, (key, title) in enumerate(panels):
        axis = figure.add_subplot(1, 3, index + 1)
        for stage in stages:
            records = _train_records(read_metrics(run / stage / "metrics.jsonl"))
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], label=STAGE_LABELS[stage][0], linewidth=1.2)
        if key == "fnr":
            axis.axhline(0.5, color="grey", linestyle="--", linewidth=0.8, label="p = 0.5")
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("step")
        axis.legend(fontsize=6)
    figure.savefig(path)
    return True


def _overlays(cfg: PipelineConfig, path: Path) -> bool:
    """Ground truth | pseudo-labels (adapted teacher) | refined student, on the same unlabeled images."""
    from . import stages
    from .inference import predict_dataset

    pseudo_file = cfg.run_path / "pseudo_labels_teacher_self_train.json"
    if not pseudo_file.is_file() or not (cfg.run_path / "refine" / stages.WEIGHTS_FILE).is_file():
        return False
    datasets = stages.load_datasets(cfg, progress=False)
    pseudo = read_pseudo_labels(pseudo_file)
    student = stages.load_stage_model(cfg, datasets, "refine")
    count = min(cfg.eval.overlay_images, len(datasets.unlabeled))
    subset = first_images(datasets.unlabeled, count)
    rows: list[list[OverlayPanel]] = []
    for prediction in predict_dataset(student, subset, image_size=tuple(cfg.data.image_size), progress=False):
        sample: InstanceSample = prediction.sample
        labels = pseudo.get(int(sample.image_id))
        pseudo_panel = OverlayPanel(sample.image, labels.decode_masks(), labels.class_ids, labels.scores,
                                    "pseudo-labels") if labels is not None \
            else OverlayPanel(sample.image, np.zeros((0, sample.height, sample.width), bool), None, None, "pseudo-labels")
        predicted: InstancePredictions = postprocess_mask2former(
            prediction.mask_logits, prediction.class_logits, (sample.height, sample.width), cfg.eval.top_k
        )
        rows.append([
            panel_from_sample(sample, "ground truth (not used)"),
            pseudo_panel,
            panel_from_predictions(sample.image, predicted, "refined student (score ≥ 0.5)", score_threshold=0.5),
        ])
    save_overlay_grid(path, rows, class_names=datasets.class_names)
    return True


def _model_description(cfg: PipelineConfig, name: str) -> str:
    if name.startswith("teacher"):
        if cfg.teacher_kind in PIPELINE_KINDS:
            return "pipeline teacher (" + _architecture(cfg.demo_teacher) + "; stands in for Grounding-DINO + SAM2)"
        if cfg.teacher_kind == "transformers":
            return f"transformers checkpoint `{cfg.transformers_teacher.path}`"
        return "Grounding-DINO + SAM2"
    return "student (" + _architecture(cfg.student) + ")"


def _teacher_sentence(cfg: PipelineConfig) -> str:
    if cfg.teacher_kind in PIPELINE_KINDS:
        source = cfg.teacher_pretrain.source
        pretraining = {"synthetic": "pretrained on the synthetic `source` domain",
                       "none": "not pretrained beyond its ImageNet encoder"}.get(source, f"pretrained on `{source}`")
        return (f"a **pipeline teacher** — a larger model of the student's architecture, {pretraining}. It stands in "
                "for the paper's Grounding-DINO + SAM2 foundation teacher; it is not one.")
    if cfg.teacher_kind == "transformers":
        return f"the `transformers` checkpoint `{cfg.transformers_teacher.path}`, its classes matched to the dataset's by name."
    return "Grounding-DINO + SAM2 loaded from local weights."


def _architecture(config: Any) -> str:
    parts = [str(getattr(config, key)) for key in ("encoder", "neck") if hasattr(config, key)]
    if hasattr(config, "decoder_layers"):
        parts.append(f"{config.decoder_layers}-layer decoder")
    return " + ".join(parts)


def write_report(cfg: PipelineConfig, results: Mapping[str, Mapping[str, float]], *, total_time: float) -> Path:
    """Write ``run_dir/report.md`` with its PNG plots; returns its path."""
    run = cfg.run_path
    run.mkdir(parents=True, exist_ok=True)
    _plot_ap(results, run / "ap_per_stage.png")
    _plot_losses(run, run / "loss_curves.png")
    has_contrast = _plot_contrast(run, run / "contrast_diagnostics.png")
    has_overlays = _overlays(cfg, run / "overlays.png")
    ceiling_file = run / "resolution_ceiling.json"
    ceiling = json.loads(ceiling_file.read_text()) if ceiling_file.is_file() else None
    extra = {}
    if pretrains_teacher(cfg):
        from . import stages

        names = stages.load_datasets(cfg, progress=False).class_names if cfg.teacher_pretrain.source != "synthetic" else ()
        extra["teacher pretraining (source)"] = pipeline_teacher_cache(cfg, names) / "metrics.jsonl"
    has_curves = _plot_learning_curves(run, run / "learning_curves.png", ceiling["AP"] if ceiling else None, extra)
    lines = [
        "# Three-stage distillation: demo report",
        "",
        (f"Dataset: `{cfg.data.format}` at `{cfg.data.root}`, images {cfg.data.image_size[0]}×{cfg.data.image_size[1]}; "
        f"evaluated on {int(next(iter(results.values()))['images']) if results else 0} validation images. "
        f"Total wall time of this run: {total_time / 60:.1f} min on {torch.get_num_threads()} CPU thread(s) "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible)."),
        "",
        (f"Resolution ceiling: perfect masks on the student's stride-{ceiling['stride']} output grid score "
         f"{ceiling['AP']:.1f} mask AP ({ceiling['AP50']:.1f} AP50) on these validation images "
         "(`reference_pipeline.evaluate.resolution_ceiling`)." if ceiling else "Resolution ceiling: not measured."),
        "",
        "Teacher: " + _teacher_sentence(cfg),
        "",
        ("| model | architecture | mask AP | AP50 | mask AP over seeds | parameters | CPU latency / image | "
         "stage wall time |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    from .ablate import summarize

    for name, (label, what) in STAGE_LABELS.items():
        if name not in results:
            continue
        r = results[name]
        over_seeds = summarize(list(seed_values(results, name).values()))
        spread = f"{over_seeds.mean:.2f} ± {over_seeds.std:.2f} ({over_seeds.n})" if over_seeds.n > 1 else "—"
        lines.append(
            f"| {label} | {_model_description(cfg, name)} | {r['AP']:.2f} | {r['AP50']:.2f} | {spread} | "
            f"{r['parameters'] / 1e6:.2f} M | {r['latency_s'] * 1000:.1f} ms | {r['wall_time']:.0f} s |"
        )
    lines += ["", "What each row is: " + "; ".join(f"**{label}** — {what}" for label, what in STAGE_LABELS.values()) + ".", ""]
    seeds = max(len(seed_values(results, "distill")), 1)
    lines += ["## The paper's orderings (Table 3)", "",
              (f"Student rows ran with {seeds} seed(s) from the same adapted teacher and pseudo-labels; each ordering is "
               "judged on the per-seed differences: a strict ordering *holds* when the mean difference is at least twice "
               "its seed standard deviation, is *within noise* when it is smaller than that, and *does not hold* when it "
               "is at least that far the other way."
               + (" With one seed there is no spread to judge against: `--set student_seeds=3` adds seeds 1 and 2 "
                  "(resuming this run)." if seeds == 1 else "")), ""]
    for check in paper_order_checks(results):
        verdict = f"**{check.verdict}**" if check.verdict != "holds" else check.verdict
        lines.append(f"- {check.claim}: {verdict} ({check.text})")
    lines.append("")
    for quality_file in sorted(run.glob("pseudo_labels_*_quality.json")):
        quality = json.loads(quality_file.read_text())
        text = ", ".join(f"{k} {v:.2f}" for k, v in quality.items() if k in ("AP", "AP50", "instances_per_image", "empty_images"))
        lines.append(f"- Pseudo-labels `{quality_file.stem.replace('_quality', '')}`: {text}")
    lines += ["", "## Plots", "", "![AP per stage](ap_per_stage.png)", ""]
    if has_curves:
        lines += [("Target-validation AP during each stage's training (seed 0; the teacher's pretraining trains on the "
                   "source domain, so its curve is the zero-shot AP); the dashed line is the AP that perfect masks at "
                   "the model's output resolution reach (its resolution ceiling)."), "",
                  "![Learning curves](learning_curves.png)", ""]
    lines += ["![Loss terms](loss_curves.png)", ""]
    if has_contrast:
        lines += ["FNR and margin come from the library's own diagnostics (`ContrastOutput.stats`) during training.", "",
                  "![FNR, margin and contrastive loss](contrast_diagnostics.png)", ""]
    if has_overlays:
        lines += [("Unlabeled images: ground truth (never used for training), the adapted teacher's pseudo-labels, "
                  "and the refined student's predictions."), "", "![Overlays](overlays.png)", ""]
    lines += ["## Steps per stage", ""]
    for stage in ("teacher_pretrain", "teacher_finetune", "teacher_self_train", "distill", "refine", "baseline"):
        stage_cfg = getattr(cfg, stage)
        records = _train_records(read_metrics(run / stage / "metrics.jsonl"))
        shares = [float(r["data_share"]) for r in records if "data_share" in r]
        timing = f"; data loading {np.mean(shares):.1%} of step time" if shares else ""
        lines.append(f"- `{stage}`: {stage_cfg.train.steps} steps × batch {stage_cfg.train.batch_size}, "
                     f"λ_semi {stage_cfg.lambda_semi}, λ_pxl {stage_cfg.lambda_pxl}{timing}")
    path = run / "report.md"
    return atomic_write_text(path, "\n".join(lines) + "\n")
