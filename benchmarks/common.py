"""Shared machinery of the benchmarks: shapes and inputs, timing, peak memory, reports.

Every benchmark script in this folder follows the same pattern:

1. parse the shape options (:func:`add_common_arguments`, :func:`resolve_shape`);
2. build the inputs once with :func:`make_inputs` (touching instances from
   :mod:`instcontrast.synthetic` and noisy, realistic predictions derived from them);
3. wrap each provider (ours, a baseline, a peer library) as a :class:`Step` built by a module-level
   *builder* function, so that the same code can be rebuilt inside a fresh worker process;
4. time all steps in this process, interleaved round-robin (:func:`time_steps`), so ratios compare
   providers on the same inputs under the same machine load;
5. measure each provider's peak memory (:func:`measure_peak_memory`): on CUDA in this process with
   ``torch.cuda.max_memory_allocated``; on CPU in a fresh worker process per measurement, with the
   Linux peak-RSS counter (``VmHWM``) reset after the inputs are built;
6. write ``<out>/<name>.json`` and ``<out>/<name>.md`` (:func:`write_report`) and print the table.

See ``benchmarks/README.md`` for the methods in prose.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime as _datetime
import gc
import importlib
import json
import math
import multiprocessing
import multiprocessing.forkserver
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from instcontrast import InstanceAwarePixelContrast, PixelMemoryBank, fused_probability, pixel_info_nce
from instcontrast.synthetic import noisy_predictions, touching_instances

__all__ = [
    "BENCH_DIR",
    "DEFAULT_RESULTS_DIR",
    "DEFAULT_SHAPE",
    "SMOKE_SHAPE",
    "BenchInputs",
    "MemoryResult",
    "ProviderRecord",
    "Shape",
    "Step",
    "Timing",
    "add_common_arguments",
    "apply_timings",
    "available_memory_bytes",
    "contrast_step_fn",
    "cpu_memory_measurement_available",
    "describe_failure",
    "environment_info",
    "filled_memory_bank",
    "format_bytes",
    "format_ratio",
    "format_seconds",
    "instance_grid",
    "loglog_fit",
    "loglog_slope",
    "make_inputs",
    "markdown_table",
    "measure_peak_memory",
    "naive_full_matrix_sample",
    "naive_score_matrix_bytes",
    "prepare_run",
    "ratio",
    "release_memory",
    "resolve_shape",
    "run_header",
    "select_device",
    "start_memory_workers",
    "synchronize",
    "target_entry",
    "time_steps",
    "write_report",
]

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_RESULTS_DIR = BENCH_DIR / "results"
BACKEND_ENV_VARIABLE = "INSTCONTRAST_BACKEND"

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_WORKER_MMAP_THRESHOLD = 128 * 1024  # fixed: large buffers are mmap'd and returned to the OS when freed


# --------------------------------------------------------------------------------------------------
# Shapes and inputs.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """The problem size of one benchmark point.

    Attributes:
        batch: images ``B``.
        height: feature rows ``h``.
        width: feature columns ``w``.
        queries: instance queries ``K``.
        classes: foreground classes ``C`` (the no-object class is added on top).
        dim: embedding width ``D``.
        negatives: negatives per anchor ``R``.
        temperature: InfoNCE temperature ``T``.
        mask_scale: mask logits are generated at ``(mask_scale·h, mask_scale·w)`` and resized to
            ``h×w`` by the library (1: masks already at feature resolution).
        seed: seed of the scene, the predictions and the embeddings.
    """

    batch: int = 4
    height: int = 64
    width: int = 64
    queries: int = 50
    classes: int = 8
    dim: int = 128
    negatives: int = 256
    temperature: float = 0.2
    mask_scale: int = 1
    seed: int = 0

    @property
    def pixels(self) -> int:
        """``B·h·w``: every pixel is an anchor and a candidate negative."""
        return self.batch * self.height * self.width

    @property
    def prob_dim(self) -> int:
        """``E = K + C + 1``, the width of the fused probability vector (``"fusion"``)."""
        return self.queries + self.classes + 1

    def replace(self, **changes: Any) -> Shape:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def as_dict_fields(self) -> dict[str, Any]:
        """Only the fields: ``Shape(**shape.as_dict_fields()) == shape`` (for worker processes)."""
        return dataclasses.asdict(self)

    def as_dict(self) -> dict[str, Any]:
        """The fields plus the derived pixel count, for JSON."""
        return {**dataclasses.asdict(self), "pixels": self.pixels, "prob_dim": self.prob_dim}

    def label(self) -> str:
        """A short human-readable description."""
        return (
            f"B={self.batch}, {self.height}×{self.width} ({self.pixels:,} anchors), K={self.queries}, "
            f"C={self.classes}, D={self.dim}, R={self.negatives}"
        )


DEFAULT_SHAPE = Shape()
SMOKE_SHAPE = Shape(batch=2, height=8, width=8, queries=6, classes=3, dim=16, negatives=16)


def instance_grid(queries: int, height: int, width: int, rows: int = 4, columns: int = 6) -> tuple[int, int]:
    """Rows × columns of touching instances per image: at most ``queries`` instances, fitting ``h×w``.

    Starts from ``rows × columns`` (24 instances, a crowded street scene) and shrinks the larger side
    until the grid fits the queries and the image.
    """
    rows, columns = min(rows, height), min(columns, width)
    while rows * columns > queries:
        if columns >= rows and columns > 1:
            columns -= 1
        else:
            rows -= 1
    return max(1, rows), max(1, columns)


@dataclass
class BenchInputs:
    """Inputs of one benchmark point, on the benchmark device.

    Attributes:
        shape: the :class:`Shape` they were built for.
        z_weak: weak-view embeddings ``(B, D, h, w)``, a leaf that requires grad.
        z_strong: strong-view embeddings ``(B, D, h, w)`` (the detached target).
        mask_logits: ``(B, K, s·h, s·w)`` with ``s = mask_scale``.
        class_logits: ``(B, K, C+1)``.
        instance_ids: ground-truth instance ids at feature resolution ``(B, h, w)``.
    """

    shape: Shape
    z_weak: Tensor
    z_strong: Tensor
    mask_logits: Tensor
    class_logits: Tensor
    instance_ids: Tensor

    @property
    def device(self) -> torch.device:
        """Where the tensors live."""
        return self.z_weak.device

    def probs(self) -> Tensor:
        """Fused probability vectors of every pixel, ``(B·h·w, E)`` (computed, no grad)."""
        shape = self.shape
        with torch.no_grad():
            probs = fused_probability(self.mask_logits, self.class_logits, (shape.height, shape.width), "fusion")
        return probs.reshape(shape.pixels, -1)

    def weak_rows(self) -> Tensor:
        """Weak embeddings as rows ``(B·h·w, D)``, differentiable with respect to :attr:`z_weak`."""
        return self.z_weak.permute(0, 2, 3, 1).reshape(-1, self.shape.dim)

    def strong_rows(self) -> Tensor:
        """Strong embeddings as rows ``(B·h·w, D)``, detached (the default asymmetric target)."""
        return self.z_strong.detach().permute(0, 2, 3, 1).reshape(-1, self.shape.dim)

    def global_labels(self) -> Tensor:
        """Instance labels unique across images, ``(B·h·w,)`` int64: ``image · K + id``."""
        image = torch.arange(self.shape.batch, device=self.device)[:, None, None]
        return (image * self.shape.queries + self.instance_ids).reshape(-1)


def make_inputs(shape: Shape, device: torch.device | str) -> BenchInputs:
    """Generate realistic inputs: touching instances, noisy predictions, instance-clustered embeddings.

    The scene is a grid of touching rectangular instances per image (:func:`instance_grid`, up to
    24 instances, random classes); the mask/class logits come from
    :func:`instcontrast.synthetic.noisy_predictions` with confidence 2 and unit Gaussian noise, so
    the fused probabilities are soft, as a partly trained model's are. Embeddings are a per-instance
    centroid plus noise (the strong view adds a little more), so the loss is neither trivial nor
    degenerate. Everything is generated on the CPU from ``shape.seed`` and then moved, so every
    provider and every worker process sees identical inputs.

    Args:
        shape: the problem size.
        device: where to put the tensors.

    Returns:
        :class:`BenchInputs`.
    """
    device = torch.device(device)
    rows, columns = instance_grid(shape.queries, shape.height, shape.width)
    mask_height, mask_width = shape.height * shape.mask_scale, shape.width * shape.mask_scale
    ids_mask, instance_class = touching_instances(
        batch=shape.batch, height=mask_height, width=mask_width, columns=columns, rows=rows,
        num_classes=shape.classes, seed=shape.seed,
    )  # fmt: skip
    mask_logits, class_logits = noisy_predictions(
        ids_mask, instance_class, shape.queries, shape.classes, confidence=2.0, noise=1.0, seed=shape.seed
    )
    ids = ids_mask[:, :: shape.mask_scale, :: shape.mask_scale].contiguous()  # (B, h, w)
    generator = torch.Generator().manual_seed(shape.seed + 1)
    centroids = torch.randn(shape.batch, rows * columns, shape.dim, generator=generator)  # (B, I, D)
    pixel_centroid = centroids[torch.arange(shape.batch)[:, None, None], ids]  # (B, h, w, D)
    weak = pixel_centroid + 0.7 * torch.randn(pixel_centroid.shape, generator=generator)
    strong = weak + 0.3 * torch.randn(pixel_centroid.shape, generator=generator)
    z_weak = weak.permute(0, 3, 1, 2).contiguous().to(device).requires_grad_(True)  # (B, D, h, w)
    z_strong = strong.permute(0, 3, 1, 2).contiguous().to(device)  # (B, D, h, w)
    return BenchInputs(
        shape=shape,
        z_weak=z_weak,
        z_strong=z_strong,
        mask_logits=mask_logits.to(device),
        class_logits=class_logits.to(device),
        instance_ids=ids.to(device),
    )


def naive_full_matrix_sample(
    anchor_probs: Tensor, pool_probs: Tensor, num_negatives: int, generator: torch.Generator | None = None
) -> Tensor:
    r"""The authors' prototype sampler: the full score matrix, then ``torch.multinomial``.

    .. math::
        S = \mathrm{clamp}(1 - \hat Y_{\mathrm{anchors}} \hat Y_{\mathrm{pool}}^\top, 0, 1) \in [0,1]^{A\times M},
        \qquad i_{a,\cdot} \sim \mathrm{Multinomial}(S_{a,\cdot}),\ R \text{ draws with replacement}.

    The matrix is formed in place after the product (one ``A × M`` float buffer), which is the
    cheapest faithful version of the prototype.

    Args:
        anchor_probs: fused probability vectors of the anchors ``(A, E)``.
        pool_probs: fused probability vectors of the pool ``(M, E)``.
        num_negatives: ``R``.
        generator: random generator.

    Returns:
        ``(A, R)`` int64 indices into the pool.
    """
    with torch.no_grad():
        scores = anchor_probs @ pool_probs.T  # (A, M)
        scores.neg_().add_(1.0).clamp_(0.0, 1.0)
        return torch.multinomial(scores, num_negatives, replacement=True, generator=generator)


def naive_score_matrix_bytes(anchors: int, pool: int) -> int:
    """Bytes of the float32 ``A × M`` score matrix the naive sampler materializes."""
    return 4 * anchors * pool


def contrast_step_fn(
    inputs: BenchInputs,
    strategy: str,
    backend: str,
    generator: torch.Generator | None,
    with_stats: bool = False,
    memory_bank: PixelMemoryBank | None = None,
) -> Callable[[], None]:
    """One training step of a sampler + loss provider, every pixel an anchor: forward and backward.

    Args:
        inputs: the benchmark inputs.
        strategy: ``"fusion"``, ``"uniform"`` (or ``"mask"``/``"class"``): our module,
            ``InstanceAwarePixelContrast(strategy=..., backend=...)``; ``"naive"``: the authors'
            prototype (:func:`naive_full_matrix_sample`) followed by the reference loss.
        backend: the loss backend (ignored for ``"naive"``, which always uses ``"reference"``).
        generator: random generator of the sampler.
        with_stats: let the module compute its margin diagnostics (an extra no-grad pass).
        memory_bank: a bank for the module (extra candidates, enqueued after each step).

    Returns:
        A function running one step (its gradients accumulate into ``inputs.z_weak.grad``).
    """
    shape = inputs.shape
    if strategy == "naive":

        def naive_step() -> None:
            probs = inputs.probs()
            index = naive_full_matrix_sample(probs, probs, shape.negatives, generator)
            strong = inputs.strong_rows()
            loss = pixel_info_nce(inputs.weak_rows(), strong, strong, index, shape.temperature, backend="reference")
            loss.backward()

        return naive_step
    criterion = InstanceAwarePixelContrast(
        temperature=shape.temperature,
        num_negatives=shape.negatives,
        strategy=strategy,
        backend=backend,
        compute_stats=with_stats,
        memory_bank=memory_bank,
    ).to(inputs.device)
    criterion.train()

    def module_step() -> None:
        out = criterion(inputs.z_weak, inputs.z_strong, inputs.mask_logits, inputs.class_logits, generator=generator)
        out.loss.backward()

    return module_step


def filled_memory_bank(inputs: BenchInputs, size: int, pixels_per_step: int | None = 1024) -> PixelMemoryBank:
    """A :class:`~instcontrast.PixelMemoryBank` of ``size`` rows, filled to steady state.

    Filled by enqueueing the inputs' strong embeddings and fused probabilities (a random subset of
    ``pixels_per_step`` per call, as in training) until every row holds data.
    """
    shape = inputs.shape
    bank = PixelMemoryBank(shape.dim, shape.prob_dim, size=size, pixels_per_step=pixels_per_step).to(inputs.device)
    probs = inputs.probs()
    strong = inputs.strong_rows()
    generator = torch.Generator(device=inputs.device).manual_seed(shape.seed + 3)
    while int(bank.filled) < size:
        bank.enqueue(strong, probs, generator=generator)
    return bank


# --------------------------------------------------------------------------------------------------
# Devices, steps and timing.
# --------------------------------------------------------------------------------------------------


def select_device(name: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; ``"cpu"``/``"cuda"``/``"cuda:N"`` as asked.

    Raises:
        ValueError: when CUDA is asked for but not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for CUDA, but torch.cuda.is_available() is False on this machine")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on CUDA (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Step:
    """One benchmark iteration.

    Attributes:
        fn: runs one iteration (e.g. sampler + loss forward + backward); its result is discarded.
        leaves: tensors whose ``.grad`` is cleared before each iteration, so every iteration
            allocates its gradients afresh (as a trainer with ``zero_grad(set_to_none=True)`` does).
    """

    fn: Callable[[], object]
    leaves: tuple[Tensor, ...] = ()

    def reset(self) -> None:
        """Drop the gradients of :attr:`leaves`."""
        for leaf in self.leaves:
            leaf.grad = None

    def __call__(self) -> None:
        self.reset()
        self.fn()


@dataclass
class Timing:
    """Wall-clock seconds of the timed repeats of one step (warm-ups excluded)."""

    seconds: list[float]

    @property
    def median(self) -> float:
        """Median seconds."""
        return statistics.median(self.seconds)

    def as_dict(self) -> dict[str, Any]:
        """For JSON."""
        return {"median_s": self.median, "min_s": min(self.seconds), "max_s": max(self.seconds), "repeats_s": self.seconds}


def describe_failure(error: BaseException) -> str:
    """A one-line description of why a provider could not run; out-of-memory errors start with ``OOM``."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    lowered = text.lower()
    if isinstance(error, MemoryError) or any(
        marker in lowered for marker in ("out of memory", "can't allocate", "cannot allocate", "not enough memory")
    ):
        return f"OOM: {text[:240]}"
    return f"{type(error).__name__}: {text[:240]}"


