"""Sampling cost and memory against prediction confidence: fusion vs uniform, from untrained to confident.

The exact sampler's cost used to depend on how confident the predictions were (a uniform proposal
accepts with the mean score, ~0.0007 for an untrained model). This benchmark checks that it no
longer does:

1. **Step time** at the P1 size (``B=4, 64×64, K=50, C=8, D=128, R=256``): one training step
   (``InstanceAwarePixelContrast`` forward + backward, ``chunked`` backend) with ``strategy="fusion"``
   vs ``strategy="uniform"`` on the same embeddings, for mask/class logits ``scale · N(0, 1)``
   (``--scales``, default 0.03, 0.1, 0.3, 1, 5) and for the outputs of a randomly initialised
   ``transformers`` ``Mask2FormerForUniversalSegmentation`` (tiny Swin config, built offline),
   all timed interleaved in one process. Per case: the fusion/uniform ratio (target ≤ 1.2 median,
   ≤ 1.3 in every run), the acceptance rate, the exact mean score, proposals per negative, rounds,
   fallback slots and zero-pool anchors. The same cases are timed again at paper scale
   (``B=8, 64×128, K=100``; ``--skip-paper-timing`` skips them).
2. **Peak RSS** of one fusion step in a fresh process per measurement (default glibc ``malloc``,
   nothing tuned): the process's peak resident set (``VmHWM``) and the peak above the RSS just
   before the step. Small case (``B=4, 32×32, K=16, D=32, R=256``) for every scale: must be flat.
   Paper scale (``B=8, 64×128, K=100, C=8, D=128, R=256``), with and without a filled 10k memory
   bank, scales 0.03, 1 and 5, ``--paper-repeats`` runs each: every run ≤ 2 GiB.

Usage: ``python benchmarks/bench_confidence.py [--repeats 5] [--paper-repeats 5] [--skip-paper]
[--skip-paper-timing] [--out benchmarks/results] [--smoke]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# this folder (for ``common``) and the repository root (the checkout's ``instcontrast``)
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import common
import torch
from common import Shape, Step

from instcontrast import InstanceAwarePixelContrast

NAME = "bench_confidence"
SCALES = (0.03, 0.1, 0.3, 1.0, 5.0)
PAPER_SCALES = (0.03, 1.0, 5.0)
STRATEGIES = ("fusion", "uniform")
MASK2FORMER = "mask2former-random-init"
SMALL_SHAPE = Shape(batch=4, height=32, width=32, queries=16, classes=8, dim=32, negatives=256)
PAPER_SHAPE = Shape(batch=8, height=64, width=128, queries=100, classes=8, dim=128, negatives=256)
SMOKE_SMALL_SHAPE = Shape(batch=2, height=8, width=8, queries=6, classes=3, dim=16, negatives=16)
BANK_SIZE = 10_000
RSS_LIMIT_BYTES = 3 * 2**29  # 1.5 GiB
TARGET_RATIO, BAR_RATIO = 1.2, 1.3  # fusion / uniform step: median over runs, every run


def random_logits(shape: Shape, scale: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask and class logits ``scale · N(0, 1)``: scale 0.03 is an untrained head, 5 a confident one.

    Returns:
        ``mask_logits (B, K, h, w)`` and ``class_logits (B, K, C+1)``.
    """
    generator = torch.Generator().manual_seed(seed + 11)
    mask_logits = scale * torch.randn(shape.batch, shape.queries, shape.height, shape.width, generator=generator)
    class_logits = scale * torch.randn(shape.batch, shape.queries, shape.classes + 1, generator=generator)
    return mask_logits, class_logits


