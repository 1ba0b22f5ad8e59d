r"""Ours against peer formulations on the same pixel embeddings: time, memory, largest feasible size.

Providers (every pixel of the batch is an anchor; same generated inputs at every size):

- ``ours-fusion``: ``InstanceAwarePixelContrast(strategy="fusion")`` — the reference for ratios;
- ``ours-uniform``: the same module with uniform negatives;
- ``ours-fusion+bank``: fusion with a filled ``PixelMemoryBank`` (``--bank-size``, default 10 000)
  — the reference of the cross-batch-memory peer;
- ``naive-full-matrix``: the authors' prototype (full ``A × M`` score matrix + ``torch.multinomial``
  + the reference loss);
- ``pml-ntxent``: pytorch-metric-learning's ``NTXentLoss`` with ``labels`` = instance ids (weak
  view as embeddings, the detached strong view as ``ref_emb``), so positives are all same-instance
  pixels. A *different objective*: every pair is used, and the library materializes the pairwise
  similarity matrix and, per positive pair, a mask over all negative pairs;
- ``pml-ntxent+xbm``: ``NTXentLoss`` wrapped in ``CrossBatchMemory`` (memory ``--bank-size``,
  pre-filled), the peer library's bank case.

For each provider the pixel count doubles from ``--start-pixels`` (1 024) while the projected peak
memory stays under the try limit; a provider whose start size would not fit walks down (halving to
``--min-pixels``) to get measured points first. The projection is an analytic model of the
provider's big buffers (:func:`model_bytes`) until a size is measured, then that model scaled to
the measurement, and from two measured sizes on the larger of the scaled model and a non-negative
fit ``c0 + c1·N + cd·N^d`` of the measured peaks (``d``: the provider's leading power). Each
attempted size is measured for peak memory (fresh worker on CPU, with the allocation budget
enforced) and then timed in this process, interleaved with ours at the same size. The largest
pixel count within ``--budget-gib`` (default 24 GiB on CPU, the device's memory on CUDA) is
reported as measured, and beyond the measured sizes as extrapolated from the same projection;
the report says which numbers are extrapolated and from what.

Usage: ``python benchmarks/bench_peers.py [--budget-gib 24] [--start-pixels 1024] [--max-pixels 262144]
[--batch 4 --dim 128 --negatives 256 ...] [--repeats 5] [--smoke]``
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import itertools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# this folder (for ``common``) and the repository root (the checkout's ``instcontrast``)
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import Shape, Step, Timing  # noqa: E402

NAME = "bench_peers"
PML_MODULE = "pytorch_metric_learning"
PML_HINT = "pip install pytorch-metric-learning (or the bench extra: pip install 'instcontrast[bench]')"
PROVIDERS = ("ours-fusion", "ours-uniform", "ours-fusion+bank", "naive-full-matrix", "pml-ntxent", "pml-ntxent+xbm")
REFERENCE = {
    "ours-fusion": None,
    "ours-uniform": "ours-fusion",
    "ours-fusion+bank": "ours-fusion",
    "naive-full-matrix": "ours-fusion",
    "pml-ntxent": "ours-fusion",
    "pml-ntxent+xbm": "ours-fusion+bank",
}
FIT_POINTS = 4  # measured points used for projections and extrapolation (the largest ones)
# leading power of each provider's peak memory in the pixel count (from model_bytes): the sampled
# methods are linear, the naive score matrix quadratic, the pytorch-metric-learning pair mask
# (positive pairs × negative pairs) quartic, and cubic against a fixed-size cross-batch memory
GROWTH_DEGREE = {
    "ours-fusion": 1,
    "ours-uniform": 1,
    "ours-fusion+bank": 1,
    "naive-full-matrix": 2,
    "pml-ntxent": 4,
    "pml-ntxent+xbm": 3,
}
SMOKE = {"start_pixels": 32, "min_pixels": 8, "max_pixels": 128, "budget_gib": 0.25, "bank_size": 256}


# --------------------------------------------------------------------------------------------------
# Providers.
# --------------------------------------------------------------------------------------------------


def pml_available() -> bool:
    """Whether pytorch-metric-learning can be imported (checked without importing it)."""
    return importlib.util.find_spec(PML_MODULE) is not None


def load_pml_losses() -> Any:
    """``pytorch_metric_learning.losses``, imported lazily.

    Raises:
        ImportError: with the install hint when the package is missing.
    """
    try:
        return importlib.import_module(f"{PML_MODULE}.losses")
    except ImportError as error:
        raise ImportError(f"the pml-* providers need pytorch-metric-learning: {PML_HINT}") from error


def shape_for_pixels(base: Shape, pixels: int) -> Shape:
    """The base shape with ``h×w`` chosen so that ``B·h·w`` is ``pixels`` (or just below it)."""
    per_image = max(1, pixels // base.batch)
    if per_image & (per_image - 1) == 0:  # a power of two: h = 2^⌊k/2⌋, w = 2^⌈k/2⌉
        height = 1 << ((per_image.bit_length() - 1) // 2)
    else:
        height = max(1, math.isqrt(per_image))
    return base.replace(height=height, width=max(1, per_image // height))


def build_peer(provider: str, shape: dict[str, Any], device: str, bank_size: int) -> dict[str, Step]:
    """One training step of a provider on freshly generated inputs (also used by memory workers).

    Args:
        provider: one of :data:`PROVIDERS`.
        shape: :class:`common.Shape` fields.
        device: device name.
        bank_size: rows of the memory banks (ours and the cross-batch memory).

    Returns:
        ``{"step": Step}``.
    """
    shape_ = Shape(**shape)
    device_ = torch.device(device)
    inputs = common.make_inputs(shape_, device_)
    generator = torch.Generator(device=device_).manual_seed(shape_.seed + 7)
    leaves = (inputs.z_weak,)
    if provider in ("ours-fusion", "ours-uniform"):
        strategy = provider.removeprefix("ours-")
        return {"step": Step(common.contrast_step_fn(inputs, strategy, "auto", generator), leaves)}
    if provider == "ours-fusion+bank":
        bank = common.filled_memory_bank(inputs, bank_size)
        return {"step": Step(common.contrast_step_fn(inputs, "fusion", "auto", generator, memory_bank=bank), leaves)}
    if provider == "naive-full-matrix":
        return {"step": Step(common.contrast_step_fn(inputs, "naive", "reference", generator), leaves)}
    losses = load_pml_losses()
    labels = inputs.global_labels()
    if provider == "pml-ntxent":
        ntxent = losses.NTXentLoss(temperature=shape_.temperature)

        def ntxent_step() -> None:
            loss = ntxent(inputs.weak_rows(), labels, ref_emb=inputs.strong_rows(), ref_labels=labels)
            loss.backward()

        return {"step": Step(ntxent_step, leaves)}
    if provider == "pml-ntxent+xbm":
        xbm = losses.CrossBatchMemory(
            losses.NTXentLoss(temperature=shape_.temperature), embedding_size=shape_.dim, memory_size=bank_size
        ).to(device_)
        # steady state: a full memory of earlier pixels whose labels are all different instances
        memory_generator = torch.Generator().manual_seed(shape_.seed + 5)
        xbm.embedding_memory = F.normalize(torch.randn(bank_size, shape_.dim, generator=memory_generator), dim=1).to(device_)
        xbm.label_memory = (-1 - torch.arange(bank_size)).to(device_)
        xbm.has_been_filled = True
        xbm.queue_idx = 0
        steps = itertools.count(1)
        label_stride = shape_.batch * shape_.queries  # each step's instances are new ones

        def xbm_step() -> None:
            loss = xbm(inputs.weak_rows(), labels + next(steps) * label_stride)
            loss.backward()

        return {"step": Step(xbm_step, leaves)}
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


@functools.lru_cache(maxsize=None)
def instance_square_sum(shape: Shape) -> int:
    """``Σ_i n_i²`` over the instances of the generated batch (``n_i`` pixels each): the number of
    same-instance (positive) pairs between two views."""
    labels = common.make_inputs(shape, "cpu").global_labels()
    counts = torch.bincount(labels)
    return int((counts.long() ** 2).sum())


def model_bytes(provider: str, shape: Shape, bank_size: int) -> float:
    """Analytic estimate of a provider's peak bytes (its big buffers), before anything is measured.

    - ours: indices ``2·A·R·8``, embedding copies and gradients ``≈ 6·A·D·4``, probabilities
      ``2·A·E·4`` and ~96 MiB of sampler blocks;
    - naive: the larger of the ``A × M`` float32 score matrix and the gathered negatives
      ``A·R·D·4`` (the matrix is freed before the loss), plus ours;
    - pml-ntxent: with ``P = Σ n_i²`` positive and ``Q = A² − P`` negative pairs, the per-positive
      mask over negatives and its derived ``P × Q`` float tensors (``≈ 24·P·Q``) dominate;
    - pml-ntxent+xbm: the same with ``P = Σ n_i² − A`` and ``Q = A·memory − Σ n_i²``.
    """
    anchors = shape.pixels
    ours = 2.0 * anchors * shape.negatives * 8 + 6.0 * anchors * shape.dim * 4 + 2.0 * anchors * shape.prob_dim * 4
    ours += 96 * 2**20
    if provider.startswith("ours"):
        return ours
    if provider == "naive-full-matrix":
        return max(4.0 * anchors * anchors, 4.0 * anchors * shape.negatives * shape.dim) + ours
    square_sum = instance_square_sum(shape)
    if provider == "pml-ntxent":
        positives, negatives = square_sum, anchors * anchors - square_sum
        return 24.0 * positives * negatives + 3.0 * 4 * anchors * anchors + 32.0 * (positives + negatives)
    positives, negatives = square_sum - anchors, anchors * bank_size - square_sum
    return 24.0 * max(positives, 1) * negatives + 3.0 * 4 * anchors * bank_size + 32.0 * (positives + negatives)


def fit_growth(pixels: list[float], peaks: list[float], degree: int) -> dict[int, float] | None:
    r"""Non-negative fit :math:`\mathrm{peak}(N) \approx c_0 + c_1 N + c_d N^d` (relative least squares).

    Every subset of the terms (at most as many as points) is solved by least squares on the
    relative residuals; fits with a negative coefficient are discarded. Among the fits whose error
    is within 5 % (plus 1e-3) of the best, the one predicting the most memory at ``2·max(N)`` is
    kept: when the measured range cannot tell a linear from a steeper term apart, the estimate stays
    conservative.

    Args:
        pixels: measured sizes ``N``.
        peaks: measured peak bytes.
        degree: the provider's leading power ``d`` (:data:`GROWTH_DEGREE`).

    Returns:
        ``power → coefficient`` (terms not used are absent), or ``None`` with fewer than two points.
    """
    if len(pixels) < 2:
        return None
    powers = sorted({0, 1, degree})
    sizes = np.asarray(pixels, dtype=float)
    target = np.asarray(peaks, dtype=float)
    design = np.stack([sizes**power for power in powers], axis=1) / target[:, None]  # relative residuals
    ones = np.ones_like(target)
    candidates: list[tuple[float, dict[int, float]]] = []
    for count in range(1, min(len(powers), len(sizes)) + 1):
        for subset in itertools.combinations(range(len(powers)), count):
            coefficients, *_ = np.linalg.lstsq(design[:, subset], ones, rcond=None)
            if np.any(coefficients < 0):
                continue
            error = float(np.sum((design[:, subset] @ coefficients - ones) ** 2))
            candidates.append((error, {powers[i]: float(c) for i, c in zip(subset, coefficients)}))
    if not candidates:
        return None
    best = min(error for error, _ in candidates)
    probe = 2.0 * float(sizes.max())
    good = [terms for error, terms in candidates if error <= best * 1.05 + 1e-3]
    return max(good, key=lambda terms: evaluate_growth(terms, probe))


def evaluate_growth(terms: dict[int, float], pixels: float) -> float:
    """``Σ c_k N^k``."""
    return sum(coefficient * pixels**power for power, coefficient in terms.items())


@dataclass
class PeerState:
    """What is known about one provider during the search."""

    name: str
    reference: str | None
    base: Shape
    bank_size: int
    ladder: list[int] = field(default_factory=list)  # requested pixel counts, ascending
    points: dict[int, dict[str, Any]] = field(default_factory=dict)  # requested pixels → measurements
    skipped: str | None = None  # the provider cannot run at all here
    stop_reason: str | None = None  # why it stopped climbing
    failed_at: int | None = None  # pixels at which it ran out of memory

    def measured(self) -> list[dict[str, Any]]:
        """Measured points with a peak, ascending by pixels."""
        return [self.points[n] for n in sorted(self.points) if self.points[n].get("peak_bytes")]

    def model(self, pixels: int) -> float:
        """:func:`model_bytes` at ``pixels``."""
        return model_bytes(self.name, shape_for_pixels(self.base, pixels), self.bank_size)

    def growth(self) -> dict[int, float] | None:
        """:func:`fit_growth` over the measured points."""
        chosen = self.measured()[-FIT_POINTS:]
        return fit_growth([p["pixels"] for p in chosen], [p["peak_bytes"] for p in chosen], GROWTH_DEGREE[self.name])

    def calibration(self) -> float | None:
        """Measured ÷ modelled peak at the largest measured size."""
        measured = self.measured()
        if not measured:
            return None
        return measured[-1]["peak_bytes"] / self.model(measured[-1]["pixels"])

    def projected_bytes(self, pixels: int) -> tuple[float, str]:
        """Projected peak at ``pixels`` and how: the analytic model alone until something is measured,
        then the model scaled to the largest measurement, and with two or more measurements the
        larger of that and the non-negative growth fit."""
        calibration = self.calibration()
        if calibration is None:
            return self.model(pixels), "model"
        scaled = calibration * self.model(pixels)
        growth = self.growth()
        if growth is None:
            return scaled, "scaled model"
        fitted = evaluate_growth(growth, pixels)
        return (fitted, "fit") if fitted >= scaled else (scaled, "scaled model")

    def time_fit(self) -> tuple[float, float] | None:
        """Log-log fit of the step time over the largest measured points."""
        chosen = [p for p in self.measured() if p.get("median_s")][-FIT_POINTS:]
        return common.loglog_fit([p["pixels"] for p in chosen], [p["median_s"] for p in chosen])

    def projected_seconds(self, pixels: int) -> float | None:
        """Projected step time at ``pixels`` from :meth:`time_fit`, if there is one."""
        fit = self.time_fit()
        if fit is None or fit[0] <= 0:
            return None
        return math.exp(fit[1] + fit[0] * math.log(pixels))


def initial_ladder(name: str, base: Shape, args: argparse.Namespace, try_limit: float) -> list[int]:
    """Sizes to try: from the start size (or below it, when the start would not fit) doubling to the max."""
    start = args.start_pixels
    if not name.startswith("ours"):
        while start > args.min_pixels and model_bytes(name, shape_for_pixels(base, start), args.bank_size) > try_limit:
            start //= 2
        if start < args.start_pixels:
            start = max(args.min_pixels, start // 2)  # one more point below, so a fit exists early
    sizes = []
    size = start
    while size <= args.max_pixels:
        sizes.append(size)
        size *= 2
    return sizes


def largest_within_budget(state: PeerState, budget: float) -> dict[str, Any]:
    """The largest pixel count measured under the budget, and the projected limit beyond it.

    The projection (:meth:`PeerState.projected_bytes`) is solved for the budget by bisection on
    ``N`` above the largest measured size; the method string says what it was based on.
    """
    measured = state.measured()
    within = [p for p in measured if p["peak_bytes"] <= budget]
    result: dict[str, Any] = {
        "measured_pixels": within[-1]["pixels"] if within else None,
        "measured_peak_bytes": within[-1]["peak_bytes"] if within else None,
        "estimate_pixels": None,
        "estimate_method": None,
        "growth_fit": None,
    }
    if not measured:
        result["estimate_method"] = "nothing measured"
        return result
    growth = state.growth()
    result["growth_fit"] = None if growth is None else {str(k): v for k, v in growth.items()}
    low = measured[-1]["pixels"]
    if measured[-1]["peak_bytes"] > budget:
        result["estimate_pixels"] = result["measured_pixels"]
        result["estimate_method"] = "measured (the next measured size was over the budget)"
        return result
    high = low
    while state.projected_bytes(high)[0] <= budget and high < 2**40:
        high *= 2
    if high == low:
        result["estimate_pixels"], result["estimate_method"] = low, "measured"
        return result
    while high - low > max(1, low // 1000):
        middle = (low + high) // 2
        if state.projected_bytes(middle)[0] <= budget:
            low = middle
        else:
            high = middle
    source = state.projected_bytes(high)[1]
    first, last = measured[-FIT_POINTS:][0]["pixels"], measured[-1]["pixels"]
    if source == "fit" and growth is not None:
        terms = " + ".join(f"{c:.3g}" + ("" if k == 0 else "·N" if k == 1 else f"·N^{k}") for k, c in sorted(growth.items()))
        how = f"extrapolated: non-negative fit peak ≈ {terms} bytes on measured sizes {first:,}–{last:,}"
    else:
        how = f"extrapolated: analytic model scaled by {state.calibration():.2f} to the measurement at {last:,} pixels"
    if state.failed_at is not None and low >= state.failed_at:
        low, how = state.failed_at - 1, f"below the size that ran out of memory ({state.failed_at:,})"
    result["estimate_pixels"] = int(low)
    result["estimate_method"] = how
    return result


def attempt(
    state: PeerState, shape: Shape, device: torch.device, args: argparse.Namespace, try_limit: float, preload: list[str]
) -> bool:
    """Project, then measure peak memory at one size; returns whether the provider may be timed there."""
    pixels = shape.pixels
    if state.name == "pml-ntxent+xbm" and pixels > args.bank_size:
        state.stop_reason = f"CrossBatchMemory needs the batch ({pixels:,} pixels) ≤ memory_size ({args.bank_size:,})"
        return False
    estimate, source = state.projected_bytes(pixels)
    if estimate > try_limit:
        state.stop_reason = (
            f"projected peak {common.format_bytes(estimate)} ({source}) at {pixels:,} pixels > try limit "
            f"{common.format_bytes(try_limit)}"
        )
        return False
    seconds = state.projected_seconds(pixels)
    if seconds is not None and seconds > args.max_step_seconds:
        state.stop_reason = f"projected step time {seconds:.0f} s at {pixels:,} pixels > --max-step-seconds {args.max_step_seconds:g}"
        return False
    print(f"  {state.name}: peak memory at {pixels:,} pixels (projected {common.format_bytes(estimate)}) ...", file=sys.stderr)
    memory = common.measure_peak_memory(
        build_peer,
        {"provider": state.name, "shape": shape.as_dict_fields(), "device": str(device), "bank_size": args.bank_size},
        device,
        warmup=args.warmup,
        limit_bytes=int(try_limit) if device.type == "cpu" else None,
        preload=preload,
    )
    point = {"pixels": pixels, "height": shape.height, "width": shape.width, "projected_bytes": estimate,
             "projection": source, "peak_bytes": memory.get("step"), "median_s": None, "time": None}  # fmt: skip
    state.points[pixels] = point
    if memory.error is not None:
        point["error"] = memory.error
        if memory.error.startswith("OOM"):
            state.failed_at = pixels
        state.stop_reason = f"{memory.error} (at {pixels:,} pixels)"
        return False
    if point["peak_bytes"] is not None and point["peak_bytes"] > args.budget_gib * 2**30:
        state.stop_reason = f"measured peak {common.format_bytes(point['peak_bytes'])} at {pixels:,} pixels is over the budget"
    return True


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the doubling search for every provider and write the report."""
    have_pml = pml_available()
    preload = [f"{PML_MODULE}.losses"] if have_pml else []
    device, repeats = common.prepare_run(args, NAME, preload)
    base = common.resolve_shape(args)
    for key, value in SMOKE.items():
        if getattr(args, key) is None:
            setattr(args, key, value if args.smoke else DEFAULTS[key])
    budget = args.budget_gib * 2**30
    if device.type == "cuda" and args.budget_gib_given is False:
        budget = float(torch.cuda.get_device_properties(device).total_memory)
        args.budget_gib = budget / 2**30
    available = common.available_memory_bytes() if device.type == "cpu" else None
    try_limit = args.try_limit_gib * 2**30 if args.try_limit_gib is not None else budget
    if available is not None and args.try_limit_gib is None:
        try_limit = min(budget, 0.7 * available)
    states = {name: PeerState(name, REFERENCE[name], base, args.bank_size) for name in PROVIDERS}
    for name, state in states.items():
        if name.startswith("pml") and not have_pml:
            state.skipped = f"skipped — pytorch-metric-learning is not installed: {PML_HINT}"
        elif not name.startswith("ours"):
            state.ladder = initial_ladder(name, base, args, try_limit)
    smallest = min([args.start_pixels, *(s.ladder[0] for s in states.values() if s.ladder)])
    ours_ladder = []
    size = smallest
    while size <= args.max_pixels:
        ours_ladder.append(size)
        size *= 2
    for name in ("ours-fusion", "ours-uniform", "ours-fusion+bank"):
        states[name].ladder = list(ours_ladder)

    for requested in sorted(set(itertools.chain.from_iterable(s.ladder for s in states.values()))):
        shape = shape_for_pixels(base, requested)
        print(f"{shape.pixels:,} pixels ({shape.batch}×{shape.height}×{shape.width}):", file=sys.stderr)
        runnable = [
            s for s in states.values() if not s.skipped and s.stop_reason is None and requested in s.ladder
        ]
        timed = [s for s in runnable if attempt(s, shape, device, args, try_limit, preload)]
        steps: dict[str, Step] = {}
        for state in timed:
            try:
                steps[state.name] = build_peer(state.name, shape.as_dict_fields(), str(device), args.bank_size)["step"]
            except Exception as error:  # noqa: BLE001
                state.stop_reason = f"{common.describe_failure(error)} (building at {shape.pixels:,} pixels)"
        for name, result in common.time_steps(steps, repeats, args.warmup, device).items():
            point = states[name].points[shape.pixels]
            if isinstance(result, Timing):
                point["time"] = result.as_dict()
                point["median_s"] = result.median
            else:
                point["error"] = result
                states[name].stop_reason = f"{result} (timing at {shape.pixels:,} pixels)"
                if result.startswith("OOM"):
                    states[name].failed_at = shape.pixels
        steps.clear()
        common.release_memory(device)
    for state in states.values():
        if state.stop_reason is None and not state.skipped and state.ladder:
            state.stop_reason = f"reached --max-pixels {args.max_pixels:,}"

    providers = []
    for state in states.values():
        reference = states[state.reference] if state.reference else None
        points = []
        for pixels in sorted(state.points):
            point = dict(state.points[pixels])
            if reference is not None and pixels in reference.points:
                ref = reference.points[pixels]
                point["time_ratio_vs_reference"] = common.ratio(point.get("median_s"), ref.get("median_s"))
                point["memory_ratio_vs_reference"] = common.ratio(point.get("peak_bytes"), ref.get("peak_bytes"))
            points.append(point)
        common_points = [p for p in points if p.get("time_ratio_vs_reference") is not None]
        providers.append({
            "name": state.name,
            "status": "skipped" if state.skipped else ("ok" if state.measured() else "failed"),
            "reason": state.skipped,
            "reference": state.reference,
            "stop_reason": state.stop_reason,
            "points": points,
            "memory_exponent": common.loglog_slope(
                [p["pixels"] for p in state.measured()[-FIT_POINTS:]], [p["peak_bytes"] for p in state.measured()[-FIT_POINTS:]]
            ),
            "time_exponent": None if state.time_fit() is None else state.time_fit()[0],
            "largest_within_budget": largest_within_budget(state, budget) if not state.skipped else None,
            "at_largest_common_size": common_points[-1] if common_points else None,
        })  # fmt: skip
    payload = {
        "benchmark": NAME,
        "environment": common.environment_info(device),
        "config": {
            "shape": base.as_dict(), "budget_bytes": budget, "try_limit_bytes": try_limit,
            "start_pixels": args.start_pixels, "min_pixels": args.min_pixels, "max_pixels": args.max_pixels,
            "bank_size": args.bank_size, "max_step_seconds": args.max_step_seconds, "repeats": repeats, "warmup": args.warmup,
            "pytorch_metric_learning": _pml_version() if have_pml else None,
        },  # fmt: skip
        "providers": providers,
    }
    common.write_report(NAME, args.out, payload, render_markdown(base, device, repeats, args.warmup, payload))
    return payload


