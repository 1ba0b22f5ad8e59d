r"""How close sampler + loss forward + backward run to this machine's limits.

Measured in one process, on the same inputs:

1. the machine: float32 matrix-multiply rate (GFLOP/s, square ``torch.mm``, TF32 off) and gather
   bandwidth (GB/s of pool rows fetched with ``torch.index_select`` at random indices from the real
   pool, in blocks of the chunked backend's size);
2. the three components at the shape (default B=4, 64×64, K=50, C=8, D=128, R=256), each timed
   separately within the same step: ``sampler`` (fused probabilities + exact sampler), ``forward``
   (``pixel_info_nce``, called as the module calls it, candidate blocks included) and ``backward``
   (``loss.backward()``);
3. their FLOP counts (:func:`flop_counts`: essential and executed) and gathered bytes
   (:func:`gathered_bytes`), giving a compute-bound time (essential FLOPs ÷ matmul rate) and a
   memory-traffic bound (gathered bytes ÷ gather bandwidth).

The issue's goal: total measured time within 10× of the compute bound. On a CPU the gather and the
element-wise work, not the arithmetic, are the real limits, so the traffic bound is reported next to it.

Usage: ``python benchmarks/bench_roofline.py [--batch 4 --height 64 --width 64 ...]
[--matmul-size 2048] [--backend auto] [--repeats 5] [--smoke]``
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# this folder (for ``common``) and the repository root (the checkout's ``instcontrast``)
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import common  # noqa: E402
import torch  # noqa: E402
from common import Shape, Step, Timing  # noqa: E402

from instcontrast import InstanceAwareSampler, NegativeSamples, pixel_info_nce, resolve_backend  # noqa: E402
from instcontrast.ops.chunked import default_block_size  # noqa: E402

NAME = "bench_roofline"
COMPONENTS = ("sampler", "forward", "backward")
GOAL_FACTOR = 10.0
BYTES_PER_FLOAT = 4


@dataclasses.dataclass(frozen=True)
class SampleGeometry:
    """What one sampler call produced, as far as the FLOP and byte counts need it.

    Attributes:
        proposals: candidates the sampler scored (``NegativeSamples.proposals``).
        blocked: whether the loss scores the sampler's candidate blocks with matrix products
            (the ``chunked`` path with ``NegativeSamples.blocks``) rather than gathering ``A·R`` rows.
        dense_pairs: ``Σ_b Σ_segments rows·m`` over the candidate blocks (anchors × candidates of each
            block), or ``None`` when the sampler returned no blocks.
        candidate_rows: ``Σ_b m_b``, the candidates drawn (and gathered) per block, or ``None``.
    """

    proposals: float
    blocked: bool
    dense_pairs: float | None
    candidate_rows: float | None


def sample_geometry(samples: Any, blocked: bool) -> SampleGeometry:
    """:class:`SampleGeometry` of a :class:`~instcontrast.NegativeSamples` (``blocked``: the loss
    uses its blocks)."""
    blocks = getattr(samples, "blocks", None)
    if blocks is None:
        return SampleGeometry(float(samples.proposals), False, None, None)
    # the pairs the blocked path scores: each proposal round (segment) only for the rows it serves
    dense = float(blocks.scored_pairs)
    rows = float(sum(candidates.numel() for candidates in blocks.candidates))
    return SampleGeometry(float(samples.proposals), blocked, dense, rows)


def flop_counts(shape: Shape, geometry: SampleGeometry, pool_grad: bool) -> dict[str, dict[str, float]]:
    """Floating-point operations per component (a multiply-add counts 2): essential and executed.

    Essential (what the method needs, used for the compute bound):

    - sampler: the fused-probability product ``2·B·N·K·(C+1)`` plus scoring every proposal,
      ``2·E`` each (``E = K+C+1``); softmaxes, comparisons and random numbers are not counted;
    - forward: the negative dots ``2·A·R·D``, the positive dots ``2·A·D`` and three ℓ2
      normalizations (anchors, positives, pool) at ``3·D`` per row;
    - backward: the anchor gradient ``2·A·R·D`` (forward keeps the negatives' softmax weights, so
      nothing is scored again), the normalization and positive-dot backward ``≈ 6·A·D``; plus the
      pool-gradient scatter ``2·A·R·D`` when the pool needs a gradient (``detach_strong=False``;
      not the default).

    Executed differs on the blocked path, which multiplies every (anchor, candidate) pair of a
    block's segments: ``2·D·Σ pairs`` forward, as much backward (+ once more for the pool
    gradient) — more FLOPs than essential, but dense ones.

    Args:
        shape: the problem size (every pixel is an anchor: ``A = M = B·h·w``).
        geometry: the sampler's output (:func:`sample_geometry`).
        pool_grad: whether the pool receives a gradient.

    Returns:
        component → ``{"essential": ..., "executed": ...}``.
    """
    anchors = pool = shape.pixels
    dots = 2.0 * anchors * shape.negatives * shape.dim
    sampler = 2.0 * shape.pixels * shape.queries * (shape.classes + 1) + 2.0 * geometry.proposals * shape.prob_dim
    forward_extra = 2.0 * anchors * shape.dim + 3.0 * shape.dim * (2 * anchors + pool)
    backward_extra = 6.0 * anchors * shape.dim
    forward = dots + forward_extra
    backward = dots + backward_extra + (dots if pool_grad else 0.0)
    if geometry.blocked and geometry.dense_pairs is not None:
        block_dots = 2.0 * shape.dim * geometry.dense_pairs
        forward_executed = block_dots + forward_extra
        backward_executed = block_dots + backward_extra + (block_dots if pool_grad else 0.0)
    else:
        forward_executed, backward_executed = forward, backward
    return {
        "sampler": {"essential": sampler, "executed": sampler},
        "forward": {"essential": forward, "executed": forward_executed},
        "backward": {"essential": backward, "executed": backward_executed},
    }


def gathered_bytes(shape: Shape, geometry: SampleGeometry, pool_grad: bool) -> dict[str, float]:
    """Bytes each component fetches by index (random rows), the traffic the gather bandwidth limits.

    - sampler: the probability rows of the anchors and of the candidates, ``(A + Σ m_b)·E·4`` (the
      ``(c, m)`` element-wise passes work on blocks of about 4 MiB that stay in cache and are not
      counted);
    - forward: the negatives' embedding rows, ``A·R·D·4`` (blocked path: the candidate rows
      ``Σ m_b·D·4``);
    - backward: the same rows again, plus with a pool gradient the scatter (read + write) of as many.
    """
    row_bytes = shape.dim * BYTES_PER_FLOAT
    sampler_rows = (geometry.candidate_rows or 0.0) + shape.pixels
    blocked = geometry.blocked and geometry.candidate_rows is not None
    loss_rows = geometry.candidate_rows if blocked else float(shape.pixels) * shape.negatives
    return {
        "sampler": sampler_rows * shape.prob_dim * BYTES_PER_FLOAT,
        "forward": loss_rows * row_bytes,
        "backward": loss_rows * row_bytes * (3.0 if pool_grad else 1.0),
    }


def _median_time(fn: Any, repeats: int, device: torch.device) -> float:
    fn()
    common.synchronize(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        common.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure_matmul_gflops(device: torch.device, size: int, repeats: int) -> float:
    """float32 ``size × size`` matrix product rate in GFLOP/s (``2·size³`` per product; TF32 off)."""
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(size, size, generator=generator).to(device)
    right = torch.randn(size, size, generator=generator).to(device)
    out = torch.empty(size, size, device=device)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        seconds = _median_time(lambda: torch.mm(left, right, out=out), repeats, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2.0 * size**3 / seconds / 1e9


def measure_gather_gbps(pool: torch.Tensor, index: torch.Tensor, block_rows: int, repeats: int) -> float:
    """Bandwidth (GB/s of gathered rows) of ``index_select`` from ``pool`` in blocks of ``block_rows`` rows."""
    flat = index.reshape(-1)
    out = torch.empty(block_rows, pool.shape[1], dtype=pool.dtype, device=pool.device)

    def gather_all() -> None:
        for start in range(0, flat.numel(), block_rows):
            block = flat[start : start + block_rows]
            torch.index_select(pool, 0, block, out=out[: block.numel()])

    seconds = _median_time(gather_all, repeats, pool.device)
    return flat.numel() * pool.shape[1] * pool.element_size() / seconds / 1e9


class Components:
    """The three components on one set of inputs: sampler, loss forward, loss backward."""

    def __init__(self, shape: Shape, device: torch.device, backend: str, pool_grad: bool) -> None:
        self.shape = shape
        self.device = device
        self.inputs = common.make_inputs(shape, device)
        if pool_grad:
            self.inputs.z_strong.requires_grad_(True)
        self.pool_grad = pool_grad
        self.backend = resolve_backend(backend)
        self.sampler = InstanceAwareSampler(num_negatives=shape.negatives, strategy="fusion")
        self.generator = torch.Generator(device=device).manual_seed(shape.seed + 7)
        self.anchor_rows = torch.arange(shape.pixels, device=device)

    @property
    def blocked(self) -> bool:
        """Whether the loss uses the sampler's candidate blocks (the ``chunked`` path), as the module does."""
        return self.backend.uses_blocks(self.inputs.z_weak)

    def sample(self) -> NegativeSamples:
        """Fused probabilities + exact sampler."""
        probs = self.inputs.probs()
        return self.sampler(None, probs, self.anchor_rows, pool_size=self.shape.pixels, generator=self.generator)  # as the module: anchors are pool rows

    def forward(self, samples: NegativeSamples) -> torch.Tensor:
        """The loss on the sampled negatives, exactly as the module calls it (graph kept for backward)."""
        strong = self.inputs.z_strong.permute(0, 2, 3, 1).reshape(-1, self.shape.dim)
        if not self.pool_grad:
            strong = strong.detach()
        return pixel_info_nce(
            self.inputs.weak_rows(), strong, strong, samples.blocks, self.shape.temperature,
            backend=self.backend,
        )  # fmt: skip

    def reset(self) -> None:
        """Drop gradients."""
        self.inputs.z_weak.grad = None
        self.inputs.z_strong.grad = None

    def step(self) -> None:
        """All three, as one training step."""
        self.reset()
        self.forward(self.sample()).backward()