def time_steps(
    steps: Mapping[str, Step], repeats: int, warmup: int, device: torch.device
) -> dict[str, Timing | str]:
    """Time several steps in this process, interleaved round-robin.

    Every step first runs ``warmup`` untimed iterations; then each of the ``repeats`` rounds runs
    every step once, in the given order, timed with ``time.perf_counter`` around the step and a
    device synchronization. Interleaving spreads slow drifts of the machine's load over all steps
    evenly, which keeps their ratios honest on a shared machine.

    Args:
        steps: name → step.
        repeats: timed iterations per step.
        warmup: untimed iterations per step before timing.
        device: the device to synchronize.

    Returns:
        name → :class:`Timing`, or a failure description (:func:`describe_failure`) for a step that
        raised; a failing step is dropped from the remaining rounds.
    """
    results: dict[str, Timing | str] = {}
    timings: dict[str, Timing] = {}
    active: dict[str, Step] = {}
    for name, step in steps.items():
        try:
            for _ in range(warmup):
                step()
                synchronize(device)
            active[name] = step
            timings[name] = Timing([])
            results[name] = timings[name]
        except Exception as error:  # noqa: BLE001 - reported in the output instead of crashing the run
            results[name] = describe_failure(error)
            release_memory(device)
    for _ in range(repeats):
        for name in list(active):
            step = active[name]
            try:
                synchronize(device)
                start = time.perf_counter()
                step()
                synchronize(device)
                elapsed = time.perf_counter() - start
            except Exception as error:  # noqa: BLE001
                results[name] = describe_failure(error)
                del active[name]
                release_memory(device)
                continue
            timings[name].seconds.append(elapsed)
    for step in steps.values():
        step.reset()
    return results


