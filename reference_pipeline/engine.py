"""One explicit training loop used by every stage (nanoGPT style): read it top to bottom in :func:`train`.

What a stage provides is a model, a *step function* computing the loss of one batch, a dataset
and a :class:`~reference_pipeline.config.TrainConfig`::

    def step_fn(model, batch):                   # model is DDP-wrapped under torchrun
        out = model(batch.images)
        loss, terms = criterion(out, batch)      # terms: {"sup": 0.71, "pxl": 0.12, "fnr": 0.03}
        return loss, terms

    result = train(model, step_fn, dataset, cfg, run_dir, collate_fn=collate,
                   param_groups={"encoder": enc_params, "decoder": dec_params},
                   evaluate_fn=lambda m: evaluate(m, val_set), extra_state={"bank": bank},
                   resume=True, desc="distill")

The loop: AdamW with parameter groups (``"encoder"`` at ``lr_encoder``, every other group at
``lr_decoder``), a PolyLR / multi-step schedule with optional warmup, gradient clipping by global
norm, optional autocast (bf16 on CPU or GPU; fp16 with gradient scaling on GPU), a
:class:`~torch.utils.data.DataLoader` with workers fed by :class:`ResumableBatchSampler`, a tqdm
bar with the loss terms, it/s and ETA, metrics appended to ``run_dir/metrics.jsonl`` (and
TensorBoard when installed), ``evaluate_fn`` every ``eval_every`` steps and at the end, and
atomic checkpoints (:mod:`reference_pipeline.checkpoint`) every ``checkpoint_every`` steps and at
the end.

**Exact resume.** The data order is a function of ``(seed, step)`` only: step ``t`` reads batch
``t mod S`` of epoch ``t // S`` (``S`` full batches per epoch, the last incomplete batch dropped)
of a permutation seeded by ``(seed, epoch)``. A checkpoint stores the step, optimizer, scheduler,
gradient scaler, the RNG states of every rank, the extra state and the partial logging window, so
``train(..., resume=True)`` after a kill continues bit for bit: the final weights and metrics equal
those of an uninterrupted run (on CPU; on GPU up to non-deterministic kernels). Per-sample
randomness must come from the sample's key, not from worker RNGs: a dataset that defines
``get_item(index, epoch)`` (:class:`EpochAwareDataset`) gets the epoch, e.g. to build
``TwoViewTransform.rng_for(seed, epoch, index)``. Evaluation runs with the RNG states saved and
restored, so evaluating does not change training. A run whose final checkpoint exists returns
immediately (weights loaded) when called again with ``resume=True``.

**Distributed.** Launched with ``torchrun --nproc_per_node=N -m reference_pipeline ...``,
:func:`train` initialises the process group (:func:`init_distributed`: ``nccl`` on GPU, ``gloo``
on CPU) from ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``, wraps the model in
:class:`~torch.nn.parallel.DistributedDataParallel` and gives each rank a contiguous slice of the
same global batch (``batch_size`` is global and must divide by the world size). Logged metrics
are averaged over ranks; only rank 0 writes logs, checkpoints and the progress bar; evaluation runs
on rank 0 while the others wait. Multi-node runs are torchrun's job (``--nnodes``, ``--node_rank``,
``--rdzv_endpoint``); nothing here changes. Call :func:`cleanup_distributed` at the very end.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import ChainedScheduler, ConstantLR, LinearLR, LRScheduler, MultiStepLR, PolynomialLR
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from tqdm.auto import tqdm

from .atomic import atomic_write_text
from .checkpoint import (
    CheckpointError,
    CheckpointInfo,
    CheckpointMismatchError,
    capture_rng_state,
    check_writable,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .config import TrainConfig, config_to_dict

__all__ = [
    "TIMING_KEYS",
    "DistInfo",
    "EpochAwareDataset",
    "EvaluateFn",
    "ResumableBatchSampler",
    "Stateful",
    "StepFn",
    "TrainResult",
    "barrier",
    "build_optimizer",
    "build_scheduler",
    "cleanup_distributed",
    "distributed_info",
    "exit_process",
    "freeze_unused_parameters",
    "init_distributed",
    "move_to_device",
    "read_metrics",
    "resolve_device",
    "train",
]

logger = logging.getLogger(__name__)

#: ``step_fn(model, batch) -> (loss, terms)``: the scalar loss to minimise and floats to log.
StepFn = Callable[[nn.Module, Any], tuple[Tensor, Mapping[str, "float | Tensor"]]]
#: ``evaluate_fn(model) -> metrics``: called on the unwrapped model in eval mode under ``no_grad``.
EvaluateFn = Callable[[nn.Module], Mapping[str, float]]

#: Metric keys that measure time; they differ between otherwise identical runs.
TIMING_KEYS: tuple[str, ...] = ("data_time", "step_time", "data_share", "eval_time")

METRICS_NAME = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"

# Config fields that may change between a run and its resumption (they do not alter the trajectory).
_RESUMABLE_CHANGES = {
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "num_workers",
    "device",
    "ddp_find_unused_parameters",
}


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict`` / ``load_state_dict`` (a memory bank, an EMA, a custom RNG)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


@runtime_checkable
class EpochAwareDataset(Protocol):
    """A dataset that wants the epoch with each index (for per-sample RNG independent of workers)."""

    def __len__(self) -> int: ...

    def get_item(self, index: int, epoch: int) -> Any:
        """Return sample ``index`` as drawn in ``epoch`` (e.g. with ``rng_for(seed, epoch, index)``)."""
        ...


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly one-process) run.

    Attributes:
        rank: global rank.
        local_rank: rank on this node (the GPU index).
        world_size: number of processes.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that writes logs and checkpoints)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1


def distributed_info() -> DistInfo:
    """The current process group's ranks, or a single process when none is initialized."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_world_size())
    return DistInfo()


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Initialise ``torch.distributed`` from torchrun's environment (a no-op for one process).

    Reads ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (set by ``torchrun``; ``MASTER_ADDR`` /
    ``MASTER_PORT`` too). Idempotent: an initialized group is reused.

    Args:
        backend: ``"nccl"`` / ``"gloo"``; default ``nccl`` when CUDA is available, else ``gloo``.
        timeout_s: collective timeout (evaluation on rank 0 must finish within it).

    Returns:
        This process's :class:`DistInfo`.

    Raises:
        ValueError: if ``WORLD_SIZE`` > 1 but ``RANK`` is missing or the ranks are inconsistent.
    """
    if dist.is_available() and dist.is_initialized():
        return distributed_info()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if "RANK" not in os.environ:
        raise ValueError(f"WORLD_SIZE={world} but RANK is not set; launch with torchrun")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, local_rank, world)


def cleanup_distributed() -> None:
    """Destroy the process group if one is initialized.

    No barrier here (it also runs on error paths, where a peer may be gone): after a successful run,
    meet at ``dist.barrier()`` first, so that no rank tears its group down while another still
    communicates. To end a torchrun worker after that, see :func:`exit_process`.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int = 0) -> None:
    """End a torchrun worker now: flush output, then ``os._exit`` (no interpreter finalization).

    A gloo process group that a :class:`~torch.nn.parallel.DistributedDataParallel` wrapper used
    stays alive after :func:`cleanup_distributed` (torch's reducer keeps a reference; its two
    ``pt_gloo_runloop`` threads and the ``gloo_tcp_loop`` thread keep running). A normal interpreter
    exit then tears down Python and C++ static state while those threads live, which now and then —
    more often under load — ends in ``terminate called without an active exception`` (SIGABRT) after
    the work is done. Call :func:`cleanup_distributed` first; files must be closed by then.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)


def barrier(info: DistInfo) -> None:
    """Wait for every rank (nothing to do in a single process)."""
    if info.distributed:
        dist.barrier()


def _raise_everywhere(info: DistInfo, error: BaseException | None) -> None:
    """Re-raise on every rank an error that happened on rank 0 (so no rank hangs in a collective)."""
    if not info.distributed:
        if error is not None:
            raise error
        return
    message = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise RuntimeError(f"rank 0 failed: {message[0]}")


# ----------------------------------------------------------------------------- data order


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, index)`` keys for steps ``start_step .. end_step - 1``, a function of the seed.

    Step ``t`` reads batch ``b = t mod S`` of epoch ``e = t // S`` (``S = num_items // batch_size``
    full batches per epoch; the incomplete last batch is dropped so every step has the same global
    batch). Epoch ``e`` is the permutation ``numpy.random.default_rng([seed, e]).permutation(n)``;
    rank ``r`` of ``W`` takes the ``r``-th contiguous slice of ``batch_size / W`` keys of each
    global batch. Starting at ``start_step`` skips exactly the consumed part.

    Args:
        num_items: dataset length.
        batch_size: global batch size.
        seed: data-order seed.
        start_step: first step to yield.
        end_step: one past the last step.
        rank: this process's rank.
        world_size: number of processes (must divide ``batch_size``).

    Raises:
        ValueError: if the dataset is smaller than one batch, sizes do not divide, or steps are out of order.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        start_step: int,
        end_step: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or world_size < 1 or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a positive multiple of the world size {world_size}")
        if num_items < batch_size:
            raise ValueError(f"the dataset has {num_items} item(s), fewer than one batch of {batch_size}")
        if not 0 <= start_step <= end_step:
            raise ValueError(f"need 0 <= start_step <= end_step, got {start_step} and {end_step}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start_step, self.end_step = start_step, end_step
        self.rank, self.world_size = rank, world_size

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per epoch."""
        return self.num_items // self.batch_size

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, batch index within the epoch)`` read at ``step``."""
        return divmod(step, self.steps_per_epoch)

    def permutation(self, epoch: int) -> np.ndarray:
        """The item order of ``epoch``."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def __len__(self) -> int:
        return self.end_step - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        local = self.batch_size // self.world_size
        cached_epoch, order = -1, np.empty(0, dtype=np.int64)
        for step in range(self.start_step, self.end_step):
            epoch, batch = self.position(step)
            if epoch != cached_epoch:
                cached_epoch, order = epoch, self.permutation(epoch)
            first = batch * self.batch_size + self.rank * local
            yield [(epoch, int(i)) for i in order[first : first + local]]


