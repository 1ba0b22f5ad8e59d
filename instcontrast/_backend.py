"""Backend selection for the sampled log-sum-exp, decided once at construction.

``"reference"``
    :mod:`instcontrast.ops.reference`; materializes the gathered negatives. Obviously correct.
``"chunked"``
    :mod:`instcontrast.ops.chunked`; memory-bounded, recomputes in backward. Any device.
``"triton"``
    :mod:`instcontrast.ops.triton`; fused GPU kernel. Needs Triton and CUDA tensors (or
    ``TRITON_INTERPRET=1``, which runs the kernels on CPU tensors for testing).
``"auto"``
    Triton for CUDA tensors when Triton is importable, ``chunked`` otherwise. Never raises.

The environment variable ``INSTCONTRAST_BACKEND`` overrides the requested name.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from .ops.chunked import sampled_logsumexp_chunked
from .ops.reference import sampled_logsumexp_reference

__all__ = ["BACKENDS", "Backend", "resolve_backend", "triton_is_available", "triton_interpret_enabled"]

BACKENDS = ("auto", "reference", "chunked", "triton")
ENV_VARIABLE = "INSTCONTRAST_BACKEND"
TRITON_INSTALL_HINT = "pip install 'instcontrast[triton]'"

LogSumExpOp = Callable[[Tensor, Tensor, Tensor, float], Tensor]


def triton_is_available() -> bool:
    """Whether the ``triton`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpret_enabled() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set, so Triton kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
        # auto
        if self.use_triton_on_cuda and tensor.is_cuda:
            return _triton_op()
        return sampled_logsumexp_chunked


def _triton_op() -> LogSumExpOp:
    from .ops.triton import sampled_logsumexp_triton

    return sampled_logsumexp_triton


def resolve_backend(requested: str = "auto") -> Backend:
    """Resolve a backend name once; an explicit request that cannot be met raises.

    Args:
        requested: one of ``"auto"``, ``"reference"``, ``"chunked"``, ``"triton"``. The
            environment variable ``INSTCONTRAST_BACKEND``, when set, takes precedence.

    Returns:
        The resolved :class:`Backend`.

    Raises:
        ValueError: for an unknown name.
        ImportError: for ``"triton"`` when Triton cannot be imported, with the install hint.
    """
    override = os.environ.get(ENV_VARIABLE, "").strip()
    name = override or requested
    if name not in BACKENDS:
        source = f"environment variable {ENV_VARIABLE}" if override else "backend"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    if name == "triton" and not triton_is_available():
        raise ImportError(f"backend='triton' needs the triton package: {TRITON_INSTALL_HINT}")
    if name == "auto":
        return Backend(requested=name, name="auto", use_triton_on_cuda=triton_is_available())
    return Backend(requested=name, name=name, use_triton_on_cuda=name == "triton")
