"""Mixed precision: the loss's math runs with autocast off, in float32 (float64 stays float64)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["autocast_off", "without_autocast"]

Function = TypeVar("Function", bound=Callable[..., Any])


def autocast_off(tensor: Tensor) -> torch.autocast:
    """A context that disables autocast on ``tensor``'s device."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def without_autocast(tensor_position: int = 0) -> Callable[[Function], Function]:
    """Decorate a function to run with autocast off on the device of its positional argument
    ``tensor_position`` (``1`` for an autograd ``forward``/``backward``, after ``ctx``)."""

    def decorate(function: Function) -> Function:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with autocast_off(args[tensor_position]):
                return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