def _fetch(dataset: Any, index: int, epoch: int) -> Any:
    getter = getattr(dataset, "get_item", None)
    return getter(index, epoch) if callable(getter) else dataset[index]


class _KeyedDataset(Dataset):
    """Reads ``(epoch, index)`` keys: ``get_item(index, epoch)`` when defined, else ``dataset[index]``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        return _fetch(self.dataset, index, epoch)


# ----------------------------------------------------------------------------- optimisation


def build_optimizer(
    model: nn.Module,
    config: TrainConfig,
    param_groups: Mapping[str, Sequence[nn.Parameter]] | None = None,
) -> AdamW:
    """AdamW over named parameter groups: ``"encoder"`` at ``lr_encoder``, any other name at ``lr_decoder``.

    Args:
        model: the model (parameters not in ``model`` are rejected).
        config: learning rates, weight decay and betas.
        param_groups: ``{name: parameters}``; ``None`` puts every trainable parameter in one group
            ``"all"`` at ``lr_decoder``. Frozen parameters (``requires_grad=False``) are skipped, and a
            group whose parameters are all frozen (a teacher's backbones) is left out.

    Returns:
        The optimizer; each group keeps its ``"name"``.

    Raises:
        ValueError: on a group given no parameters at all, a model with no trainable parameter, a
            parameter in two groups or a parameter that is not the model's.
    """
    owned = {id(p): name for name, p in model.named_parameters()}
    if param_groups is None:
        param_groups = {"all": list(model.parameters())}
    seen: dict[int, str] = {}
    groups = []
    for name, params in param_groups.items():
        params = list(params)
        if not params:
            raise ValueError(f"parameter group {name!r} is empty (it was given no parameters)")
        trainable = [p for p in params if p.requires_grad]
        if not trainable:
            logger.info("parameter group %r is frozen (%d parameter tensors): not optimized", name, len(params))
            continue
        for p in trainable:
            if id(p) not in owned:
                raise ValueError(f"parameter group {name!r} holds a parameter that is not in the model")
            if id(p) in seen:
                raise ValueError(f"parameter {owned[id(p)]!r} is in both groups {seen[id(p)]!r} and {name!r}")
            seen[id(p)] = name
        lr = config.lr_encoder if name == "encoder" else config.lr_decoder
        groups.append({"params": trainable, "lr": lr, "name": name})
    if not groups:
        raise ValueError(f"nothing to train: every parameter of {type(model).__name__} is frozen")
    left_out = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if left_out:
        logger.warning(
            "%d trainable parameter(s) are in no group and will not be updated, e.g. %s", len(left_out), left_out[:3]
        )
    return AdamW(groups, lr=config.lr_decoder, betas=config.betas, weight_decay=config.weight_decay)


def freeze_unused_parameters(
    model: nn.Module,
    step_fn: StepFn,
    batch: Any,
    *,
    extra_state: Mapping[str, Stateful] | None = None,
    amp: str = "none",
    device: torch.device | None = None,
) -> list[str]:
    """Freeze the trainable parameters that one step of ``step_fn`` gives no gradient; return their names.

    A stage may legitimately leave parameters without a gradient: a projection head when
    ``λ_pxl = 0``, DINOv2's ``mask_token`` (used only by masked-image pretraining), the residual
    convolution of DPT's first fusion layer, a box head whose boxes are detached. AdamW never updates
    a parameter without a gradient, so freezing them changes nothing in the training; it keeps them
    out of the optimizer and out of :class:`~torch.nn.parallel.DistributedDataParallel`, which would
    otherwise wait for their gradients (or pay ``find_unused_parameters`` on every step).

    One probing forward/backward pass on ``batch`` finds them, with every side effect undone: the RNG
    states, the model's buffers (batch-norm statistics) and ``extra_state`` (a memory bank) are restored
    and the gradients dropped. Under ``torch.distributed`` every rank probes its own batch and a
    parameter is frozen only when no rank gave it a gradient, so all ranks freeze the same set.

    Args:
        model: the (unwrapped) model, on its training device.
        step_fn: the stage's ``(model, batch) -> (loss, terms)``.
        batch: one batch on the model's device.
        extra_state: state that ``step_fn`` may change (restored afterwards).
        amp: the autocast mode of the training steps.
        device: the training device (default: the device of the first parameter).

    Returns:
        Names of the parameters now frozen (``requires_grad=False``).
    """
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    if not trainable:
        return []
    device = device if device is not None else trainable[0][1].device
    rng = capture_rng_state()
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    saved_extra = {name: _clone_state(obj.state_dict()) for name, obj in (extra_state or {}).items()}
    previous_grads = [param.grad for _, param in trainable]
    was_training = model.training
    model.train()
    try:
        for _, param in trainable:
            param.grad = None
        with _autocast(amp, device):
            loss, _terms = step_fn(model, batch)
        loss.backward()
        used = torch.tensor([param.grad is not None for _, param in trainable], dtype=torch.float32, device=device)
    finally:
        for (_, param), grad in zip(trainable, previous_grads):
            param.grad = grad
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
        for name, obj in (extra_state or {}).items():
            obj.load_state_dict(saved_extra[name])
        restore_rng_state(rng)
        model.train(was_training)
    info = distributed_info()
    if info.distributed:
        dist.all_reduce(used, op=dist.ReduceOp.MAX)  # used on some rank = kept
    unused = [name for (name, param), flag in zip(trainable, used.tolist()) if not flag]
    for (name, param), flag in zip(trainable, used.tolist()):
        if not flag:
            param.requires_grad_(False)
    return unused


def _clone_state(state: Any) -> Any:
    if isinstance(state, Tensor):
        return state.detach().clone()
    if isinstance(state, Mapping):
        return {key: _clone_state(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_clone_state(value) for value in state)
    return state


def build_scheduler(optimizer: Optimizer, config: TrainConfig) -> LRScheduler:
    r"""The learning-rate schedule of ``config``, stepped once per optimizer step.

    ``"poly"``: :class:`~torch.optim.lr_scheduler.PolynomialLR`, :math:`(1 - t/T)^{p}`;
    ``"multistep"``: :class:`~torch.optim.lr_scheduler.MultiStepLR` with milestones
    ``round(m * steps)``; ``"constant"``: no decay. With ``warmup_steps > 0`` a
    :class:`~torch.optim.lr_scheduler.LinearLR` warmup from ``warmup_factor`` multiplies the decay
    (:class:`~torch.optim.lr_scheduler.ChainedScheduler`).

    Args:
        optimizer: the optimizer.
        config: schedule settings.

    Returns:
        The scheduler.
    """
    if config.scheduler == "poly":
        main: LRScheduler = PolynomialLR(optimizer, total_iters=config.steps, power=config.poly_power)
    elif config.scheduler == "multistep":
        milestones = sorted({max(1, round(m * config.steps)) for m in config.milestones})
        main = MultiStepLR(optimizer, milestones=milestones, gamma=config.gamma)
    else:
        main = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if config.warmup_steps == 0:
        return main
    warmup = LinearLR(optimizer, start_factor=config.warmup_factor, end_factor=1.0, total_iters=config.warmup_steps)
    return ChainedScheduler([warmup, main], optimizer=optimizer)


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a batch (nested lists, tuples, dicts, dataclasses) to ``device``.

    Args:
        batch: the collated batch.
        device: target device.

    Returns:
        The same structure with tensors on ``device`` (non-blocking from pinned memory).
    """
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    if is_dataclass(batch) and not isinstance(batch, type):
        return replace(
            batch, **{f.name: move_to_device(getattr(batch, f.name), device) for f in fields(batch) if f.init}
        )
    return batch


def resolve_device(name: str, info: DistInfo) -> torch.device:
    """The device a config's ``device`` names (``auto``: this rank's GPU when there is one, else the CPU)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available; use 'auto' or 'cpu'")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", info.local_rank)


def _autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------- logging


class _Window:
    """Running sums of the logged values since the last log step (saved in checkpoints).

    A NaN value (e.g. a diagnostic that is undefined on one step) is left out of its key's mean
    instead of turning the whole window's mean into NaN; a key that was NaN on every step logs NaN.
    """

    def __init__(self) -> None:
        self.count = 0
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.times = {"data_time": 0.0, "step_time": 0.0}

    def add(self, values: Mapping[str, float], data_time: float, step_time: float) -> None:
        if self.count and set(values) != set(self.sums):
            raise ValueError(f"step_fn returned terms {sorted(values)} but earlier steps returned {sorted(self.sums)}")
        for key, value in values.items():
            finite = not math.isnan(value)
            self.sums[key] = self.sums.get(key, 0.0) + (value if finite else 0.0)
            self.counts[key] = self.counts.get(key, 0) + int(finite)
        self.count += 1
        self.times["data_time"] += data_time
        self.times["step_time"] += step_time

    def means(self) -> dict[str, float]:
        return {k: v / self.counts[k] if self.counts.get(k) else math.nan for k, v in self.sums.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "sums": dict(self.sums), "counts": dict(self.counts), "times": dict(self.times)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.count, self.sums, self.times = int(state["count"]), dict(state["sums"]), dict(state["times"])
        self.counts = dict(state.get("counts", {k: self.count for k in self.sums}))


def _reduce_mean(values: dict[str, float], info: DistInfo, device: torch.device) -> dict[str, float]:
    if not info.distributed or not values:
        return values
    keys = sorted(values)
    stacked = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)  # (n,)
    dist.all_reduce(stacked)
    return dict(zip(keys, (stacked / info.world_size).tolist()))


class _MetricsLog:
    """Appends JSON records to ``metrics.jsonl`` (and TensorBoard when installed); rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int) -> None:
        self.enabled = enabled
        self.path = run_dir / METRICS_NAME
        self.writer = None
        if not enabled:
            return
        _truncate_metrics(self.path, resume_step)
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            prefix = record["kind"]
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (an unparsable last line, cut by a kill, is skipped).

    Args:
        path: the file (may not exist).

    Returns:
        One dict per record, in order.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("skipping an unparsable line of %s (a run killed mid-write)", path)
    return records


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only records up to ``step`` (those a killed run wrote after its checkpoint are redone)."""
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if int(r.get("step", 0)) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        step: the last completed step (``config.steps``).
        train_metrics: the last logged training record (window means, learning rates, timings).
        eval_metrics: the last evaluation (``{}`` without ``evaluate_fn``, and on ranks other than 0).
        checkpoint: the final checkpoint folder.
        resumed_from: the step resumed from, or ``None`` for a fresh start.
        already_finished: the run was complete before this call (nothing was trained).
        data_time_share: data time / (data + step time) over the steps of this call (NaN if none).
        wall_time: seconds spent in this call.
    """

    step: int
    train_metrics: dict[str, Any]
    eval_metrics: dict[str, Any]
    checkpoint: Path
    resumed_from: int | None = None
    already_finished: bool = False
    data_time_share: float = math.nan
    wall_time: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _check_resumable(saved: Mapping[str, Any], config: TrainConfig, num_items: int, info: CheckpointInfo) -> None:
    current = config_to_dict(config)
    changed = sorted(k for k in current if k not in _RESUMABLE_CHANGES and saved["config"].get(k) != current[k])
    if changed:
        detail = ", ".join(f"{k}: {saved['config'].get(k)!r} -> {current[k]!r}" for k in changed)
        raise CheckpointMismatchError(
            f"cannot resume from {info.directory}: the training config changed ({detail}); "
            "use a new run directory or restore these values"
        )
    if int(saved["data"]["num_items"]) != num_items:
        raise CheckpointMismatchError(
            f"cannot resume from {info.directory}: it was trained on {saved['data']['num_items']} items, "
            f"the dataset now has {num_items}"
        )


