"""Backend selection for the sampled log-sum-exp, decided once at construction.

``"reference"``
    :mod:`instcontrast.ops.reference`; materializes the gathered negatives. Obviously correct.
``"chunked"``
    :mod:`instcontrast.ops.chunked`; memory-bounded, recomputes in backward. Any device.
``"triton"``
    :mod:`instcontrast.ops.triton`; fused GPU kernel. Needs Triton and CUDA tensors (or
    ``TRITON_INTERPRET=1``, which runs the kernels on CPU tensors for testing).
``"auto"``
    Triton for CUDA tensors when CUDA is present and the kernels import (checked once, here), and
    deterministic algorithms are off; ``chunked`` otherwise. Never raises.

The environment variable ``INSTCONTRAST_BACKEND`` chooses the backend where the code does not
(``backend=None``, the default); an explicit ``backend=`` argument wins over it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._extras import TRITON_INSTALL_HINT
from .ops.chunked import sampled_logsumexp_chunked
from .ops.reference import sampled_logsumexp_reference

__all__ = ["BACKENDS", "Backend", "resolve_backend", "triton_interpret_enabled", "triton_is_available"]

BACKENDS = ("auto", "reference", "chunked", "triton")
ENV_VARIABLE = "INSTCONTRAST_BACKEND"

LogSumExpOp = Callable[[Tensor, Tensor, Tensor, float], Tensor]


def triton_is_available() -> bool:
    """Whether the ``triton`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpret_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` is on (``1``/``true``/``on``/``yes``, as Triton reads it), so
    Triton kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _triton_kernels_import() -> bool:
    """Whether the Triton kernel module imports (a broken Triton install makes this ``False``)."""
    try:
        from .ops import triton as _  # noqa: F401
    except Exception:  # any import failure means: not usable
        return False
    return True


@dataclass(frozen=True)
class Backend:
    """A resolved backend.

    Attributes:
        requested: the name asked for (after the environment override).
        name: what runs: ``"reference"``, ``"chunked"``, ``"triton"``, or ``"auto"`` (Triton on
            CUDA tensors, ``chunked`` elsewhere).
        use_triton_on_cuda: whether CUDA inputs go to the Triton kernel.
    """

    requested: str
    name: str
    use_triton_on_cuda: bool

    def op_for(self, tensor: Tensor) -> LogSumExpOp:
        """The log-sum-exp implementation for inputs living where ``tensor`` lives."""
        if self.name == "reference":
            return sampled_logsumexp_reference
        if self.name == "chunked":
            return sampled_logsumexp_chunked
        if self.name == "triton":
            if not tensor.is_cuda and not triton_interpret_enabled():
                raise ValueError(
                    f"backend='triton' needs CUDA tensors, got a tensor on {tensor.device}; use "
                    "backend='auto' or 'chunked' on CPU (or set TRITON_INTERPRET=1 to run the kernel "
                    "in the Triton interpreter for testing)"
                )
            return _triton_op()
        # auto: Triton's atomic pool-gradient is not deterministic, so deterministic mode keeps chunked
        if self.use_triton_on_cuda and tensor.is_cuda and not torch.are_deterministic_algorithms_enabled():
            return _triton_op()
        return sampled_logsumexp_chunked


    def uses_blocks(self, tensor: Tensor) -> bool:
        """Whether inputs living where ``tensor`` lives run the ``chunked`` path, which can use the
        sampler's candidate blocks (:func:`~instcontrast.ops.chunked.sampled_logsumexp_blocked`)."""
        return self.op_for(tensor) is sampled_logsumexp_chunked


def _triton_op() -> LogSumExpOp:
    from .ops.triton import sampled_logsumexp_triton

    return sampled_logsumexp_triton


def resolve_backend(requested: str | None = None) -> Backend:
    """Resolve a backend name once; an explicit request that cannot be met raises.

    Args:
        requested: one of ``"auto"``, ``"reference"``, ``"chunked"``, ``"triton"``, or ``None``: the
            environment variable ``INSTCONTRAST_BACKEND`` when set, else ``"auto"``. An explicit name
            wins over the environment variable.

    Returns:
        The resolved :class:`Backend`.

    Raises:
        ValueError: for an unknown name.
        ImportError: for ``"triton"`` when Triton cannot be imported, with the install hint.
        ValueError: for ``"triton"`` without a CUDA device (unless ``TRITON_INTERPRET`` is on).
    """
    override = os.environ.get(ENV_VARIABLE, "").strip() if requested is None else ""
    name = requested if requested is not None else (override or "auto")
    if name not in BACKENDS:
        source = f"environment variable {ENV_VARIABLE}" if override else "backend"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    if name == "triton" and not triton_is_available():
        raise ImportError(f"backend='triton' needs the triton package: {TRITON_INSTALL_HINT}")
    if name == "triton" and not torch.cuda.is_available() and not triton_interpret_enabled():
        raise ValueError(
            "backend='triton' needs a CUDA device and none is available; use backend='auto' (which picks "
            "'chunked' on CPU), or set TRITON_INTERPRET=1 to run the kernels in the Triton interpreter for testing"
        )
    if name == "auto":
        usable = triton_is_available() and torch.cuda.is_available() and _triton_kernels_import()
        return Backend(requested=name, name="auto", use_triton_on_cuda=usable)
    return Backend(requested=name, name=name, use_triton_on_cuda=name == "triton")
