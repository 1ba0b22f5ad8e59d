"""Step time with a filled ``PixelMemoryBank`` versus none (goal: at most 1.3× slower).

Both providers run ``InstanceAwarePixelContrast(strategy="fusion")`` in training mode on the same
inputs, every pixel an anchor: sampler + loss forward + backward, and for the bank provider also
the bank's enqueue of this step's pixels (``pixels_per_step`` of them) that the module performs
after the loss. The bank is filled to steady state before timing, so every step samples from
``B·h·w + bank_size`` candidates.

Usage: ``python benchmarks/bench_bank.py [--bank-size 10000] [--pixels-per-step 1024]
[--batch 4 --height 64 --width 64 ...] [--repeats 5] [--smoke]``
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
from common import ProviderRecord, Shape, Step  # noqa: E402

NAME = "bench_bank"
GOAL_RATIO = 1.3
SMOKE_BANK_SIZE = 256


def provider_names(bank_size: int) -> tuple[str, str]:
    """``("fusion", "fusion+bank<size>")``."""
    label = f"{bank_size // 1000}k" if bank_size % 1000 == 0 else str(bank_size)
    return "fusion", f"fusion+bank{label}"


def build_provider(
    with_bank: bool, shape: dict[str, Any], device: str, backend: str, bank_size: int, pixels_per_step: int
) -> dict[str, Step]:
    """The training step with or without a filled bank, on freshly generated inputs.

    Args:
        with_bank: attach a :class:`~instcontrast.PixelMemoryBank` filled to ``bank_size`` rows.
        shape: :class:`common.Shape` fields.
        device: device name.
        backend: loss backend.
        bank_size: bank capacity.
        pixels_per_step: pixels the module enqueues per step.

    Returns:
        ``{"step": Step}``.
    """
    shape_ = Shape(**shape)
    device_ = torch.device(device)
    inputs = common.make_inputs(shape_, device_)
    generator = torch.Generator(device=device_).manual_seed(shape_.seed + 7)
    bank = common.filled_memory_bank(inputs, bank_size, pixels_per_step) if with_bank else None
    fn = common.contrast_step_fn(inputs, "fusion", backend, generator, memory_bank=bank)
    return {"step": Step(fn, (inputs.z_weak,))}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark and write the report."""
    device, repeats = common.prepare_run(args, NAME)
    shape = common.resolve_shape(args)
    bank_size = args.bank_size if args.bank_size is not None else (SMOKE_BANK_SIZE if args.smoke else 10_000)
    pixels_per_step = args.pixels_per_step if args.pixels_per_step is not None else (32 if args.smoke else 1024)
    names = provider_names(bank_size)
    records = {name: ProviderRecord(name) for name in names}
    steps: dict[str, Step] = {}
    for name, with_bank in zip(names, (False, True)):
        kwargs = {"with_bank": with_bank, "shape": shape.as_dict_fields(), "device": str(device), "backend": args.backend,
                  "bank_size": bank_size, "pixels_per_step": pixels_per_step}  # fmt: skip
        records[name].extra["pool_size"] = shape.pixels + (bank_size if with_bank else 0)
        try:
            steps[f"{name}/step"] = build_provider(**kwargs)["step"]
        except Exception as error:  # noqa: BLE001
            records[name].status, records[name].reason = "failed", common.describe_failure(error)
    print(f"timing {', '.join(steps)} at {shape.label()} on {device} ...", file=sys.stderr)
    common.apply_timings(records, common.time_steps(steps, repeats, args.warmup, device))
    steps.clear()
    common.release_memory(device)
    for name, with_bank in zip(names, (False, True)):
        if records[name].status != "ok":
            continue
        kwargs = {"with_bank": with_bank, "shape": shape.as_dict_fields(), "device": str(device), "backend": args.backend,
                  "bank_size": bank_size, "pixels_per_step": pixels_per_step}  # fmt: skip
        records[name].memory = common.measure_peak_memory(build_provider, kwargs, device, warmup=args.warmup)
        if records[name].memory.error is not None:
            records[name].reason = f"memory: {records[name].memory.error}"
    base, banked = (records[name] for name in names)
    time_ratio = common.ratio(banked.median("step"), base.median("step"))
    memory_ratio = common.ratio(banked.peak("step"), base.peak("step"))
    ratios = {
        "bank_over_none_time": common.target_entry(
            time_ratio, f"<= {GOAL_RATIO}", None if time_ratio is None else time_ratio <= GOAL_RATIO,
            f"step time with a filled {bank_size}-row bank / without",
        ),
        "bank_over_none_peak_memory": common.target_entry(memory_ratio, "(info)", None, "peak memory, with bank / without"),
    }
    payload = {
        "benchmark": NAME,
        "environment": common.environment_info(device),
        "config": {"shape": shape.as_dict(), "bank_size": bank_size, "pixels_per_step": pixels_per_step,
                   "backend": args.backend, "repeats": repeats, "warmup": args.warmup},  # fmt: skip
        "providers": [record.as_dict() for record in records.values()],
        "ratios": ratios,
    }
    rows = [
        [r.name, r.status, f"{r.extra['pool_size']:,}", common.format_seconds(r.median("step")),
         common.format_bytes(r.peak("step")), r.reason or ""]
        for r in records.values()
    ]  # fmt: skip
    ratio_rows = [
        [key, common.format_ratio(e["value"]), e["target"], {True: "yes", False: "NO", None: "—"}[e["meets_target"]], e["description"]]
        for key, e in ratios.items()
    ]  # fmt: skip
    markdown = "\n".join([
        common.run_header("Memory bank overhead", shape, device, repeats, args.warmup),
        f"Bank: {bank_size:,} rows filled before timing, {pixels_per_step} pixels enqueued per step; backend {args.backend!r}.",
        "",
        common.markdown_table(["provider", "status", "pool size", "step time", "peak memory", "note"], rows),
        "",
        common.markdown_table(["ratio", "value", "target", "meets", "what"], ratio_rows),
    ])  # fmt: skip
    common.write_report(NAME, args.out, payload, markdown)
    return payload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--bank-size", type=int, default=None, help="bank rows (default 10000; smoke 256)")
    parser.add_argument("--pixels-per-step", type=int, default=None, help="pixels enqueued per step (default 1024; smoke 32)")
    parser.add_argument("--backend", default="auto", choices=("auto", "chunked", "reference", "triton"), help="loss backend")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    run(parse_args(argv))


if __name__ == "__main__":
    main()