def _finite_loss(loss: Any, step: int, terms: Mapping[str, float]) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(f"step_fn must return (scalar loss tensor, terms), got loss {type(loss).__name__}")
    if not torch.isfinite(loss.detach()).all():
        raise FloatingPointError(f"the loss is {loss.item()} at step {step} (terms: {dict(terms)})")
    return loss.reshape(())


def train(
    model: nn.Module,
    step_fn: StepFn,
    dataset: Any,
    config: TrainConfig,
    run_dir: str | os.PathLike[str],
    *,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    param_groups: Mapping[str, Sequence[nn.Parameter]] | None = None,
    evaluate_fn: EvaluateFn | None = None,
    extra_state: Mapping[str, Stateful] | None = None,
    resume: bool = False,
    desc: str = "train",
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` for ``config.steps`` optimizer steps (the one loop of every stage).

    Each step: fetch a batch (data time), move it to the device, ``loss, terms = step_fn(model,
    batch)`` under autocast, backward (scaled for fp16), clip the global gradient norm, AdamW step,
    scheduler step (step time). Every ``log_every`` steps the window means of ``loss``, the terms,
    ``grad_norm``, the learning rate of each group and the timings go to ``metrics.jsonl`` as
    ``{"kind": "train", "step": ..., ...}``; evaluations as ``{"kind": "eval", ...}``.

    Args:
        model: the model; moved to the device, wrapped in DDP under torchrun.
        step_fn: ``(model, batch) -> (loss, terms)``; ``terms`` maps names to floats (or 0-d
            tensors) and must have the same keys every step.
        dataset: map-style dataset (``len`` and ``[i]``), or an :class:`EpochAwareDataset`.
        config: the training settings.
        run_dir: folder for ``metrics.jsonl``, ``checkpoints/`` and ``tensorboard/``.
        collate_fn: batches a list of samples (default :func:`torch.utils.data.default_collate`).
        param_groups: ``{name: parameters}`` (``"encoder"`` gets ``lr_encoder``, others ``lr_decoder``);
            ``None`` trains all parameters at ``lr_decoder``.
        evaluate_fn: ``model -> metrics``, run every ``eval_every`` steps and at the end on rank 0.
        extra_state: objects with ``state_dict`` / ``load_state_dict`` saved in checkpoints (a memory
            bank that is not a submodule of ``model``, for instance).
        resume: continue from the latest checkpoint in ``run_dir`` (a fresh start when there is none).
        desc: name of the stage on the progress bar.
        progress: show the progress bar (rank 0 only).

    Returns:
        The :class:`TrainResult`.

    Raises:
        FileExistsError: if ``run_dir`` holds checkpoints and ``resume`` is false (nothing is overwritten).
        ValueError: on a dataset smaller than one batch, a batch size not divisible by the world
            size, or fp16 without CUDA.
        CheckpointError: if ``run_dir`` is not writable or a checkpoint belongs to another model or config.
        FloatingPointError: if the loss becomes NaN or infinite.
    """
    started = time.perf_counter()
    info = init_distributed()
    device = resolve_device(config.device, info)
    if config.amp == "fp16" and device.type != "cuda":
        raise ValueError("amp='fp16' needs a CUDA device (gradient scaling); use amp='bf16' on CPU")
    if config.batch_size % info.world_size:
        raise ValueError(f"batch_size {config.batch_size} must divide by the world size {info.world_size}")
    num_items = len(dataset)
    if num_items < config.batch_size:
        raise ValueError(f"the dataset has {num_items} item(s), fewer than one batch of {config.batch_size}")
    run_dir = Path(run_dir)
    checkpoint_dir = run_dir / CHECKPOINT_DIR
    error = None
    if info.is_main:
        try:
            check_writable(run_dir)
        except CheckpointError as caught:
            error = caught
    _raise_everywhere(info, error)

    # ---- model, optimizer, schedule
    _seed_everything(config.seed + info.rank)
    model.to(device)
    optimizer = build_optimizer(model, config, param_groups)
    scheduler = build_scheduler(optimizer, config)
    scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" else None
    extra_state = dict(extra_state or {})
    window = _Window()
    last_train: dict[str, Any] = {}
    last_eval: dict[str, Any] = {}

    # ---- resume
    start_step, resumed_from = 0, None
    existing = latest_checkpoint(checkpoint_dir)
    if existing is not None and not resume:
        raise FileExistsError(
            f"{run_dir} already holds checkpoint {existing.directory}; pass resume=True (--resume) to continue "
            "it, or use another run directory (nothing was overwritten)"
        )
    loaded = load_checkpoint(checkpoint_dir, model, map_location="cpu") if resume and existing else None
    if loaded is not None:
        checkpoint, state = loaded
        _check_resumable(state, config, num_items, checkpoint)
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state["scaler"]:
                scaler.load_state_dict(state["scaler"])
            for name, obj in extra_state.items():
                obj.load_state_dict(state["extra"][name])
        except (KeyError, ValueError, RuntimeError) as caught:
            raise CheckpointMismatchError(
                f"checkpoint {checkpoint.state} does not fit this optimizer / extra state: {caught}"
            ) from caught
        rng_states = state["rng"]
        if len(rng_states) == info.world_size:
            restore_rng_state(rng_states[info.rank])
        else:
            logger.warning(
                "checkpoint was written by %d process(es), this run has %d: RNG states reseeded",
                len(rng_states),
                info.world_size,
            )
        window.load_state_dict(state["log_window"])
        last_train, last_eval = dict(state["last_train"]), dict(state["last_eval"])
        start_step = resumed_from = int(state["step"])
        if info.is_main:
            logger.info("%s: resumed from %s (step %d)", desc, checkpoint.directory, start_step)
        if start_step >= config.steps:
            return TrainResult(
                start_step,
                last_train,
                last_eval if info.is_main else {},
                checkpoint.directory,
                resumed_from,
                already_finished=True,
                wall_time=time.perf_counter() - started,
            )

    # ---- data: a deterministic order that skips what was consumed
    sampler = ResumableBatchSampler(
        num_items, config.batch_size, config.seed, start_step, config.steps, info.rank, info.world_size
    )
    loader = DataLoader(
        _KeyedDataset(dataset),
        batch_sampler=sampler,
        collate_fn=collate_fn or default_collate,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(config.seed),  # worker seeds do not consume the model RNG
    )
    train_model: nn.Module = model
    frozen: list[str] = []
    if info.distributed and not config.ddp_find_unused_parameters:
        # parameters this stage never gives a gradient stay out of DDP (frozen for this call, restored at the end);
        # they stay in the optimizer, which skips them, so its layout does not depend on the world size
        first_keys = next(iter(ResumableBatchSampler(num_items, config.batch_size, config.seed, start_step,
                                                     start_step + 1, info.rank, info.world_size)))
        first_batch = (collate_fn or default_collate)([_KeyedDataset(dataset)[key] for key in first_keys])
        frozen = freeze_unused_parameters(model, step_fn, move_to_device(first_batch, device),
                                          extra_state=extra_state, amp=config.amp, device=device)
        del first_batch
        if frozen and info.is_main:
            shown = ", ".join(frozen[:12]) + (f", … ({len(frozen) - 12} more)" if len(frozen) > 12 else "")
            logger.info("%s: %d parameter tensor(s) get no gradient in this stage and are left out of DDP: %s",
                        desc, len(frozen), shown)
    if info.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.ddp_find_unused_parameters,
        )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    log = _MetricsLog(run_dir, info.is_main, start_step)
    bar = tqdm(
        total=config.steps,
        initial=start_step,
        desc=desc,
        disable=not (progress and info.is_main),
        dynamic_ncols=True,
        unit="it",
    )
    call_times = {"data_time": 0.0, "step_time": 0.0}
    history: list[dict[str, Any]] = []
    final: Path | None = None

    train_model.train()
    batches = iter(loader)
    try:
        for step in range(start_step + 1, config.steps + 1):  # step = optimizer steps done after this one
            t_fetch = time.perf_counter()
            batch = move_to_device(next(batches), device)
            t_compute = time.perf_counter()

            with _autocast(config.amp, device):
                loss, terms = step_fn(train_model, batch)
            terms = {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in terms.items()}
            loss = _finite_loss(loss, step, terms)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            values = {"loss": float(loss.detach()), **terms}
            lrs = {f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups}  # the rates this step uses
            if config.grad_clip is not None:
                values["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t_done = time.perf_counter()
            window.add(values, t_compute - t_fetch, t_done - t_compute)
            call_times["data_time"] += t_compute - t_fetch
            call_times["step_time"] += t_done - t_compute
            bar.update(1)

            # ---- log the window means
            if step % config.log_every == 0 or step == config.steps:
                means = _reduce_mean(window.means(), info, device)
                times = {k: v / max(window.count, 1) for k, v in window.times.items()}
                epoch = sampler.position(step - 1)[0]  # the epoch of the batch just used
                share = times["data_time"] / max(times["data_time"] + times["step_time"], 1e-12)
                last_train = {
                    "kind": "train",
                    "step": step,
                    "epoch": epoch,
                    **means,
                    **lrs,
                    **times,
                    "data_share": share,
                }
                log.write(last_train)
                history.append(last_train)
                bar.set_postfix({k: f"{v:.4g}" for k, v in means.items() if "/" not in k}, refresh=False)  # sub-terms: jsonl
                window = _Window()

            # ---- evaluate (rank 0; RNG states saved and restored so training is unaffected)
            if evaluate_fn is not None and (
                (config.eval_every and step % config.eval_every == 0) or step == config.steps
            ):
                if info.is_main:
                    last_eval = _evaluate(model, evaluate_fn, step)
                    log.write(last_eval)
                    history.append(last_eval)
                barrier(info)
                train_model.train()

            # ---- checkpoint
            if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == config.steps:
                state = {
                    "step": step,
                    "finished": step == config.steps,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else {},
                    "rng": _gather_rng_states(info),
                    "data": {
                        "seed": config.seed,
                        "batch_size": config.batch_size,
                        "num_items": num_items,
                        "world_size": info.world_size,
                        "next_epoch": sampler.position(step)[0],
                        "next_batch_in_epoch": sampler.position(step)[1],
                    },
                    "extra": {name: obj.state_dict() for name, obj in extra_state.items()},
                    "log_window": window.state_dict(),
                    "last_train": last_train,
                    "last_eval": last_eval,
                    "config": config_to_dict(config),
                }
                error = None
                if info.is_main:
                    try:
                        final = save_checkpoint(checkpoint_dir, step, model, state, config.keep_checkpoints).directory
                    except (CheckpointError, TypeError) as caught:
                        error = caught
                _raise_everywhere(info, error)
    finally:
        bar.close()
        log.close()
        del batches  # stop the workers
        owned = dict(model.named_parameters())
        for name in frozen:
            owned[name].requires_grad_(True)

    total = call_times["data_time"] + call_times["step_time"]
    return TrainResult(
        step=config.steps,
        train_metrics=last_train,
        eval_metrics=last_eval if info.is_main else {},
        checkpoint=final if final is not None else checkpoint_dir / f"step_{config.steps:08d}",
        resumed_from=resumed_from,
        data_time_share=call_times["data_time"] / total if total > 0 else math.nan,
        wall_time=time.perf_counter() - started,
        history=history,
    )


def _evaluate(model: nn.Module, evaluate_fn: EvaluateFn, step: int) -> dict[str, Any]:
    rng = capture_rng_state()
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        with torch.no_grad():
            metrics = {k: float(v) for k, v in evaluate_fn(model).items()}
    finally:
        restore_rng_state(rng)
        model.train(was_training)
    return {"kind": "eval", "step": step, **metrics, "eval_time": time.perf_counter() - started}


def _gather_rng_states(info: DistInfo) -> list[dict[str, Any]]:
    state = capture_rng_state()
    if not info.distributed:
        return [state]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, state)
    return gathered