def build_step(shape: dict[str, Any], device: str, backend: str, pool_grad: bool) -> dict[str, Step]:
    """The whole step (for the peak-memory worker)."""
    components = Components(Shape(**shape), torch.device(device), backend, pool_grad)
    return {"step": Step(components.step, (components.inputs.z_weak, components.inputs.z_strong))}


def time_components(components: Components, repeats: int, warmup: int) -> tuple[dict[str, Timing], list[SampleGeometry]]:
    """Seconds of each component within the same steps, and the sampler geometry of each timed step."""
    device = components.device
    timings = {name: Timing([]) for name in COMPONENTS}
    geometries = []
    for iteration in range(warmup + repeats):
        components.reset()
        common.synchronize(device)
        start = time.perf_counter()
        samples = components.sample()
        common.synchronize(device)
        sampled = time.perf_counter()
        loss = components.forward(samples)
        common.synchronize(device)
        forwarded = time.perf_counter()
        loss.backward()
        common.synchronize(device)
        finished = time.perf_counter()
        if iteration >= warmup:
            timings["sampler"].seconds.append(sampled - start)
            timings["forward"].seconds.append(forwarded - sampled)
            timings["backward"].seconds.append(finished - forwarded)
            geometries.append(sample_geometry(samples, components.blocked))
        del samples, loss
    components.reset()
    return timings, geometries


