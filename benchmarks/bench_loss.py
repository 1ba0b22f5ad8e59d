"""Sampler + loss forward/backward at one shape, for every provider, in one process run.

Providers (same inputs, same seed):

- ``fusion+chunked``: the exact fusion sampler and the memory-bounded chunked loss (the default);
- ``fusion+reference``: the exact sampler and the reference loss, which materializes ``(A, R, D)``;
- ``uniform+chunked``: uniform negatives (no score), chunked loss: the cost floor of sampling;
- ``naive-full-matrix``: the authors' prototype: the full ``A × M`` score matrix
  ``clamp(1 - ŷ ŷᵀ, 0, 1)``, ``torch.multinomial(..., replacement=True)``, then the reference loss;
- ``fusion+triton`` and ``uniform+triton``: the fused Triton kernel (CUDA only; otherwise
  reported as skipped).

Each provider has three phases, timed interleaved and measured for peak memory:

- ``step``: the whole training step, ``InstanceAwarePixelContrast(..., backend=...)`` forward +
  ``loss.backward()`` (the naive provider: its sampler + the reference loss);
- ``sampler``: fused probabilities + the sampler alone (what the step spends before the loss);
- ``loss``: ``pixel_info_nce`` forward + backward on negatives sampled once beforehand (with the
  sampler's candidate blocks, as the module passes them).

Ratios reported against the issue's targets: fusion/uniform step time with the same backend
(≤ 1.3), chunked/reference peak memory (≤ 1/8), naive/fusion step time (> 1).

Usage: ``python benchmarks/bench_loss.py [--batch 4 --height 64 --width 64 --queries 50 --classes 8
--dim 128 --negatives 256] [--repeats 5] [--device auto] [--out benchmarks/results] [--smoke]``
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

# this folder (for ``common``) and the repository root (the checkout's ``instcontrast``)
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import common  # noqa: E402
import torch  # noqa: E402
from common import ProviderRecord, Shape, Step  # noqa: E402

from instcontrast import InstanceAwareSampler, false_negative_rate, pixel_info_nce  # noqa: E402
from instcontrast.sampler import CandidateBlocks  # noqa: E402

NAME = "bench_loss"
PROVIDERS = ("fusion+chunked", "fusion+reference", "uniform+chunked", "naive-full-matrix", "fusion+triton", "uniform+triton")
PHASES = ("step", "sampler", "loss")


def provider_parts(provider: str) -> tuple[str, str]:
    """``(sampler, backend)`` of a provider name; the naive sampler uses the reference loss."""
    if provider == "naive-full-matrix":
        return "naive", "reference"
    strategy, _, backend = provider.partition("+")
    return strategy, backend


def skip_reason(provider: str, device: torch.device) -> str | None:
    """Why a provider cannot run here, or ``None``."""
    _, backend = provider_parts(provider)
    if backend != "triton":
        return None
    if device.type != "cuda":
        return "skipped — no CUDA device (the Triton kernel runs on CUDA; TRITON_INTERPRET is a test mode)"
    if importlib.util.find_spec("triton") is None:
        return "skipped — triton is not installed (pip install 'instcontrast[triton]')"
    return None


def sample_negatives(
    provider: str, probs: torch.Tensor, shape: Shape, generator: torch.Generator
) -> tuple[torch.Tensor, CandidateBlocks | None, dict[str, Any]]:
    """Negatives for every pixel as anchor from the provider's sampler.

    Returns:
        ``(negatives, counters)``: the exact sampler returns its candidate blocks, which the
        module hands to the loss (the ``chunked`` backend scores them with matrix products, the
        others expand them to an ``(A, R)`` index); the naive sampler returns an ``(A, R)`` index.
    """
    sampler_name, _ = provider_parts(provider)
    anchors = torch.arange(shape.pixels, device=probs.device)
    if sampler_name == "naive":
        index = common.naive_full_matrix_sample(probs, probs, shape.negatives, generator)
        return index, {"score_matrix_bytes": common.naive_score_matrix_bytes(shape.pixels, shape.pixels)}
    sampler = InstanceAwareSampler(num_negatives=shape.negatives, strategy=sampler_name)
    samples = sampler(probs, probs, anchors, pool_size=shape.pixels, generator=generator)
    counters = {
        "proposals": samples.proposals,
        "acceptance": samples.acceptance_rate,
        "fallbacks": samples.fallbacks,
        "rounds": samples.rounds,
    }
    return samples.blocks, counters


def build_provider(provider: str, shape: dict[str, Any], device: str, with_stats: bool) -> dict[str, Step]:
    """The three phases of one provider on freshly generated inputs (also used by memory workers).

    Args:
        provider: one of :data:`PROVIDERS`.
        shape: :class:`common.Shape` fields.
        device: device name.
        with_stats: let the module compute its margin/cosine diagnostics (an extra no-grad pass).

    Returns:
        ``{"step", "sampler", "loss"} → Step``.
    """
    shape_ = Shape(**shape)
    device_ = torch.device(device)
    inputs = common.make_inputs(shape_, device_)
    generator = torch.Generator(device=device_).manual_seed(shape_.seed + 7)
    sampler_name, backend = provider_parts(provider)
    leaves = (inputs.z_weak,)

    def sampler_phase() -> None:
        probs = inputs.probs()
        sample_negatives(provider, probs, shape_, generator)

    fixed_negatives, _ = sample_negatives(provider, inputs.probs(), shape_, generator)

    def loss_phase() -> None:
        strong = inputs.strong_rows()
        loss = pixel_info_nce(
            inputs.weak_rows(), strong, strong, fixed_negatives, shape_.temperature, backend=backend
        )
        loss.backward()

    step_phase = common.contrast_step_fn(inputs, sampler_name, backend, generator, with_stats=with_stats)

    return {
        "step": Step(step_phase, leaves),
        "sampler": Step(sampler_phase, leaves),
        "loss": Step(loss_phase, leaves),
    }


def sampler_quality(provider: str, shape: Shape, device: torch.device) -> dict[str, Any]:
    """False-negative rate and counters of one draw of the provider's sampler (ground-truth ids)."""
    inputs = common.make_inputs(shape, device)
    generator = torch.Generator(device=device).manual_seed(shape.seed + 11)
    negatives, counters = sample_negatives(provider, inputs.probs(), shape, generator)
    index = negatives if isinstance(negatives, torch.Tensor) else negatives.to_index()  # (A, R)
    labels = inputs.global_labels()
    counters["fnr"] = float(false_negative_rate(labels, labels[index]))
    return counters


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark and write the report."""
    device, repeats = common.prepare_run(args, NAME)
    shape = common.resolve_shape(args)
    records = {name: ProviderRecord(name) for name in PROVIDERS}
    steps: dict[str, Step] = {}
    for name, record in records.items():
        reason = skip_reason(name, device)
        if reason is not None:
            record.status, record.reason = "skipped", reason
            continue
        try:
            record.extra["sampler_draw"] = sampler_quality(name, shape, device)
            for phase, step in build_provider(name, shape.as_dict_fields(), str(device), args.with_stats).items():
                steps[f"{name}/{phase}"] = step
        except Exception as error:  # noqa: BLE001 - reported, not hidden
            record.status, record.reason = "failed", common.describe_failure(error)
    print(f"timing {len(steps)} steps at {shape.label()} on {device} ...", file=sys.stderr)
    common.apply_timings(records, common.time_steps(steps, repeats, args.warmup, device))
    steps.clear()
    common.release_memory(device)
    for name, record in records.items():
        if record.status != "ok":
            continue
        print(f"peak memory of {name} ...", file=sys.stderr)
        record.memory = common.measure_peak_memory(
            build_provider,
            {"provider": name, "shape": shape.as_dict_fields(), "device": str(device), "with_stats": args.with_stats},
            device,
            warmup=args.warmup,
        )
        if record.memory.error is not None:
            record.reason = f"memory: {record.memory.error}"
    ratios = compute_ratios(records)
    payload = {
        "benchmark": NAME,
        "environment": common.environment_info(device),
        "config": {"shape": shape.as_dict(), "repeats": repeats, "warmup": args.warmup, "with_stats": args.with_stats},
        "phases": {
            "step": "InstanceAwarePixelContrast forward + backward (naive: its sampler + reference loss)",
            "sampler": "fused_probability + sampler",
            "loss": "pixel_info_nce forward + backward on pre-sampled negatives",
        },
        "providers": [record.as_dict() for record in records.values()],
        "ratios": ratios,
    }
    common.write_report(NAME, args.out, payload, render_markdown(shape, device, repeats, args.warmup, records, ratios))
    return payload


def compute_ratios(records: dict[str, ProviderRecord]) -> dict[str, dict[str, Any]]:
    """The ratios the issue targets (``None`` values when a provider did not run)."""

    def time_ratio(a: str, b: str, phase: str = "step") -> float | None:
        return common.ratio(records[a].median(phase), records[b].median(phase))

    def memory_ratio(a: str, b: str, phase: str) -> float | None:
        return common.ratio(records[a].peak(phase), records[b].peak(phase))

    fusion_uniform = time_ratio("fusion+chunked", "uniform+chunked")
    fusion_uniform_triton = time_ratio("fusion+triton", "uniform+triton")
    chunked_reference_loss = memory_ratio("fusion+chunked", "fusion+reference", "loss")
    chunked_reference_step = memory_ratio("fusion+chunked", "fusion+reference", "step")
    naive_fusion = time_ratio("naive-full-matrix", "fusion+chunked")
    naive_fusion_sampler = time_ratio("naive-full-matrix", "fusion+chunked", "sampler")
    reference_chunked_time = time_ratio("fusion+reference", "fusion+chunked")

    def at_most(value: float | None, bound: float) -> bool | None:
        return None if value is None else value <= bound

    return {
        "fusion_over_uniform_time_chunked": common.target_entry(
            fusion_uniform, "<= 1.3", at_most(fusion_uniform, 1.3), "step time, fusion+chunked / uniform+chunked"
        ),
        "fusion_over_uniform_time_triton": common.target_entry(
            fusion_uniform_triton, "<= 1.3", at_most(fusion_uniform_triton, 1.3), "step time, fusion+triton / uniform+triton"
        ),
        "chunked_over_reference_peak_memory_loss": common.target_entry(
            chunked_reference_loss, "<= 0.125", at_most(chunked_reference_loss, 0.125),
            "peak memory of the loss forward+backward, chunked / reference",
        ),
        "chunked_over_reference_peak_memory_step": common.target_entry(
            chunked_reference_step, "<= 0.125", at_most(chunked_reference_step, 0.125),
            "peak memory of the whole step (sampler included), fusion+chunked / fusion+reference",
        ),
        "naive_over_fusion_time": common.target_entry(
            naive_fusion, "> 1", None if naive_fusion is None else naive_fusion > 1.0,
            "step time, naive-full-matrix / fusion+chunked",
        ),
        "naive_over_fusion_sampler_time": common.target_entry(
            naive_fusion_sampler, "(info)", None, "sampler time, naive full matrix / exact rejection sampler"
        ),
        "reference_over_chunked_time": common.target_entry(
            reference_chunked_time, "(info)", None, "step time, fusion+reference / fusion+chunked"
        ),
    }


def render_markdown(
    shape: Shape, device: torch.device, repeats: int, warmup: int,
    records: dict[str, ProviderRecord], ratios: dict[str, dict[str, Any]],
) -> str:  # fmt: skip
    """The report as Markdown."""
    rows = []
    for record in records.values():
        draw = record.extra.get("sampler_draw", {})
        rows.append([
            record.name,
            record.status,
            common.format_seconds(record.median("step")),
            common.format_seconds(record.median("sampler")),
            common.format_seconds(record.median("loss")),
            common.format_bytes(record.peak("step")),
            common.format_bytes(record.peak("sampler")),
            common.format_bytes(record.peak("loss")),
            "—" if "fnr" not in draw else f"{draw['fnr']:.3f}",
            record.reason or "",
        ])  # fmt: skip
    table = common.markdown_table(
        ["provider", "status", "step", "sampler", "loss fwd+bwd", "peak step", "peak sampler", "peak loss", "FNR", "note"],
        rows,
    )
    ratio_rows = [
        [key, common.format_ratio(entry["value"]), entry["target"],
         {True: "yes", False: "NO", None: "—"}[entry["meets_target"]], entry["description"]]
        for key, entry in ratios.items()
    ]  # fmt: skip
    ratio_table = common.markdown_table(["ratio", "value", "target", "meets", "what"], ratio_rows)
    return "\n".join([
        common.run_header("Sampler + loss forward/backward per provider", shape, device, repeats, warmup),
        table,
        "",
        "Times are medians; peak memory is the extra memory of one iteration above the inputs "
        "(see benchmarks/README.md). FNR: fraction of sampled negatives in the anchor's own instance.",
        "",
        ratio_table,
    ])  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--with-stats", action="store_true", help="let the module compute its margin diagnostics too")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    run(parse_args(argv))


if __name__ == "__main__":
    main()