def release_memory(device: torch.device) -> None:
    """Collect garbage (and return cached CUDA blocks) after a failure or a big measurement."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# Peak memory.
# --------------------------------------------------------------------------------------------------


@dataclass
class MemoryResult:
    """Peak memory of the phases of one provider.

    Attributes:
        peak_bytes: phase → peak bytes above what was allocated before the phase ran (inputs,
            model state); ``None`` when the measurement failed.
        method: how it was measured.
        error: why it failed (``OOM: ...`` for out-of-memory), else ``None``.
    """

    peak_bytes: dict[str, int] | None
    method: str
    error: str | None = None

    def get(self, phase: str) -> int | None:
        """Peak bytes of one phase, ``None`` if unavailable."""
        return None if self.peak_bytes is None else self.peak_bytes.get(phase)

    def as_dict(self) -> dict[str, Any]:
        """For JSON."""
        return {"peak_bytes": self.peak_bytes, "method": self.method, "error": self.error}


CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before"
CPU_MEMORY_METHOD = (
    "fresh forkserver worker process; VmHWM reset via /proc/self/clear_refs after inputs + warm-up; "
    "peak = VmHWM - VmRSS just before the step (glibc mmap threshold fixed at 128 KiB)"
)


def _read_proc_status() -> dict[str, int]:
    """``VmRSS``, ``VmHWM`` and ``VmData`` of this process in bytes (Linux ``/proc/self/status``)."""
    values: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "VmData"):
                values[key] = int(rest.split()[0]) * 1024  # reported in kB
    return values


def _reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux: writing ``5`` to ``/proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")


def _load_glibc() -> ctypes.CDLL | None:
    """glibc (for ``mallopt``/``malloc_trim``), or ``None`` on other C libraries and systems."""
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 - only glibc has it
        return libc
    except (OSError, AttributeError):
        return None


_GLIBC = _load_glibc()


def _glibc() -> ctypes.CDLL | None:
    """The glibc handle loaded at import (inherited by forked workers), or ``None``."""
    return _GLIBC


def _configure_worker_malloc() -> None:
    """Make freed buffers go back to the OS at once, so ``VmRSS`` before a phase is not inflated."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _WORKER_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _WORKER_MMAP_THRESHOLD)


