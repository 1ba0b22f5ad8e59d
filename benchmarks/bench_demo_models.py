"""Demo student vs demo teacher: parameters and training-step (forward + backward) time on the demo size.

The demo (teacher pretraining, three stages, a baseline, evaluations) must fit 15 minutes on 2 CPU cores at
128×128 images; the targets are ≲ 0.25 s (student) and ≲ 0.7 s (teacher) per fwd+bwd of a batch of 8 with 2
threads, and a teacher with ≥ 4× the student's parameters. Both models are timed interleaved in one process
(:func:`benchmarks.common.time_steps`), once per thread count.

Run: ``PYTHONPATH=. python benchmarks/bench_demo_models.py [--threads 1 2] [--repeats 7] [--smoke]``.
Writes ``benchmarks/results/bench_demo_models.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    DEFAULT_RESULTS_DIR,
    Step,
    Timing,
    environment_info,
    format_seconds,
    markdown_table,
    time_steps,
    write_report,
)
from reference_pipeline.models.demo import (
    DEMO_STUDENT_NAME,
    DEMO_TEACHER_NAME,
    demo_student_config,
    demo_teacher_config,
)
from reference_pipeline.models.student import Student, count_parameters

NUM_CLASSES = 6  # the synthetic dataset's classes
TARGETS_S = {"student": 0.25, "teacher": 0.7}


def training_step(model: Student, images: torch.Tensor) -> Step:
    """One forward + backward through every output (final and auxiliary) of ``model``."""

    def run() -> None:
        model.zero_grad(set_to_none=True)
        out = model(images)
        aux = sum(a["masks_queries_logits"].mean() + a["class_queries_logits"].mean() for a in out.aux_outputs)
        (out.mask_logits.mean() + out.class_logits.mean() + out.pixel_embeddings.mean() + aux).backward()

    return Step(run)


def cpu_seconds(steps: dict[str, Step], repeats: int, warmup: int) -> dict[str, float]:
    """Median CPU time (``time.process_time``) per step with one thread, interleaved.

    With one thread the process's CPU time hardly depends on how many other processes share the cores, so it
    estimates the idle-machine single-thread wall time even when the wall clock is dominated by contention.
    """
    torch.set_num_threads(1)
    for step in steps.values():
        for _ in range(warmup):
            step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.process_time()
            step()
            seconds[name].append(time.process_time() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def main(argv: list[str] | None = None) -> None:
    """Measure and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny run: batch 2, 64x64, 2 repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.size, args.repeats, args.warmup = 2, 64, 2, 1
    device = torch.device(args.device)

    torch.manual_seed(0)
    models = {
        "student": Student(demo_student_config(NUM_CLASSES)).to(device).train(),
        "teacher": Student(demo_teacher_config(NUM_CLASSES)).to(device).train(),
    }
    names = {"student": DEMO_STUDENT_NAME, "teacher": DEMO_TEACHER_NAME}
    parameters = {name: count_parameters(model) for name, model in models.items()}
    images = torch.rand(args.batch, 3, args.size, args.size, device=device)  # (B, 3, S, S)
    steps = {name: training_step(model, images) for name, model in models.items()}

    load_before = os.getloadavg()
    timings: dict[int, dict[str, Timing | str]] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        timings[threads] = time_steps(steps, repeats=args.repeats, warmup=args.warmup, device=device)

    cpu = cpu_seconds(steps, repeats=args.repeats, warmup=1) if args.device == "cpu" else {}

    rows = []
    for name in models:
        row = [name, f"{parameters[name] / 1e6:.2f}M"]
        for threads in args.threads:
            result = timings[threads][name]
            row.append(format_seconds(result.median) if isinstance(result, Timing) else result)
        row.append(format_seconds(cpu[name]) if cpu else "n/a")
        row.append(f"≲ {TARGETS_S[name]} s (2 threads)")
        rows.append(row)
    ratio = parameters["teacher"] / parameters["student"]
    markdown = "\n".join(
        [
            "# Demo models: parameters and fwd+bwd time",
            "",
            (
                f"Batch {args.batch}, {args.size}×{args.size}, median of {args.repeats} interleaved repeats after "
                f"{args.warmup} warm-up; device {device}."
            ),
            "",
            markdown_table(
                [
                    "model",
                    "parameters",
                    *[f"fwd+bwd wall, {t} thread(s)" for t in args.threads],
                    "fwd+bwd CPU time, 1 thread",
                    "target",
                ], rows
            ),
            "",
            (
                f"Teacher / student parameters: {ratio:.2f}× (target ≥ 4×). Load average (1 min) before / after: "
                f"{load_before[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared with others)."
            ),
            "",
            *[f"- {names[name]}" for name in models],
        ]
    )
    payload = {
        "environment": environment_info(device),
        "batch": args.batch,
        "size": args.size,
        "parameters": parameters,
        "parameter_ratio": ratio,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "names": names,
        "cpu_seconds_1_thread": cpu,
        "timings": {
            str(threads): {n: (r.as_dict() if isinstance(r, Timing) else r) for n, r in results.items()}
            for threads, results in timings.items()
        },
    }
    write_report("bench_demo_models", args.out, payload, markdown)


if __name__ == "__main__":
    main()
