r"""Alignment of weak / strong views onto one grid.

A view is described by the crop it took from the original image and whether it was flipped
horizontally afterwards. Boxes are ``(x0, y0, x1, y1)`` in *normalized original-image
coordinates* (``[0, 1]``; the whole image is ``(0, 0, 1, 1)``), so they do not depend on the
resolution of the image, of the view, or of the feature map.

A pixel centre at normalized view coordinate :math:`u \in [0, 1]` maps to the original image as

.. math::
    x = x_0 + (1 - u \text{ if flipped else } u)\,(x_1 - x_0),

and the inverse maps an original-image point into another view. :func:`align_views` resamples a
source view's feature map at the points seen by each pixel of a target view, and marks target
pixels whose scene point lies outside the source crop as invalid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ViewGeometry", "align_views", "image_to_view", "view_to_image"]


@dataclass(frozen=True)
class ViewGeometry:
    """Where a view came from in the original image.

    Attributes:
        boxes: crop boxes ``(x0, y0, x1, y1)`` in normalized original-image coordinates, ``(B, 4)``.
        flips: whether each view was flipped horizontally after cropping, ``(B,)`` bool.
    """

    boxes: Tensor
    flips: Tensor

    def __post_init__(self) -> None:
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4:
            raise ValueError(f"ViewGeometry.boxes must have shape (B, 4), got {tuple(self.boxes.shape)}")
        if self.flips.shape != self.boxes.shape[:1]:
            raise ValueError(
                f"ViewGeometry.flips must have shape ({self.boxes.shape[0]},), got {tuple(self.flips.shape)}"
            )
        widths = self.boxes[:, 2] - self.boxes[:, 0]
        heights = self.boxes[:, 3] - self.boxes[:, 1]
        if bool((widths <= 0).any()) or bool((heights <= 0).any()):
            raise ValueError("ViewGeometry.boxes must satisfy x1 > x0 and y1 > y0 for every view")

    @staticmethod
    def identity(batch_size: int, device: torch.device | str | None = None) -> ViewGeometry:
        """The whole image, not flipped, for ``batch_size`` views."""
        boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=device).repeat(batch_size, 1)
        return ViewGeometry(boxes, torch.zeros(batch_size, dtype=torch.bool, device=device))


def view_to_image(u: Tensor, v: Tensor, geometry: ViewGeometry) -> tuple[Tensor, Tensor]:
    """Map normalized view coordinates ``(u, v)`` (``(B, ...)``) to original-image coordinates."""
    boxes = geometry.boxes.to(u.dtype)
    extra = (1,) * (u.ndim - 1)
    x0, y0, x1, y1 = (boxes[:, i].view(-1, *extra) for i in range(4))
    flips = geometry.flips.view(-1, *extra)
    u = torch.where(flips, 1.0 - u, u)
    return x0 + u * (x1 - x0), y0 + v * (y1 - y0)


def image_to_view(x: Tensor, y: Tensor, geometry: ViewGeometry) -> tuple[Tensor, Tensor]:
    """Map original-image coordinates ``(x, y)`` (``(B, ...)``) to normalized view coordinates."""
    boxes = geometry.boxes.to(x.dtype)
    extra = (1,) * (x.ndim - 1)
    x0, y0, x1, y1 = (boxes[:, i].view(-1, *extra) for i in range(4))
    flips = geometry.flips.view(-1, *extra)
    u = (x - x0) / (x1 - x0)
    v = (y - y0) / (y1 - y0)
    return torch.where(flips, 1.0 - u, u), v


def align_views(
    source_features: Tensor,
    source: ViewGeometry,
    target: ViewGeometry,
    output_size: tuple[int, int] | None = None,
    mode: str = "bilinear",
) -> tuple[Tensor, Tensor]:
    """Resample ``source_features`` onto the pixel grid of the ``target`` view.

    Typical use: ``source`` is the strong view, ``target`` the weak view, so that position ``p`` of
    the result and of the weak features show the same scene point (the positive pair).

    Args:
        source_features: feature map of the source view.
        source: geometry of the source view.
        target: geometry of the target view.
        output_size: ``(h, w)`` of the target grid; defaults to the source map's size.
        mode: ``"bilinear"`` or ``"nearest"`` (passed to :func:`torch.nn.functional.grid_sample`).

    Shape:
        - source_features: :math:`(B, D, h_s, w_s)`
        - output: aligned :math:`(B, D, h, w)` and valid :math:`(B, h, w)` bool

    Returns:
        The aligned features and a mask that is ``True`` where the target pixel's scene point lies
        inside the source crop. Invalid pixels hold border-clamped values and must be masked out.

    Raises:
        ValueError: on a batch size mismatch or an unknown mode.
    """
    if source_features.ndim != 4:
        raise ValueError(f"source_features must be (B, D, h, w), got shape {tuple(source_features.shape)}")
    batch = source_features.shape[0]
    if source.boxes.shape[0] != batch or target.boxes.shape[0] != batch:
        raise ValueError(
            f"geometry batch sizes ({source.boxes.shape[0]}, {target.boxes.shape[0]}) must equal "
            f"source_features batch size {batch}"
        )
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    height, width = output_size if output_size is not None else source_features.shape[-2:]
    device = source_features.device
    work_dtype = torch.float64 if source_features.dtype == torch.float64 else torch.float32
    v_grid = (torch.arange(height, device=device, dtype=work_dtype) + 0.5) / height  # (h,)
    u_grid = (torch.arange(width, device=device, dtype=work_dtype) + 0.5) / width  # (w,)
    v = v_grid.view(1, height, 1).expand(batch, height, width)  # (B, h, w)
    u = u_grid.view(1, 1, width).expand(batch, height, width)  # (B, h, w)
    source_moved = ViewGeometry(source.boxes.to(device), source.flips.to(device))
    target_moved = ViewGeometry(target.boxes.to(device), target.flips.to(device))
    x, y = view_to_image(u, v, target_moved)
    u_source, v_source = image_to_view(x, y, source_moved)  # (B, h, w) each
    eps = 1e-6
    valid = (u_source >= -eps) & (u_source <= 1 + eps) & (v_source >= -eps) & (v_source <= 1 + eps)
    grid = torch.stack([2 * u_source - 1, 2 * v_source - 1], dim=-1)  # (B, h, w, 2)
    aligned = F.grid_sample(
        source_features,
        grid.to(source_features.dtype),
        mode=mode,
        padding_mode="border",
        align_corners=False,
    )  # (B, D, h, w)
    return aligned, valid