def _trim_heap() -> None:
    libc = _glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _measure_phases_cpu(steps: Mapping[str, Step], warmup: int) -> dict[str, int]:
    peaks: dict[str, int] = {}
    for phase, step in steps.items():
        for _ in range(warmup):
            step()
        step.reset()
        gc.collect()
        _trim_heap()
        before = _read_proc_status()["VmRSS"]
        _reset_peak_rss()
        step.fn()
        peak = _read_proc_status()["VmHWM"]
        step.reset()
        peaks[phase] = max(0, peak - before)
    return peaks


def _measure_phases_cuda(steps: Mapping[str, Step], warmup: int, device: torch.device) -> dict[str, int]:
    peaks: dict[str, int] = {}
    for phase, step in steps.items():
        for _ in range(warmup):
            step()
        step.reset()
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step.fn()
        torch.cuda.synchronize(device)
        peaks[phase] = max(0, torch.cuda.max_memory_allocated(device) - before)
        step.reset()
    return peaks


def _memory_worker(
    module_name: str,
    function_name: str,
    kwargs: dict[str, Any],
    warmup: int,
    limit_bytes: int | None,
    threads: int,
    connection: Any,
) -> None:
    """Entry point of a CPU memory worker (runs in a fresh process forked from the forkserver)."""
    try:
        torch.set_num_threads(threads)
        gc.freeze()  # objects inherited from the forkserver: keep later collections short
        _configure_worker_malloc()
        if limit_bytes is not None:
            # allocations beyond the budget fail with an error instead of waking the OOM killer
            data = _read_proc_status()["VmData"]
            resource.setrlimit(resource.RLIMIT_DATA, (data + limit_bytes, resource.RLIM_INFINITY))
        builder = getattr(importlib.import_module(module_name), function_name)
        steps = builder(**kwargs)
        connection.send(("ok", _measure_phases_cpu(steps, warmup)))
    except BaseException as error:  # noqa: BLE001 - every failure is reported to the parent
        connection.send(("error", describe_failure(error)))
    finally:
        connection.close()


