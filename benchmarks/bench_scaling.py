"""How sampler + loss forward/backward scale: with the number of anchors, and with ``R``.

Two sweeps, each point timed (ours and the naive baseline interleaved on the same inputs) and
measured for peak memory:

- anchors: ``h = w`` over ``--sides`` at fixed ``B`` and ``R`` (default 4 096 … 262 144 pixels);
- negatives: ``R`` over ``--negatives-sweep`` at fixed ``h×w`` (default 64×64, 16 384 anchors).

Providers: ``ours`` (the fusion sampler + the loss module, ``--backend``, default ``auto``: the
Triton kernel on CUDA, chunked elsewhere) and ``naive-full-matrix`` (the authors' prototype: full
score matrix + ``torch.multinomial`` + the reference loss). Naive points whose ``A × M`` float32
score matrix would exceed ``--naive-cap-gib`` are skipped and reported with the estimated bytes.

The log-log slope of time (and memory) against anchors, and against ``R``, is fitted with
``numpy.polyfit``; the goal is a slope ≤ 1.1 for ours (linear) where the naive sampler is ~2.
Writes ``bench_scaling.json``, ``.md`` and ``.png`` (log-log curves).

Usage: ``python benchmarks/bench_scaling.py [--sides 32 45 64 91 128 181 256]
[--negatives-sweep 64 128 256 512 1024] [--naive-cap-gib 8] [--repeats 5] [--smoke]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# this folder (for ``common``) and the repository root (the checkout's ``instcontrast``)
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import common  # noqa: E402
import torch  # noqa: E402
from common import Shape, Step, Timing  # noqa: E402

NAME = "bench_scaling"
PROVIDERS = ("ours", "naive-full-matrix")
DEFAULT_SIDES = (32, 45, 64, 91, 128, 181, 256)
DEFAULT_NEGATIVES = (64, 128, 256, 512, 1024)
SMOKE_SIDES = (4, 8, 16)
SMOKE_NEGATIVES = (8, 16, 32)
GOAL_EXPONENT = 1.1


def build_point(provider: str, shape: dict[str, Any], device: str, backend: str) -> dict[str, Step]:
    """One step (fusion module, or the naive prototype) on freshly generated inputs.

    Args:
        provider: ``"ours"`` or ``"naive-full-matrix"``.
        shape: :class:`common.Shape` fields.
        device: device name.
        backend: loss backend of ``ours``.

    Returns:
        ``{"step": Step}``.
    """
    shape_ = Shape(**shape)
    device_ = torch.device(device)
    inputs = common.make_inputs(shape_, device_)
    generator = torch.Generator(device=device_).manual_seed(shape_.seed + 7)
    strategy = "naive" if provider == "naive-full-matrix" else "fusion"
    return {"step": Step(common.contrast_step_fn(inputs, strategy, backend, generator), (inputs.z_weak,))}


def run_point(
    sweep: str, x: int, shape: Shape, device: torch.device, args: argparse.Namespace, repeats: int
) -> list[dict[str, Any]]:
    """Time and measure both providers at one point of a sweep."""
    points = {name: {"sweep": sweep, "x": x, "provider": name, "pixels": shape.pixels, "negatives": shape.negatives,
                     "status": "ok", "reason": None, "time": None, "peak_bytes": None} for name in PROVIDERS}  # fmt: skip
    matrix_bytes = common.naive_score_matrix_bytes(shape.pixels, shape.pixels)
    points["naive-full-matrix"]["estimated_score_matrix_bytes"] = matrix_bytes
    runnable = list(PROVIDERS)
    if args.skip_naive:
        points["naive-full-matrix"].update(status="skipped", reason="skipped (--skip-naive)")
        runnable.remove("naive-full-matrix")
    elif matrix_bytes > args.naive_cap_gib * 2**30:
        points["naive-full-matrix"].update(
            status="skipped",
            reason=f"skipped — score matrix would need {common.format_bytes(matrix_bytes)} > cap {args.naive_cap_gib:g} GiB",
        )
        runnable.remove("naive-full-matrix")
    steps: dict[str, Step] = {}
    for name in runnable:
        try:
            steps[name] = build_point(name, shape.as_dict_fields(), str(device), args.backend)["step"]
        except Exception as error:  # noqa: BLE001
            points[name].update(status="failed", reason=common.describe_failure(error))
    print(f"{sweep}={x}: timing {', '.join(steps)} at {shape.label()} ...", file=sys.stderr)
    for name, result in common.time_steps(steps, repeats, args.warmup, device).items():
        if isinstance(result, Timing):
            points[name]["time"] = result.as_dict()
        else:
            points[name].update(status="failed", reason=result)
    steps.clear()
    common.release_memory(device)
    for name in runnable:
        if points[name]["status"] != "ok":
            continue
        memory = common.measure_peak_memory(
            build_point,
            {"provider": name, "shape": shape.as_dict_fields(), "device": str(device), "backend": args.backend},
            device,
            warmup=args.warmup,
        )
        points[name]["peak_bytes"] = memory.get("step")
        points[name]["memory_method"] = memory.method
        if memory.error is not None:
            points[name]["reason"] = f"memory: {memory.error}"
    return list(points.values())


def fit_sweep(points: list[dict[str, Any]], sweep: str, provider: str) -> dict[str, Any]:
    """Log-log slopes of time and memory for one provider over one sweep."""
    chosen = sorted(
        (p for p in points if p["sweep"] == sweep and p["provider"] == provider and p["time"] is not None),
        key=lambda p: p["x"],
    )
    xs = [float(p["pixels"] if sweep == "anchors" else p["negatives"]) for p in chosen]
    times = [p["time"]["median_s"] for p in chosen]
    peaks = [p["peak_bytes"] for p in chosen]
    with_memory = [(x, peak) for x, peak in zip(xs, peaks) if peak]
    return {
        "points": len(chosen),
        "time_exponent": common.loglog_slope(xs, times),
        "time_exponent_last_two": common.loglog_slope(xs[-2:], times[-2:]) if len(xs) >= 2 else None,
        "memory_exponent": common.loglog_slope([x for x, _ in with_memory], [m for _, m in with_memory]),
    }


def plot(points: list[dict[str, Any]], path: Path) -> str | None:
    """Log-log curves of time and peak memory for both sweeps; returns why it was skipped, if it was."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        return "plot skipped — matplotlib is not installed (pip install 'instcontrast[bench]')"
    figure, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    for row, (sweep, label) in enumerate((("anchors", "anchors A = B·h·w"), ("negatives", "negatives per anchor R"))):
        for provider, style in (("ours", "o-"), ("naive-full-matrix", "s--")):
            chosen = sorted((p for p in points if p["sweep"] == sweep and p["provider"] == provider), key=lambda p: p["x"])
            xs = [p["pixels"] if sweep == "anchors" else p["negatives"] for p in chosen]
            times = [p["time"]["median_s"] if p["time"] else None for p in chosen]
            peaks = [p["peak_bytes"] / 2**20 if p["peak_bytes"] else None for p in chosen]
            for column, values in ((0, times), (1, peaks)):
                pairs = [(x, v) for x, v in zip(xs, values) if v]
                if pairs:
                    axes[row, column].plot([x for x, _ in pairs], [v for _, v in pairs], style, label=provider)
        for column, ylabel in ((0, "step time (s)"), (1, "peak memory (MiB)")):
            axis = axes[row, column]
            axis.set_xscale("log")
            axis.set_yscale("log")
            axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
            axis.xaxis.set_minor_formatter(NullFormatter())
            axis.set_xlabel(label)
            axis.set_ylabel(ylabel)
            axis.grid(True, which="both", alpha=0.3)
            axis.legend()
    figure.suptitle("sampler + loss forward/backward scaling (log-log)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def describe_goal(entry: dict[str, Any]) -> str:
    """``1.02 (target <= 1.1; met)``."""
    value = "—" if entry["value"] is None else f"{entry['value']:.2f}"
    verdict = {True: "met", False: "NOT met", None: "not measured" if entry["value"] is None else "info"}[entry["meets_target"]]
    return f"{value} (target {entry['target']}; {verdict})"


def render_markdown(
    shape: Shape, device: torch.device, repeats: int, warmup: int, points: list[dict[str, Any]],
    fits: dict[str, dict[str, Any]], goals: dict[str, Any], backend: str, plot_note: str | None,
) -> str:  # fmt: skip
    """The report as Markdown."""
    rows = [
        [p["sweep"], f"{p['pixels']:,}", p["negatives"], p["provider"], p["status"],
         common.format_seconds(p["time"]["median_s"] if p["time"] else None), common.format_bytes(p["peak_bytes"]),
         p["reason"] or ""]
        for p in points
    ]  # fmt: skip
    table = common.markdown_table(["sweep", "anchors", "R", "provider", "status", "step time", "peak memory", "note"], rows)
    fit_rows = []
    for sweep, per_provider in fits.items():
        for provider, fit in per_provider.items():
            fit_rows.append([
                sweep, provider, fit["points"],
                "—" if fit["time_exponent"] is None else f"{fit['time_exponent']:.2f}",
                "—" if fit["time_exponent_last_two"] is None else f"{fit['time_exponent_last_two']:.2f}",
                "—" if fit["memory_exponent"] is None else f"{fit['memory_exponent']:.2f}",
            ])  # fmt: skip
    fit_table = common.markdown_table(
        ["sweep", "provider", "points", "time exponent (fit)", "time exponent (last two)", "memory exponent"], fit_rows
    )
    goal_lines = [f"- {key}: {describe_goal(entry)}" for key, entry in goals.items()]
    return "\n".join([
        common.run_header("Scaling of sampler + loss forward/backward", shape, device, repeats, warmup),
        f"`ours` = fusion sampler + InstanceAwarePixelContrast(backend={backend!r}); "
        "`naive-full-matrix` = full score matrix + torch.multinomial + reference loss. "
        "Anchor sweep at the shape's B and R; R sweep at the shape's h×w.",
        "",
        table,
        "",
        "Log-log slopes (numpy.polyfit of log time/memory against log anchors or log R):",
        "",
        fit_table,
        "",
        *goal_lines,
        "",
        plot_note or "![scaling](bench_scaling.png)",
    ])  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run both sweeps and write the report and the plot."""
    device, repeats = common.prepare_run(args, NAME)
    shape = common.resolve_shape(args)
    sides = args.sides or (SMOKE_SIDES if args.smoke else DEFAULT_SIDES)
    negatives_sweep = args.negatives_sweep or (SMOKE_NEGATIVES if args.smoke else DEFAULT_NEGATIVES)
    points: list[dict[str, Any]] = []
    for side in sides:
        points += run_point("anchors", side, shape.replace(height=side, width=side), device, args, repeats)
    for negatives in negatives_sweep:
        points += run_point("negatives", negatives, shape.replace(negatives=negatives), device, args, repeats)
    fits = {sweep: {provider: fit_sweep(points, sweep, provider) for provider in PROVIDERS} for sweep in ("anchors", "negatives")}
    ours_anchors = fits["anchors"]["ours"]["time_exponent"]
    ours_negatives = fits["negatives"]["ours"]["time_exponent"]
    naive_anchors = fits["anchors"]["naive-full-matrix"]["time_exponent"]
    goals = {
        "ours_time_exponent_anchors": common.target_entry(
            ours_anchors, f"<= {GOAL_EXPONENT}", None if ours_anchors is None else ours_anchors <= GOAL_EXPONENT,
            "log-log slope of step time against anchors, ours",
        ),
        "ours_time_exponent_negatives": common.target_entry(
            ours_negatives, f"<= {GOAL_EXPONENT}", None if ours_negatives is None else ours_negatives <= GOAL_EXPONENT,
            "log-log slope of step time against R, ours",
        ),
        "naive_time_exponent_anchors": common.target_entry(
            naive_anchors, "~2 (info)", None, "log-log slope of step time against anchors, naive full matrix"
        ),
    }
    png_path = args.out / f"{NAME}.png"
    plot_note = plot(points, png_path)
    backend_name = args.backend
    payload = {
        "benchmark": NAME,
        "environment": common.environment_info(device),
        "config": {
            "shape": shape.as_dict(), "sides": list(sides), "negatives_sweep": list(negatives_sweep),
            "naive_cap_gib": args.naive_cap_gib, "backend": backend_name, "repeats": repeats, "warmup": args.warmup,
        },  # fmt: skip
        "points": points,
        "fits": fits,
        "goals": goals,
        "plot": None if plot_note else str(png_path),
        "plot_note": plot_note,
    }
    common.write_report(
        NAME, args.out, payload, render_markdown(shape, device, repeats, args.warmup, points, fits, goals, backend_name, plot_note)
    )
    return payload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--sides", type=int, nargs="+", default=None, help=f"h = w of the anchor sweep (default {DEFAULT_SIDES})")
    parser.add_argument(
        "--negatives-sweep", type=int, nargs="+", default=None, help=f"R values of the R sweep (default {DEFAULT_NEGATIVES})"
    )
    parser.add_argument("--naive-cap-gib", type=float, default=8.0, help="skip naive points whose score matrix exceeds this")
    parser.add_argument("--skip-naive", action="store_true", help="run ours only")
    parser.add_argument("--backend", default="auto", choices=("auto", "chunked", "reference", "triton"), help="loss backend of ours")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    run(parse_args(argv))


if __name__ == "__main__":
    main()