def mean_geometry(geometries: list[SampleGeometry]) -> SampleGeometry:
    """Average of the timed steps' geometries."""

    def mean(values: list[float | None]) -> float | None:
        return None if any(v is None for v in values) else float(statistics.mean(v for v in values if v is not None))

    return SampleGeometry(
        proposals=float(statistics.mean(g.proposals for g in geometries)),
        blocked=geometries[0].blocked,
        dense_pairs=mean([g.dense_pairs for g in geometries]),
        candidate_rows=mean([g.candidate_rows for g in geometries]),
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure the machine and the components, write the report."""
    device, repeats = common.prepare_run(args, NAME)
    shape = common.resolve_shape(args)
    pool_grad = args.no_detach_strong
    matmul_size = args.matmul_size or (256 if args.smoke else (8192 if device.type == "cuda" else 2048))
    gather_rows = args.gather_rows or (1 << 16 if args.smoke else 1 << 20)

    components = Components(shape, device, args.backend, pool_grad)
    print(f"measuring the machine on {device} ...", file=sys.stderr)
    matmul_gflops = measure_matmul_gflops(device, matmul_size, repeats)
    pool = components.inputs.strong_rows().contiguous()
    index_generator = torch.Generator().manual_seed(shape.seed + 13)
    random_rows = torch.randint(0, shape.pixels, (gather_rows,), generator=index_generator).to(device)
    block_rows = default_block_size(shape.negatives, shape.dim) * shape.negatives
    gather_gbps = measure_gather_gbps(pool, random_rows, block_rows, repeats)
    del pool, random_rows

    print(f"timing the components at {shape.label()} ...", file=sys.stderr)
    timings, geometries = time_components(components, repeats, args.warmup)
    geometry = mean_geometry(geometries)
    loss_path = (
        "blocked (sampled_logsumexp_blocked: one matrix product per candidate block)"
        if geometry.blocked
        else components.backend.op_for(components.inputs.z_weak).__name__
    )
    del components
    common.release_memory(device)
    memory = common.measure_peak_memory(
        build_step,
        {"shape": shape.as_dict_fields(), "device": str(device), "backend": args.backend, "pool_grad": pool_grad},
        device,
        warmup=args.warmup,
    )

    flops = flop_counts(shape, geometry, pool_grad)
    traffic = gathered_bytes(shape, geometry, pool_grad)
    rows: dict[str, dict[str, Any]] = {}
    for name in COMPONENTS:
        measured = timings[name].median
        compute_bound = flops[name]["essential"] / (matmul_gflops * 1e9)
        traffic_bound = traffic[name] / (gather_gbps * 1e9)
        rows[name] = {
            "time": timings[name].as_dict(),
            "flops": flops[name]["essential"],
            "flops_executed": flops[name]["executed"],
            "compute_bound_s": compute_bound,
            "measured_over_compute_bound": measured / compute_bound,
            "achieved_gflops": flops[name]["executed"] / measured / 1e9,
            "gathered_bytes": traffic[name],
            "traffic_bound_s": traffic_bound,
            "measured_over_traffic_bound": measured / traffic_bound,
        }
    total_measured = sum(timings[name].median for name in COMPONENTS)
    total_compute = sum(row["compute_bound_s"] for row in rows.values())
    total_traffic = sum(row["traffic_bound_s"] for row in rows.values())
    total = {
        "measured_s": total_measured,
        "flops": sum(row["flops"] for row in rows.values()),
        "flops_executed": sum(row["flops_executed"] for row in rows.values()),
        "compute_bound_s": total_compute,
        "measured_over_compute_bound": total_measured / total_compute,
        "gathered_bytes": sum(row["gathered_bytes"] for row in rows.values()),
        "traffic_bound_s": total_traffic,
        "measured_over_traffic_bound": total_measured / total_traffic,
        "peak_memory_bytes": memory.get("step"),
        "memory_method": memory.method,
        "memory_error": memory.error,
    }
    factor = total["measured_over_compute_bound"]
    goal = common.target_entry(factor, f"<= {GOAL_FACTOR:g}", factor <= GOAL_FACTOR, "total measured time / compute-bound time")
    payload = {
        "benchmark": NAME,
        "environment": common.environment_info(device),
        "config": {"shape": shape.as_dict(), "backend": args.backend, "loss_path": loss_path, "pool_grad": pool_grad,
                   "repeats": repeats, "warmup": args.warmup, "matmul_size": matmul_size, "gather_rows": gather_rows,
                   "gather_block_rows": block_rows},  # fmt: skip
        "machine": {"matmul_gflops": matmul_gflops, "gather_gbps": gather_gbps},
        "sampler": dataclasses.asdict(geometry),
        "components": rows,
        "total": total,
        "goal": goal,
    }
    common.write_report(NAME, args.out, payload, render_markdown(shape, device, repeats, args.warmup, payload))
    return payload


def render_markdown(shape: Shape, device: torch.device, repeats: int, warmup: int, payload: dict[str, Any]) -> str:
    """The report as Markdown."""
    machine, config, sampler = payload["machine"], payload["config"], payload["sampler"]
    rows = []
    for name, row in payload["components"].items():
        rows.append([
            name, common.format_seconds(row["time"]["median_s"]), f"{row['flops'] / 1e9:.3g}",
            f"{row['flops_executed'] / 1e9:.3g}", f"{row['achieved_gflops']:.3g}",
            common.format_seconds(row["compute_bound_s"]), common.format_ratio(row["measured_over_compute_bound"]),
            common.format_bytes(row["gathered_bytes"]), common.format_seconds(row["traffic_bound_s"]),
            common.format_ratio(row["measured_over_traffic_bound"]),
        ])  # fmt: skip
    total = payload["total"]
    rows.append([
        "**total**", common.format_seconds(total["measured_s"]), f"{total['flops'] / 1e9:.3g}",
        f"{total['flops_executed'] / 1e9:.3g}", f"{total['flops_executed'] / total['measured_s'] / 1e9:.3g}",
        common.format_seconds(total["compute_bound_s"]), common.format_ratio(total["measured_over_compute_bound"]),
        common.format_bytes(total["gathered_bytes"]), common.format_seconds(total["traffic_bound_s"]),
        common.format_ratio(total["measured_over_traffic_bound"]),
    ])  # fmt: skip
    goal = payload["goal"]
    verdict = {True: "met", False: "NOT met", None: "—"}[goal["meets_target"]]
    memory_note = (
        f"Peak memory of the whole step: {common.format_bytes(total['peak_memory_bytes'])}."
        if total["memory_error"] is None
        else f"Peak memory of the whole step: not measured ({total['memory_error']})."
    )
    blocks_note = (
        f"candidate blocks: {sampler['candidate_rows']:,.0f} candidate rows, {sampler['dense_pairs']:,.0f} anchor×candidate scores"
        if sampler["dense_pairs"] is not None
        else "no candidate blocks"
    )
    return "\n".join([
        common.run_header("Roofline: sampler + loss against the machine's limits", shape, device, repeats, warmup),
        f"Machine (same process): float32 matmul {machine['matmul_gflops']:.1f} GFLOP/s ({config['matmul_size']}² torch.mm), "
        f"gather {machine['gather_gbps']:.2f} GB/s (index_select of random pool rows, {config['gather_rows']:,} rows).",
        f"Loss path: {config['loss_path']} (backend {config['backend']!r}); pool gradient: {config['pool_grad']}; "
        f"sampler: {sampler['proposals']:,.0f} proposals per step, {blocks_note}.",
        "",
        common.markdown_table(
            ["component", "measured", "GFLOP (essential)", "GFLOP (executed)", "achieved GFLOP/s", "compute bound",
             "measured / compute", "gathered", "traffic bound", "measured / traffic"],
            rows,
        ),  # fmt: skip
        "",
        f"Goal: total within {GOAL_FACTOR:g}× of the compute bound (essential FLOPs ÷ matmul rate) — "
        f"{common.format_ratio(goal['value'])}, {verdict}.",
        memory_note,
        "FLOP and byte counts: benchmarks/README.md (flop_counts / gathered_bytes in this script).",
    ])  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--backend", default="auto", choices=("auto", "chunked", "reference", "triton"), help="loss backend")
    parser.add_argument("--matmul-size", type=int, default=None, help="n of the n×n matmul probe (default 2048 CPU, 8192 CUDA)")
    parser.add_argument("--gather-rows", type=int, default=None, help="random pool rows the gather probe reads (default 2^20)")
    parser.add_argument(
        "--no-detach-strong", action="store_true", help="give the pool a gradient too (counts the scatter)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    run(parse_args(argv))


if __name__ == "__main__":
    main()