_FORKSERVER: multiprocessing.context.BaseContext | None = None


def _worker_context(preload: Sequence[str]) -> multiprocessing.context.BaseContext:
    """The forkserver context; its server imports torch and the benchmark modules once."""
    global _FORKSERVER
    if _FORKSERVER is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", "instcontrast", "common", *preload])
        _FORKSERVER = context
    return _FORKSERVER


def _module_name(function: Callable[..., Any]) -> str:
    module = function.__module__
    if module == "__main__":
        return Path(sys.modules["__main__"].__file__ or "").stem
    return module


def start_memory_workers(device: torch.device, module: str, preload: Sequence[str] = ()) -> None:
    """Start the forkserver of the CPU memory workers now, so that its imports (torch, the
    benchmark module, ``preload``) overlap with this process's work. No-op on CUDA."""
    if device.type != "cpu" or not cpu_memory_measurement_available():
        return
    _worker_context([module, *preload])
    multiprocessing.forkserver.ensure_running()


def cpu_memory_measurement_available() -> bool:
    """Whether this machine supports the ``VmHWM`` reset method (Linux with ``/proc/self/clear_refs``)."""
    return platform.system() == "Linux" and os.access("/proc/self/clear_refs", os.W_OK)


def measure_peak_memory(
    builder: Callable[..., Mapping[str, Step]],
    kwargs: dict[str, Any],
    device: torch.device,
    warmup: int = 1,
    limit_bytes: int | None = None,
    timeout_s: float = 3600.0,
    preload: Sequence[str] = (),
) -> MemoryResult:
    """Peak memory of each phase a builder returns.

    ``builder(**kwargs)`` must build its inputs itself (deterministically) and return
    ``phase → Step``. For each phase: ``warmup`` iterations, then the gradients are dropped, the
    counter is reset and one iteration is measured.

    - CUDA: in this process, ``torch.cuda.max_memory_allocated`` after
      ``torch.cuda.reset_peak_memory_stats``, minus ``torch.cuda.memory_allocated`` just before.
    - CPU: in a fresh worker process (``multiprocessing`` forkserver, so it does not inherit this
      process's heap), glibc's mmap threshold fixed at 128 KiB so freed buffers are returned to the
      OS, ``VmHWM`` reset by writing ``5`` to ``/proc/self/clear_refs``, and the peak reported as
      ``VmHWM`` after the step minus ``VmRSS`` just before it. With ``limit_bytes`` the worker's
      ``RLIMIT_DATA`` is set to that much above its current data size, so an over-budget allocation
      fails (reported as ``OOM``) instead of exhausting the machine.

    Args:
        builder: a module-level function (importable by name in the worker).
        kwargs: its keyword arguments (picklable).
        device: the benchmark device.
        warmup: untimed iterations before the measured one.
        limit_bytes: CPU only: address-space budget of the worker beyond its start-up size.
        timeout_s: CPU only: seconds to wait for the worker.
        preload: extra modules for the forkserver to import once (e.g. a peer library).

    Returns:
        :class:`MemoryResult`.
    """
    if device.type == "cuda":
        try:
            steps = builder(**kwargs)
            return MemoryResult(_measure_phases_cuda(steps, warmup, device), CUDA_MEMORY_METHOD)
        except Exception as error:  # noqa: BLE001
            return MemoryResult(None, CUDA_MEMORY_METHOD, describe_failure(error))
        finally:
            release_memory(device)
    if not cpu_memory_measurement_available():
        return MemoryResult(None, CPU_MEMORY_METHOD, "unavailable: needs Linux /proc/self/clear_refs")
    module_name = _module_name(builder)
    context = _worker_context([module_name, *preload])
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(
        target=_memory_worker,
        args=(module_name, builder.__name__, kwargs, warmup, limit_bytes, torch.get_num_threads(), sender),
    )
    process.start()
    sender.close()
    message: tuple[str, Any] | None = None
    try:
        if receiver.poll(timeout_s):
            message = receiver.recv()
    except EOFError:
        message = None
    process.join(timeout=30)
    if process.is_alive():
        process.kill()
        process.join()
    receiver.close()
    if message is None:
        if process.exitcode is None or process.exitcode == 0:
            reason = f"worker timed out after {timeout_s:.0f} s"
        elif process.exitcode == -9:
            reason = "OOM: worker was killed (SIGKILL, likely the out-of-memory killer)"
        else:
            reason = f"worker exited with code {process.exitcode}"
        return MemoryResult(None, CPU_MEMORY_METHOD, reason)
    status, payload = message
    if status == "ok":
        return MemoryResult({str(k): int(v) for k, v in payload.items()}, CPU_MEMORY_METHOD)
    return MemoryResult(None, CPU_MEMORY_METHOD, str(payload))