def _pml_version() -> str | None:
    try:
        return importlib.import_module(PML_MODULE).__version__
    except (ImportError, AttributeError):
        return None


def render_markdown(base: Shape, device: torch.device, repeats: int, warmup: int, payload: dict[str, Any]) -> str:
    """The report as Markdown."""
    config = payload["config"]
    summary_rows = []
    for provider in payload["providers"]:
        limit = provider["largest_within_budget"] or {}
        common_point = provider["at_largest_common_size"] or {}
        summary_rows.append([
            provider["name"], provider["status"], provider["reference"] or "—",
            "—" if limit.get("measured_pixels") is None else f"{limit['measured_pixels']:,}",
            "—" if limit.get("estimate_pixels") is None else f"{limit['estimate_pixels']:,}",
            limit.get("estimate_method") or "—",
            "—" if provider["memory_exponent"] is None else f"{provider['memory_exponent']:.2f}",
            "—" if not common_point else f"{common_point['pixels']:,}",
            common.format_ratio(common_point.get("time_ratio_vs_reference")),
            common.format_ratio(common_point.get("memory_ratio_vs_reference")),
            provider["reason"] or provider["stop_reason"] or "",
        ])  # fmt: skip
    summary = common.markdown_table(
        ["provider", "status", "vs", "largest measured ≤ budget", "largest within budget", "how", "memory exponent",
         "ratio at", "time ratio", "memory ratio", "stopped because"],
        summary_rows,
    )  # fmt: skip
    detail_rows = []
    for provider in payload["providers"]:
        for point in provider["points"]:
            detail_rows.append([
                provider["name"], f"{point['pixels']:,}", f"{point['height']}×{point['width']}",
                common.format_seconds(point.get("median_s")), common.format_bytes(point.get("peak_bytes")),
                common.format_bytes(point.get("projected_bytes")) + f" ({point.get('projection')})",
                common.format_ratio(point.get("time_ratio_vs_reference")),
                common.format_ratio(point.get("memory_ratio_vs_reference")), point.get("error") or "",
            ])  # fmt: skip
    details = common.markdown_table(
        ["provider", "pixels", "h×w", "step time", "peak memory", "projected", "time / ref", "memory / ref", "error"],
        detail_rows,
    )
    return "\n".join([
        common.run_header("Ours against peer formulations", base, device, repeats, warmup),
        f"Memory budget {common.format_bytes(config['budget_bytes'])}; sizes were only attempted up to the try limit "
        f"{common.format_bytes(config['try_limit_bytes'])}; pixel counts double from {config['start_pixels']:,} "
        f"(down to {config['min_pixels']:,} when needed) up to {config['max_pixels']:,}; banks {config['bank_size']:,} rows.",
        "`pml-*` optimize a different objective (NT-Xent over all same-instance pairs) and materialize the full "
        "pairwise matrix (and a positive × negative pair mask); ratios compare cost, not equivalent losses. "
        "Ratios are against `vs` at the largest size both ran. 'largest within budget' is measured unless `how` says extrapolated.",
        "",
        summary,
        "",
        "All measured points:",
        "",
        details,
    ])  # fmt: skip


DEFAULTS = {"start_pixels": 1024, "min_pixels": 16, "max_pixels": 262_144, "budget_gib": 24.0, "bank_size": 10_000}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--budget-gib", type=float, default=None, help="memory budget (default 24 on CPU, device memory on CUDA)")
    parser.add_argument(
        "--try-limit-gib", type=float, default=None,
        help="largest projected peak actually attempted (default: min(budget, 70%% of MemAvailable) on CPU)",
    )  # fmt: skip
    parser.add_argument("--start-pixels", type=int, default=None, help="first pixel count of the doubling (default 1024)")
    parser.add_argument("--min-pixels", type=int, default=None, help="smallest pixel count when walking down (default 16)")
    parser.add_argument("--max-pixels", type=int, default=None, help="largest pixel count attempted (default 262144)")
    parser.add_argument("--bank-size", type=int, default=None, help="rows of both memory banks (default 10000)")
    parser.add_argument("--max-step-seconds", type=float, default=300.0, help="stop a provider whose projected step is slower")
    args = parser.parse_args(argv)
    args.budget_gib_given = args.budget_gib is not None
    return args


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    run(parse_args(argv))


if __name__ == "__main__":
    main()
