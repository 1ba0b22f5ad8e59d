"""Efficiency of the full-size teacher versus the full-size student: parameters, FLOPs and latency.

The paper distills a 568M-parameter fused ensemble (Grounding-DINO Swin-L ≈ 342M + SAM2 Hiera-L
≈ 217–224M) into a 52M-parameter student (about 11× smaller). This benchmark measures, in one run:

* **parameters** of both models, built on the ``meta`` device (no memory, no initialization; the
  count does not depend on the weights);
* **FLOPs** of one inference forward pass, counted by :class:`torch.utils.flop_counter.FlopCounterMode`
  (matrix products, convolutions and attention; elementwise ops and the grid-sample of Grounding-DINO's
  deformable attention are not counted), at 512×1024 (Cityscapes crops) and at the demo size 128×128;
* **latency** of the same forward pass (median of the repeats after one warm-up pass, which is the
  FLOP-counting pass), with random weights: cost does not depend on the weights.

The teacher runs with ``box_threshold=0`` so that all ``K = 100`` boxes prompt SAM2 (the worst case,
and deterministic with random weights). As in the models' own processors, SAM2 embeds a 1024×1024
resize of the image and Grounding-DINO sees it with the shorter side at 800 pixels (longer side at
most 1333; its two-stage selection of 900 queries needs that many encoder tokens), so the teacher's
cost barely shrinks at the demo size. The text prompt is the eight Cityscapes instance
classes, tokenized with the tiny offline vocabulary (no BERT vocabulary can be downloaded; the ids
of the special tokens are BERT's, and the prompt length, 18 tokens, is close to BERT's).

On CPU the full teacher at 512×1024 is slow on a shared machine: ``--teacher-budget`` seconds bound
its timed repeats (at least one always runs) and the report says how many ran. On a CUDA machine the
same command measures on the GPU (``--device auto``), unchanged.

Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_models.py               # full sizes, writes results/
    python benchmarks/bench_models.py --smoke --out /tmp/bench        # tiny models, seconds

Writes ``bench_models.json``, ``bench_models.md`` and ``bench_models.png``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    DEFAULT_RESULTS_DIR,
    environment_info,
    format_seconds,
    markdown_table,
    select_device,
    synchronize,
    write_report,
)
from reference_pipeline.models.teacher import (
    FoundationTeacher,
    TeacherConfig,
    grounding_dino_swin_large_config,
    sam2_hiera_large_config,
)
from reference_pipeline.models.tiny_configs import tiny_teacher_components, tiny_tokenizer

NAME = "bench_models"
CITYSCAPES_CLASSES = ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
PAPER = {"teacher_parameters": 568e6, "student_parameters": 52e6, "parameter_ratio": 11.0}
FULL_SIZES = ((512, 1024), (128, 128))
SMOKE_SIZES = ((64, 96),)

ModelBuilder = Callable[[], nn.Module]


# --------------------------------------------------------------------------------------------------
# Model builders.
# --------------------------------------------------------------------------------------------------


def teacher_builder(smoke: bool) -> tuple[ModelBuilder, str]:
    """A builder of the teacher with random weights, and its description."""
    config = TeacherConfig(class_names=CITYSCAPES_CLASSES, box_threshold=0.0, num_queries=100)
    if smoke:
        components = tiny_teacher_components(CITYSCAPES_CLASSES)
        config = TeacherConfig(
            class_names=CITYSCAPES_CLASSES,
            box_threshold=0.0,
            num_queries=10,
            embedding_dim=16,
            detector_shortest_edge=None,
        )

        def build_tiny() -> nn.Module:
            return FoundationTeacher.from_configs(
                config, components.detector_config, components.segmenter_config, components.tokenizer
            )

        return build_tiny, "tiny Grounding-DINO + tiny SAM2 (64×64), K=10 boxes (smoke)"
    tokenizer = tiny_tokenizer([word for name in CITYSCAPES_CLASSES for word in name.split()])

    def build_full() -> nn.Module:
        detector_config, segmenter_config = grounding_dino_swin_large_config(), sam2_hiera_large_config()
        return FoundationTeacher.from_configs(config, detector_config, segmenter_config, tokenizer)

    return build_full, "Grounding-DINO Swin-L + SAM2 Hiera-L, K=100 boxes"


def student_builder(smoke: bool) -> tuple[ModelBuilder | None, str]:
    """A builder of the student (``StudentConfig.paper``, or the demo student for ``--smoke``).

    Returns ``(None, reason)`` when ``reference_pipeline.models.student`` is not available.
    """
    try:
        from reference_pipeline.models.student import Student, StudentConfig
    except ImportError as error:
        return None, f"student unavailable ({error})"
    num_classes = len(CITYSCAPES_CLASSES)
    if smoke:
        try:
            from reference_pipeline.models.demo import demo_student_config
        except ImportError as error:
            return None, f"demo student unavailable ({error})"

        return lambda: Student(demo_student_config(num_classes)), "demo student (smoke)"
    return lambda: Student(StudentConfig.paper(num_classes)), "StudentConfig.paper: DINOv2-S + DPT + 9-layer decoder"


# --------------------------------------------------------------------------------------------------
# Measurements.
# --------------------------------------------------------------------------------------------------


def count_parameters_on_meta(build: ModelBuilder) -> dict[str, int]:
    """Parameters of a model built on the ``meta`` device (total, and per child module)."""
    with torch.device("meta"):
        model = build()
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    counts = {name: count for name, count in counts.items() if count}
    counts["total"] = sum(p.numel() for p in model.parameters())
    del model
    return counts


def measure_forward(
    model: nn.Module, height: int, width: int, device: torch.device, repeats: int, budget_s: float
) -> dict[str, Any]:
    """FLOPs of one no-grad forward pass (the warm-up), then timed passes within a time budget.

    Args:
        model: in eval mode, on ``device``.
        height: image height.
        width: image width.
        device: where to run.
        repeats: at most this many timed passes (at least one).
        budget_s: stop timing once this many seconds have been spent (after the first pass).

    Returns:
        ``{"flops", "warmup_s", "times_s", "median_s", "repeats"}``.
    """
    images = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0)).to(device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad():
        synchronize(device)
        start = time.perf_counter()
        with counter:
            model(images)
        synchronize(device)
        warmup = time.perf_counter() - start
        times: list[float] = []
        while len(times) < max(1, repeats):
            start = time.perf_counter()
            model(images)
            synchronize(device)
            times.append(time.perf_counter() - start)
            if sum(times) > budget_s:
                break
    return {
        "flops": int(counter.get_total_flops()),
        "warmup_s": warmup,
        "times_s": times,
        "median_s": statistics.median(times),
        "repeats": len(times),
    }


def measure_model(
    build: ModelBuilder,
    sizes: tuple[tuple[int, int], ...],
    device: torch.device,
    repeats: int,
    budget_s: float,
) -> dict[str, Any]:
    """Parameters (meta device) and per-size FLOPs and latency of one model."""
    record: dict[str, Any] = {"parameters": count_parameters_on_meta(build), "sizes": {}}
    torch.manual_seed(0)
    model = build().to(device).eval()
    for height, width in sizes:
        record["sizes"][f"{height}x{width}"] = measure_forward(model, height, width, device, repeats, budget_s)
        print(f"  {height}x{width}: {record['sizes'][f'{height}x{width}']}", file=sys.stderr, flush=True)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or ``None`` when either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def compute_ratios(teacher: dict[str, Any], student: dict[str, Any] | None) -> dict[str, Any]:
    """Teacher / student ratios of parameters, FLOPs and latency (``None`` without a student)."""
    if student is None:
        return {}
    ratios: dict[str, Any] = {
        "parameters": ratio(teacher["parameters"]["total"], student["parameters"]["total"]),
    }
    for size, teacher_size in teacher["sizes"].items():
        student_size = student["sizes"].get(size, {})
        ratios[f"flops@{size}"] = ratio(teacher_size["flops"], student_size.get("flops"))
        ratios[f"latency@{size}"] = ratio(teacher_size["median_s"], student_size.get("median_s"))
    return ratios


# --------------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------------


def _millions(count: int | None) -> str:
    return "—" if count is None else f"{count / 1e6:.1f}M"


def _giga(flops: int | None) -> str:
    return "—" if flops is None else f"{flops / 1e9:,.1f}"


def _times(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}×"


def render_markdown(report: dict[str, Any]) -> str:
    """The Markdown report: one table of costs, one of ratios, the parameter breakdown."""
    info, models = report["environment"], report["models"]
    lines = [
        "# Teacher vs student: parameters, FLOPs, latency",
        "",
        (
            f"Device: {info['device']} ({info.get('device_name', '')}), torch {info['torch']}, "
            f"{info['torch_threads']} threads. Random weights (cost does not depend on them); batch 1, inference "
            "(no grad). FLOPs from `torch.utils.flop_counter` (matmuls, convolutions, attention). Latency: median "
            "of the timed repeats after the FLOP-counting warm-up pass."
        ),
        "",
    ]
    headers = ["model", "parameters"]
    sizes = report["sizes"]
    for size in sizes:
        headers += [f"GFLOPs @{size}", f"latency @{size} (repeats)"]
    rows = []
    for role in ("teacher", "student"):
        record = models.get(role)
        if record is None:
            rows.append([f"{role}: {report['descriptions'][role]}", "—"] + ["—"] * (2 * len(sizes)))
            continue
        row = [f"{role}: {report['descriptions'][role]}", _millions(record["parameters"]["total"])]
        for size in sizes:
            measured = record["sizes"][size]
            row += [_giga(measured["flops"]), f"{format_seconds(measured['median_s'])} ({measured['repeats']})"]
        rows.append(row)
    lines += [markdown_table(headers, rows), ""]
    ratios = report["ratios"]
    if ratios:
        ratio_rows = [["parameters", _times(ratios["parameters"]), f"{PAPER['parameter_ratio']:.0f}× (568M / 52M)"]]
        for size in sizes:
            ratio_rows.append([f"FLOPs @{size}", _times(ratios[f"flops@{size}"]), ""])
            ratio_rows.append([f"latency @{size}", _times(ratios[f"latency@{size}"]), ""])
        lines += ["## Teacher / student", "", markdown_table(["quantity", "measured", "paper"], ratio_rows), ""]
    lines += ["## Parameters by component", ""]
    for role in ("teacher", "student"):
        record = models.get(role)
        if record is not None:
            parts = ", ".join(f"{name} {_millions(count)}" for name, count in record["parameters"].items())
            lines.append(f"- {role}: {parts}")
    lines += [
        "",
        (
            f"Paper: teacher {_millions(int(PAPER['teacher_parameters']))} (Grounding-DINO Swin-L ≈ 342M + SAM2 "
            f"Hiera-L ≈ 217–224M), student {_millions(int(PAPER['student_parameters']))}."
        ),
    ]
    for note in report["notes"]:
        lines.append(f"\nNote: {note}")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path | None:
    """Bar charts (log scale) of parameters, FLOPs and latency, teacher next to student."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models, sizes = report["models"], report["sizes"]
    panels: list[tuple[str, list[str], dict[str, list[float]]]] = [
        ("parameters (M)", ["all"], {}),
        ("GFLOPs", list(sizes), {}),
        ("latency (s)", list(sizes), {}),
    ]
    for role, record in models.items():
        if record is None:
            continue
        panels[0][2][role] = [record["parameters"]["total"] / 1e6]
        panels[1][2][role] = [record["sizes"][size]["flops"] / 1e9 for size in sizes]
        panels[2][2][role] = [record["sizes"][size]["median_s"] for size in sizes]
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    colours = {"teacher": "#c44e52", "student": "#4c72b0"}
    for axis, (title, labels, values) in zip(axes, panels):
        width = 0.38
        for offset, (role, numbers) in enumerate(values.items()):
            positions = [index + (offset - 0.5) * width for index in range(len(labels))]
            bars = axis.bar(positions, numbers, width, label=role, color=colours[role])
            axis.bar_label(bars, labels=[f"{number:.3g}" for number in numbers], fontsize=7)
        axis.set_xticks(range(len(labels)), labels)
        axis.set_yscale("log")
        axis.set_title(title)
    ratios = report["ratios"]
    if ratios.get("parameters"):
        figure.suptitle(f"teacher / student parameters: {ratios['parameters']:.1f}× (paper: 568M / 52M ≈ 11×)")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# --------------------------------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models at 64x96, for the test suite")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per model and size (at most)")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of timed repeats per model and size")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS_DIR, help="output folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and write the JSON, Markdown and PNG reports."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    sizes = SMOKE_SIZES if args.smoke else FULL_SIZES
    repeats = 2 if args.smoke else args.repeats
    build_teacher, teacher_description = teacher_builder(args.smoke)
    build_student, student_description = student_builder(args.smoke)
    notes = [
        (
            "The teacher prompts SAM2 with all of its K boxes (box_threshold=0; K in the description) and SAM2 embeds "
            "a square resize of every image (1024×1024 at full size); Grounding-DINO sees the image resized as its processor does (shorter side 800, longer side at most 1333) at full size, at its own size in smoke runs."
        )
    ]
    print(f"teacher: {teacher_description}", file=sys.stderr, flush=True)
    teacher = measure_model(build_teacher, sizes, device, repeats, args.budget)
    student = None
    if build_student is None:
        notes.append(f"No student measured: {student_description}.")
    else:
        print(f"student: {student_description}", file=sys.stderr, flush=True)
        student = measure_model(build_student, sizes, device, repeats, args.budget)
    for size, measured in teacher["sizes"].items():
        if measured["repeats"] < repeats:
            notes.append(
                f"Teacher @{size}: only {measured['repeats']} timed repeat(s) fit the {args.budget:.0f} s budget on "
                "this machine (the FLOP-counting warm-up pass ran before them)."
            )
    report: dict[str, Any] = {
        "environment": environment_info(device),
        "smoke": args.smoke,
        "sizes": [f"{height}x{width}" for height, width in sizes],
        "descriptions": {"teacher": teacher_description, "student": student_description},
        "models": {"teacher": teacher, "student": student},
        "ratios": compute_ratios(teacher, student),
        "paper": PAPER,
        "notes": notes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(NAME, args.out, report, render_markdown(report))
    png = plot(report, args.out / f"{NAME}.png")
    if png is not None:
        print(f"wrote {png}")
    return report


if __name__ == "__main__":
    main()