def available_memory_bytes() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` (Linux), else ``None``."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------------------------------
# Fits.
# --------------------------------------------------------------------------------------------------


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of ``log y`` against ``log x`` (``numpy.polyfit``), ``None`` with < 2 points."""
    import numpy as np

    points = [(x, y) for x, y in zip(xs, ys) if x > 0 and y is not None and y > 0]
    if len({x for x, _ in points}) < 2:
        return None
    slope, _ = np.polyfit(np.log([x for x, _ in points]), np.log([y for _, y in points]), 1)
    return float(slope)


def loglog_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float] | None:
    """``(slope, intercept)`` of ``log y = slope · log x + intercept``; ``None`` with < 2 points."""
    import numpy as np

    points = [(x, y) for x, y in zip(xs, ys) if x > 0 and y is not None and y > 0]
    if len({x for x, _ in points}) < 2:
        return None
    slope, intercept = np.polyfit(np.log([x for x, _ in points]), np.log([y for _, y in points]), 1)
    return float(slope), float(intercept)


# --------------------------------------------------------------------------------------------------
# Command line and reports.
# --------------------------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser, defaults: Shape = DEFAULT_SHAPE) -> None:
    """Shape options (``--batch/--B``, ``--height/--h``, ``--width/--w``, ``--queries/--K``,
    ``--classes/--C``, ``--dim/--D``, ``--negatives/--R``, ``--temperature``, ``--mask-scale``,
    ``--seed``) and run options (``--repeats``, ``--warmup``, ``--device``, ``--threads``, ``--out``,
    ``--smoke``). Shape options default to ``None`` and are resolved by :func:`resolve_shape`."""
    shape = parser.add_argument_group("shape (defaults: the full-size configuration; --smoke: tiny)")
    shape.add_argument("--batch", "--B", type=int, default=None, help=f"images B (default {defaults.batch})")
    shape.add_argument("--height", "--h", type=int, default=None, help=f"feature rows h (default {defaults.height})")
    shape.add_argument("--width", "--w", type=int, default=None, help=f"feature columns w (default {defaults.width})")
    shape.add_argument("--queries", "--K", type=int, default=None, help=f"instance queries K (default {defaults.queries})")
    shape.add_argument("--classes", "--C", type=int, default=None, help=f"classes C (default {defaults.classes})")
    shape.add_argument("--dim", "--D", type=int, default=None, help=f"embedding width D (default {defaults.dim})")
    shape.add_argument("--negatives", "--R", type=int, default=None, help=f"negatives R (default {defaults.negatives})")
    shape.add_argument("--temperature", type=float, default=None, help=f"temperature T (default {defaults.temperature})")
    shape.add_argument("--mask-scale", type=int, default=None, help="mask logits at (s·h, s·w) (default 1)")
    shape.add_argument("--seed", type=int, default=None, help="seed of the generated inputs (default 0)")
    run = parser.add_argument_group("run")
    run.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 5; smoke 2)")
    run.add_argument("--warmup", type=int, default=1, help="untimed warm-up iterations (default 1)")
    run.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N")
    run.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    run.add_argument("--out", type=Path, default=DEFAULT_RESULTS_DIR, help="results folder (default benchmarks/results)")
    run.add_argument("--smoke", action="store_true", help="tiny shapes that run in seconds (used by the tests)")


def resolve_shape(args: argparse.Namespace, defaults: Shape = DEFAULT_SHAPE, smoke: Shape = SMOKE_SHAPE) -> Shape:
    """The shape: ``defaults`` (or ``smoke`` with ``--smoke``) with any option given explicitly applied."""
    base = smoke if args.smoke else defaults
    changes = {
        name: getattr(args, name)
        for name in ("batch", "height", "width", "queries", "classes", "dim", "negatives", "temperature", "mask_scale", "seed")
        if getattr(args, name, None) is not None
    }
    shape = base.replace(**changes)
    for name in ("batch", "height", "width", "queries", "classes", "dim", "negatives", "mask_scale"):
        if getattr(shape, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(shape, name)}")
    if shape.temperature <= 0:
        raise SystemExit(f"--temperature must be > 0, got {shape.temperature}")
    return shape


def prepare_run(args: argparse.Namespace, module: str, preload: Sequence[str] = ()) -> tuple[torch.device, int]:
    """Apply the run options: threads, device, and the repeats (default 5, smoke 2).

    Also removes ``INSTCONTRAST_BACKEND`` from the environment (with a note on stderr): it would
    silently override every provider's explicit backend and make the labels wrong. On CPU it
    starts the memory workers' forkserver at once (:func:`start_memory_workers`).

    Args:
        args: the parsed options of :func:`add_common_arguments`.
        module: the benchmark module whose builders the memory workers import.
        preload: extra modules the workers should import once.

    Returns:
        ``(device, repeats)``.
    """
    if os.environ.pop(BACKEND_ENV_VARIABLE, None) is not None:
        print(f"note: ignoring {BACKEND_ENV_VARIABLE} so that each provider runs the backend it names", file=sys.stderr)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    repeats = args.repeats if args.repeats is not None else (2 if args.smoke else 5)
    if repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    device = select_device(args.device)
    start_memory_workers(device, module, preload)
    return device, repeats


def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def environment_info(device: torch.device) -> dict[str, Any]:
    """Where and when the numbers were taken."""
    info: dict[str, Any] = {
        "created": _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "git_commit": _git_commit(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    else:
        info["device_name"] = info["processor"]
    return info


def format_seconds(seconds: float | None) -> str:
    """``12.3 ms`` / ``1.23 s``; ``—`` for ``None``."""
    if seconds is None:
        return "—"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def format_bytes(value: float | None) -> str:
    """``12.3 MiB`` / ``1.23 GiB``; ``—`` for ``None``."""
    if value is None:
        return "—"
    if value >= 2**30:
        return f"{value / 2**30:.3g} GiB"
    return f"{value / 2**20:.3g} MiB"


def format_ratio(value: float | None) -> str:
    """``1.23×``; ``—`` for ``None``."""
    return "—" if value is None else f"{value:.3g}×"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator`` or ``None`` when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def target_entry(value: float | None, target: str, meets: bool | None, description: str) -> dict[str, Any]:
    """A ratio with its target, for the ``ratios`` section of a report."""
    return {"value": value, "target": target, "meets_target": meets, "description": description}


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_report(name: str, out_dir: Path, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.json`` and ``<name>.md``, print the Markdown, return both paths.

    Non-finite floats are written as ``null`` (never ``NaN``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    markdown_path = out_dir / f"{name}.md"
    json_path.write_text(json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    markdown_path.write_text(markdown.rstrip() + "\n", encoding="utf-8")
    print(markdown)
    print(f"\nwrote {json_path} and {markdown_path}")
    return json_path, markdown_path


def run_header(title: str, shape: Shape | None, device: torch.device, repeats: int, warmup: int) -> str:
    """The Markdown heading and configuration line of a report."""
    info = environment_info(device)
    lines = [f"# {title}", ""]
    if shape is not None:
        lines.append(f"Shape: {shape.label()}, T={shape.temperature}.")
    lines.append(
        f"Device: {info['device']} ({info['device_name']}), torch {info['torch']}, {info['torch_threads']} threads; "
        f"median of {repeats} repeats after {warmup} warm-up."
    )
    lines.append("")
    return "\n".join(lines)


@dataclass
class ProviderRecord:
    """What a report says about one provider: status, timings, memory, extras."""

    name: str
    status: str = "ok"  # "ok" | "skipped" | "failed"
    reason: str | None = None
    timings: dict[str, Timing] = field(default_factory=dict)
    memory: MemoryResult | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def median(self, phase: str) -> float | None:
        """Median seconds of a phase, ``None`` if it did not run."""
        timing = self.timings.get(phase)
        return timing.median if timing is not None else None

    def peak(self, phase: str) -> int | None:
        """Peak bytes of a phase, ``None`` if unavailable."""
        return self.memory.get(phase) if self.memory is not None else None

    def as_dict(self) -> dict[str, Any]:
        """For JSON."""
        return {
            "name": self.name,
            "status": self.status,
            "reason": self.reason,
            "time": {phase: timing.as_dict() for phase, timing in self.timings.items()},
            "memory": self.memory.as_dict() if self.memory is not None else None,
            **self.extra,
        }


def apply_timings(records: Mapping[str, ProviderRecord], results: Mapping[str, Timing | str], separator: str = "/") -> None:
    """Store ``time_steps`` results keyed ``"<provider><separator><phase>"`` into the records."""
    for key, result in results.items():
        provider, _, phase = key.partition(separator)
        record = records[provider]
        if isinstance(result, Timing):
            record.timings[phase] = result
        else:
            record.status = "failed"
            record.reason = f"{phase}: {result}" if record.reason is None else f"{record.reason}; {phase}: {result}"