def mask2former_outputs(shape: Shape, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Outputs of a randomly initialised ``transformers`` Mask2Former on random images.

    A tiny Swin backbone (``embed_dim=16``, one block per stage) and a 2-layer decoder with
    ``K`` queries and ``C`` classes, built from config (no download); images of ``(4h, 4w)`` pixels
    so the mask logits come out at the feature grid ``(h, w)``.

    Returns:
        ``(model output, description)``; the output is what the loss module is given.
    """
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    backbone = SwinConfig(
        embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
        image_size=4 * max(shape.height, shape.width), out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    config = Mask2FormerConfig(
        backbone_config=backbone, num_queries=shape.queries, num_labels=shape.classes, hidden_dim=32,
        mask_feature_size=32, feature_size=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
        dim_feedforward=64, encoder_feedforward_dim=64, common_stride=4, use_pretrained_backbone=False,
        use_timm_backbone=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    images = torch.randn(shape.batch, 3, 4 * shape.height, 4 * shape.width, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        output = model(pixel_values=images)
    masks = output.masks_queries_logits
    description = {
        "mask_logits_shape": list(masks.shape),
        "mask_logit_std_across_pixels": float(masks.std(dim=(2, 3)).mean()),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return output, description


def step_fn(inputs: common.BenchInputs, strategy: str, predictions: tuple[Any, Any], generator: torch.Generator):
    """One training step of the module (forward + backward) on given predictions; returns ``(step, criterion)``."""
    shape = inputs.shape
    criterion = InstanceAwarePixelContrast(
        temperature=shape.temperature, num_negatives=shape.negatives, strategy=strategy, backend="chunked", compute_stats=False
    )
    mask_logits, class_logits = predictions

    def step() -> None:
        out = criterion(inputs.z_weak, inputs.z_strong, mask_logits, class_logits, generator=generator)
        out.loss.backward()

    return step, criterion


def draw_counters(inputs: common.BenchInputs, predictions: tuple[Any, Any], seed: int) -> dict[str, Any]:
    """One fusion draw: acceptance, exact mean score, proposals per negative, rounds, fallbacks."""
    shape = inputs.shape
    criterion = InstanceAwarePixelContrast(num_negatives=shape.negatives, strategy="fusion", compute_stats=False)
    with torch.no_grad():
        out = criterion(inputs.z_weak, inputs.z_strong, *predictions, generator=torch.Generator().manual_seed(seed))
    samples = out.samples
    return {
        "acceptance": samples.acceptance_rate,
        "min_expected_acceptance": samples.min_expected_acceptance,
        "mean_score": samples.mean_score,
        "proposals_per_negative": samples.proposals / max(1, out.stats.num_anchors * shape.negatives),
        "rounds": samples.rounds,
        "fallbacks": samples.fallbacks,
        "zero_pool_anchors": samples.zero_pool_anchors,
    }


def timing_cases(shape: Shape, scales: tuple[float, ...], with_mask2former: bool) -> dict[str, tuple[Any, Any]]:
    """Case name → predictions ``(mask_logits, class_logits)`` (or ``(model output, None)``)."""
    cases: dict[str, tuple[Any, Any]] = {f"scale={scale:g}": random_logits(shape, scale) for scale in scales}
    if with_mask2former:
        output, _ = mask2former_outputs(shape)
        cases[MASK2FORMER] = (output, None)
    return cases


def run_timing(shape: Shape, scales: tuple[float, ...], repeats: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """Interleaved fusion/uniform step times for every case, with the fusion sampler's counters."""
    inputs = common.make_inputs(shape, device)
    cases = timing_cases(shape, scales, with_mask2former=True)
    description = mask2former_outputs(shape)[1]
    steps: dict[str, Step] = {}
    generator = torch.Generator().manual_seed(shape.seed + 7)
    for case, predictions in cases.items():
        for strategy in STRATEGIES:
            fn, _ = step_fn(inputs, strategy, predictions, generator)
            steps[f"{case}/{strategy}"] = Step(fn, (inputs.z_weak,))
    results = common.time_steps(steps, repeats, warmup, device)
    rows = []
    for case, predictions in cases.items():
        fusion, uniform = results[f"{case}/fusion"], results[f"{case}/uniform"]
        ok = isinstance(fusion, common.Timing) and isinstance(uniform, common.Timing)
        ratio = fusion.median / uniform.median if ok else None
        rows.append({
            "case": case,
            "fusion": fusion.as_dict() if isinstance(fusion, common.Timing) else {"error": fusion},
            "uniform": uniform.as_dict() if isinstance(uniform, common.Timing) else {"error": uniform},
            "fusion_over_uniform": ratio,
            "meets_target": None if ratio is None else ratio <= TARGET_RATIO,
            "meets_bar": None if ratio is None else ratio <= BAR_RATIO,
            **draw_counters(inputs, predictions, shape.seed + 5),
        })  # fmt: skip
    return {"shape": shape.as_dict(), "mask2former": description, "cases": rows}


# --------------------------------------------------------------------------------------------------
# Peak RSS in fresh processes.
# --------------------------------------------------------------------------------------------------


def _proc_status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: build the inputs (and bank), one warm-up step, one measured step.

    Returns:
        ``peak_rss_bytes`` (the process's ``VmHWM`` at the end: its whole peak resident set),
        ``step_peak_above_bytes`` (``VmHWM`` after the measured step minus ``VmRSS`` just before it,
        the counter reset via ``/proc/self/clear_refs``), and the sampler's counters.
    """
    torch.set_num_threads(spec.get("threads", 1))
    shape = Shape(**spec["shape"])
    inputs = common.make_inputs(shape, "cpu")
    bank = common.filled_memory_bank(inputs, spec["bank"]) if spec["bank"] else None
    mask_logits, class_logits = random_logits(shape, spec["scale"])
    criterion = InstanceAwarePixelContrast(
        temperature=shape.temperature, num_negatives=shape.negatives, strategy="fusion", backend="chunked",
        compute_stats=False, memory_bank=bank,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(shape.seed + 7)
    can_reset = common.cpu_memory_measurement_available()
    process_peak = _proc_status()["VmHWM"]  # inputs, bank
    out = None
    timings = []
    for _ in range(2):  # warm-up, measured
        inputs.z_weak.grad = None
        before = _proc_status()["VmRSS"]
        if can_reset:  # VmHWM restarts from the current RSS: the next reading is this step's peak
            with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
                clear_refs.write("5")
        start = time.perf_counter()
        out = criterion(inputs.z_weak, inputs.z_strong, mask_logits, class_logits, generator=generator)
        out.loss.backward()
        timings.append(time.perf_counter() - start)
        after = _proc_status()["VmHWM"]
        process_peak = max(process_peak, after)
    samples = out.samples
    return {
        "peak_rss_bytes": process_peak,
        "step_peak_above_bytes": max(0, after - before) if can_reset else None,
        "rss_before_step_bytes": before,
        "step_s": timings[-1],
        "acceptance": samples.acceptance_rate,
        "rounds": samples.rounds,
        "fallbacks": samples.fallbacks,
        "zero_pool_anchors": samples.zero_pool_anchors,
        "pool_size": out.stats.pool_size,
    }


def measure_fresh(spec: dict[str, Any], timeout_s: float = 1800.0) -> dict[str, Any]:
    """Run :func:`memory_worker` in a fresh Python process (default allocator); errors are returned."""
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:] if done.stderr else ''}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_memory(shape: Shape, scales: tuple[float, ...], bank_sizes: tuple[int, ...], repeats: int, threads: int) -> list[dict[str, Any]]:
    """Peak RSS of a fusion step per (bank, scale), ``repeats`` fresh processes each (round-robin)."""
    rows = {(bank, scale): {"bank": bank, "scale": scale, "runs": []} for bank in bank_sizes for scale in scales}
    for _ in range(repeats):
        for (bank, scale), row in rows.items():
            spec = {"shape": shape.as_dict_fields(), "scale": scale, "bank": bank, "threads": threads}
            row["runs"].append(measure_fresh(spec))
    for row in rows.values():
        peaks = [run["peak_rss_bytes"] for run in row["runs"] if "peak_rss_bytes" in run]
        above = [run["step_peak_above_bytes"] for run in row["runs"] if run.get("step_peak_above_bytes") is not None]
        row["max_peak_rss_bytes"] = max(peaks) if peaks else None
        row["min_peak_rss_bytes"] = min(peaks) if peaks else None
        row["median_step_peak_above_bytes"] = statistics.median(above) if above else None
        row["max_fallbacks"] = max((run.get("fallbacks", 0) for run in row["runs"]), default=None)
        row["errors"] = [run["error"] for run in row["runs"] if "error" in run]
    return list(rows.values())


# --------------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------------


def _timing_table(timing: dict[str, Any]) -> str:
    rows = [
        [
            case["case"],
            common.format_seconds(case["fusion"].get("median_s")),
            common.format_seconds(case["uniform"].get("median_s")),
            common.format_ratio(case["fusion_over_uniform"]),
            {True: "yes", False: "NO", None: "—"}[case["meets_target"]],
            {True: "yes", False: "NO", None: "—"}[case["meets_bar"]],
            f"{case['acceptance']:.3f}",
            f"{case['min_expected_acceptance']:.3f}",
            f"{case['mean_score']:.2e}",
            f"{case['proposals_per_negative']:.2f}",
            case["rounds"],
            case["fallbacks"],
            case["zero_pool_anchors"],
        ]
        for case in timing["cases"]
    ]
    return common.markdown_table(
        ["case", "fusion step", "uniform step", "fusion/uniform", f"≤ {TARGET_RATIO}", f"≤ {BAR_RATIO}", "acceptance",
         "min ρ", "mean score", "proposals/negative", "rounds", "fallbacks", "zero-pool anchors"],
        rows,
    )


def _shape_of(section: dict[str, Any]) -> Shape:
    return Shape(**{k: v for k, v in section["shape"].items() if k not in ("pixels", "prob_dim")})


def render_markdown(payload: dict[str, Any], device: torch.device, repeats: int, warmup: int) -> str:
    """The report as Markdown."""
    timing = payload["timing"]
    lines = [
        common.run_header("Sampling cost against prediction confidence (fusion vs uniform)", _shape_of(timing), device, repeats, warmup),
        (
            "Step = `InstanceAwarePixelContrast` forward + backward (`chunked`), timed interleaved; logits "
            "`scale · N(0,1)` or a randomly initialised `transformers` Mask2Former "
            f"(mask-logit std across pixels {timing['mask2former']['mask_logit_std_across_pixels']:.3f})."
        ),
        "",
        _timing_table(timing),
        "",
    ]
    paper_timing = payload.get("timing_paper")
    if paper_timing:
        lines += [f"## Step time at paper scale: {_shape_of(paper_timing).label()}", "", _timing_table(paper_timing), ""]
    for title, key in (("Peak RSS, small case", "memory_small"), ("Peak RSS, paper scale", "memory_paper")):
        section = payload.get(key)
        if not section:
            continue
        mem_shape = Shape(**{k: v for k, v in section["shape"].items() if k not in ("pixels", "prob_dim")})
        mem_rows = [
            [
                row["bank"], f"{row['scale']:g}", len(row["runs"]),
                ", ".join(common.format_bytes(run.get("peak_rss_bytes")) for run in row["runs"]),
                common.format_bytes(row["median_step_peak_above_bytes"]),
                row["max_fallbacks"],
                "; ".join(row["errors"]) or "",
            ]
            for row in section["rows"]
        ]  # fmt: skip
        lines += [
            f"## {title}: {mem_shape.label()}",
            "",
            (
                "Fresh process per run, default glibc malloc. Peak RSS = the process's `VmHWM` (inputs, model "
                "state and the step); above-step = `VmHWM` after the step minus `VmRSS` before it."
            ),
            "",
            common.markdown_table(["bank", "scale", "runs", "peak RSS per run", "median above-step", "max fallbacks", "errors"], mem_rows),
            "",
        ]
        if "within_limit" in section:
            lines += [f"All runs ≤ {common.format_bytes(RSS_LIMIT_BYTES)}: **{'yes' if section['within_limit'] else 'NO'}**.", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--scales", type=float, nargs="+", default=None, help="logit scales (default 0.03 0.1 0.3 1 5)")
    parser.add_argument("--memory-repeats", type=int, default=2, help="fresh-process runs per scale, small case (default 2)")
    parser.add_argument("--paper-repeats", type=int, default=5, help="fresh-process runs per (bank, scale), paper scale")
    parser.add_argument("--skip-paper", action="store_true", help="skip the paper-scale memory runs")
    parser.add_argument("--skip-paper-timing", action="store_true", help="skip the paper-scale step timing")
    parser.add_argument("--skip-memory", action="store_true", help="skip every fresh-process memory run")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time, measure, write the report."""
    device, repeats = common.prepare_run(args, NAME)
    shape = common.resolve_shape(args)
    scales = tuple(args.scales) if args.scales else SCALES
    threads = torch.get_num_threads()
    payload: dict[str, Any] = {
        "benchmark": NAME,
        "environment": common.environment_info(device),
        "config": {"repeats": repeats, "warmup": args.warmup, "scales": scales, "memory_repeats": args.memory_repeats,
                   "paper_repeats": 0 if args.skip_paper or args.smoke else args.paper_repeats},
    }  # fmt: skip
    payload["timing"] = run_timing(shape, scales, repeats, args.warmup, device)
    if not (args.skip_paper_timing or args.smoke):
        payload["timing_paper"] = run_timing(PAPER_SHAPE, scales, repeats, args.warmup, device)
    small = SMOKE_SMALL_SHAPE if args.smoke else SMALL_SHAPE
    if not args.skip_memory:
        payload["memory_small"] = {
            "shape": small.as_dict(),
            "rows": run_memory(small, scales, (0,), 1 if args.smoke else args.memory_repeats, threads),
        }
    if not (args.skip_paper or args.smoke or args.skip_memory):
        rows = run_memory(PAPER_SHAPE, PAPER_SCALES, (0, BANK_SIZE), args.paper_repeats, threads)
        within = all(row["max_peak_rss_bytes"] is not None and row["max_peak_rss_bytes"] <= RSS_LIMIT_BYTES and not row["errors"] for row in rows)
        payload["memory_paper"] = {"shape": PAPER_SHAPE.as_dict(), "rows": rows, "within_limit": within}
    common.write_report(NAME, args.out, payload, render_markdown(payload, device, repeats, args.warmup))
    return payload


def main(argv: list[str] | None = None) -> None:
    """Entry point (or a memory worker, when called with ``--memory-worker``)."""
    args = parse_args(argv)
    if args.memory_worker is not None:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return
    run(args)


if __name__ == "__main__":
    main()
