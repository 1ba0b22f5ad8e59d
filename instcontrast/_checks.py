"""Shape, dtype and value validation with messages that name the argument and the expected shape."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_choice",
    "check_embeddings",
    "check_finite",
    "check_instance_ids",
    "check_positive",
    "check_predictions",
    "check_valid_mask",
    "extract_predictions",
]


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_positive(name: str, value: float, *, integer: bool = False) -> None:
    """Raise unless ``value`` is a finite positive number (an ``int`` when ``integer``)."""
    if integer:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < float(value) < float("inf")):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")


def _check_tensor(name: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_finite(name: str, value: Tensor) -> None:
    """Raise ``ValueError`` if a floating tensor holds NaN or Inf.

    A NaN or Inf anywhere makes the sum non-finite, so one reduction clears the usual case; only a
    non-finite sum (a bad entry, or finite entries whose sum overflows) runs the entry-wise test.
    """
    if not value.is_floating_point() or value.numel() == 0:
        return
    value = value.detach()
    if bool(torch.isfinite(value.sum())):
        return
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or Inf; the contrastive loss needs finite inputs")


def check_embeddings(z_weak: Any, z_strong: Any) -> tuple[int, int, int, int]:
    """Validate the two embedding maps; return ``(B, D, h, w)``."""
    z_weak = _check_tensor("z_weak", z_weak)
    z_strong = _check_tensor("z_strong", z_strong)
    for name, value in (("z_weak", z_weak), ("z_strong", z_strong)):
        if value.ndim != 4:
            raise ValueError(f"{name} must have shape (B, D, h, w), got {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {value.dtype}")
    if z_weak.shape != z_strong.shape:
        raise ValueError(
            f"z_weak and z_strong must have the same shape (B, D, h, w), got {tuple(z_weak.shape)} "
            f"and {tuple(z_strong.shape)}; align the strong view first (instcontrast.views.align_views)"
        )
    if z_weak.device != z_strong.device:
        raise ValueError(f"z_weak is on {z_weak.device} but z_strong is on {z_strong.device}")
    batch, dim, height, width = z_weak.shape
    if min(batch, dim, height, width) == 0:
        raise ValueError(f"z_weak must have non-zero sizes (B, D, h, w), got {tuple(z_weak.shape)}")
    return batch, dim, height, width


def check_predictions(mask_logits: Any, class_logits: Any, batch: int | None = None) -> tuple[int, int, int]:
    """Validate mask logits ``(B, K, H, W)`` and class logits ``(B, K, C+1)``; return ``(B, K, C+1)``."""
    mask_logits = _check_tensor("mask_logits", mask_logits)
    class_logits = _check_tensor("class_logits", class_logits)
    if mask_logits.ndim != 4:
        raise ValueError(f"mask_logits must have shape (B, K, H, W), got {tuple(mask_logits.shape)}")
    if class_logits.ndim != 3:
        raise ValueError(f"class_logits must have shape (B, K, C+1), got {tuple(class_logits.shape)}")
    for name, value in (("mask_logits", mask_logits), ("class_logits", class_logits)):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {value.dtype}")
    if mask_logits.shape[:2] != class_logits.shape[:2]:
        raise ValueError(
            f"mask_logits (B, K, H, W) = {tuple(mask_logits.shape)} and class_logits (B, K, C+1) = "
            f"{tuple(class_logits.shape)} disagree on B or K"
        )
    if class_logits.shape[2] < 2:
        raise ValueError(
            f"class_logits must have C+1 >= 2 columns (C foreground classes plus the no-object class, "
            f"last), got shape {tuple(class_logits.shape)}; append the no-object logit column"
        )
    if mask_logits.shape[1] == 0 or mask_logits.shape[2] == 0 or mask_logits.shape[3] == 0:
        raise ValueError(f"mask_logits must have non-zero K, H, W, got {tuple(mask_logits.shape)}")
    if batch is not None and mask_logits.shape[0] != batch:
        raise ValueError(f"mask_logits batch size {mask_logits.shape[0]} does not match embeddings' batch size {batch}")
    return class_logits.shape[0], class_logits.shape[1], class_logits.shape[2]


def check_valid_mask(valid: Any, batch: int, height: int, width: int, device: torch.device) -> Tensor:
    """Return ``valid`` as a ``(B, h, w)`` bool tensor on ``device`` (all ``True`` when ``None``)."""
    if valid is None:
        return torch.ones(batch, height, width, dtype=torch.bool, device=device)
    valid = _check_tensor("valid", valid)
    if tuple(valid.shape) != (batch, height, width):
        raise ValueError(f"valid must have shape (B, h, w) = {(batch, height, width)}, got {tuple(valid.shape)}")
    if valid.dtype != torch.bool:
        if valid.is_floating_point() or valid.is_complex():
            raise TypeError(f"valid must be a bool (or integer 0/1) tensor, got dtype {valid.dtype}")
        valid = valid != 0
    return valid.to(device)


def check_instance_ids(instance_ids: Any, batch: int) -> Tensor:
    """Validate a ground-truth instance map ``(B, H, W)`` of integers."""
    instance_ids = _check_tensor("instance_ids", instance_ids)
    if instance_ids.ndim != 3 or instance_ids.shape[0] != batch:
        raise ValueError(f"instance_ids must have shape (B, H, W) with B = {batch}, got {tuple(instance_ids.shape)}")
    if instance_ids.is_floating_point() or instance_ids.dtype == torch.bool:
        raise TypeError(f"instance_ids must be an integer tensor, got dtype {instance_ids.dtype}")
    return instance_ids


def extract_predictions(predictions: Any, class_logits: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Accept raw tensors, a Mask2Former/detectron2 output dict, or a ``transformers`` output.

    Args:
        predictions: mask logits ``(B, K, H, W)``; or a mapping with ``pred_masks`` and
            ``pred_logits``; or an object with ``masks_queries_logits`` and ``class_queries_logits``
            (``transformers.Mask2FormerForUniversalSegmentation`` outputs); or ``None``.
        class_logits: class logits when ``predictions`` is a tensor; must be ``None`` otherwise.

    Returns:
        ``(mask_logits, class_logits)``.
    """
    if predictions is None or isinstance(predictions, Tensor):
        return predictions, class_logits
    if class_logits is not None:
        raise ValueError("pass class_logits only with raw mask_logits, not with a model output dict/object")
    if isinstance(predictions, Mapping):
        if "pred_masks" in predictions and "pred_logits" in predictions:
            return predictions["pred_masks"], predictions["pred_logits"]
        if "masks_queries_logits" in predictions and "class_queries_logits" in predictions:
            return predictions["masks_queries_logits"], predictions["class_queries_logits"]
        raise ValueError(
            f"a prediction mapping needs keys 'pred_masks' and 'pred_logits', got keys {sorted(predictions)}"
        )
    masks = getattr(predictions, "masks_queries_logits", None)
    classes = getattr(predictions, "class_queries_logits", None)
    if isinstance(masks, Tensor) and isinstance(classes, Tensor):
        return masks, classes
    raise TypeError(
        "mask_logits must be a tensor (B, K, H, W), a dict with 'pred_masks'/'pred_logits', or an object "
        f"with 'masks_queries_logits'/'class_queries_logits'; got {type(predictions).__name__}"
    )
