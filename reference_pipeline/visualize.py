"""Instance-mask overlays and side-by-side PNG grids (ground truth, pseudo-labels, predictions).

Uses matplotlib's object-oriented Agg canvas directly (no ``pyplot`` and no global backend
switch), so it works headless and does not disturb other plotting code in the same process.

Example::

    rows = [[panel_from_sample(sample, "ground truth"),
             panel_from_predictions(sample.image, pseudo, "teacher pseudo-labels", 0.3),
             panel_from_predictions(sample.image, student, "student", 0.3)]]
    save_overlay_grid("overlays.png", rows, class_names=dataset.class_names)
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .atomic import atomic_path
from .data.structures import InstanceSample
from .evaluate import InstancePredictions

__all__ = [
    "OverlayPanel",
    "instance_colors",
    "overlay_instances",
    "panel_from_predictions",
    "panel_from_sample",
    "save_overlay_grid",
]


@dataclass
class OverlayPanel:
    """One cell of an overlay grid.

    Attributes:
        image: ``(H, W, 3)`` uint8.
        masks: ``(N, H, W)`` bool.
        class_ids: ``(N,)`` class indices, or ``None`` (no labels drawn).
        scores: ``(N,)`` confidences, or ``None``.
        title: caption above the panel.
    """

    image: np.ndarray
    masks: np.ndarray
    class_ids: np.ndarray | None = None
    scores: np.ndarray | None = None
    title: str = ""


def instance_colors(count: int) -> np.ndarray:
    """``count`` well-separated colours (golden-ratio hue steps), ``(count, 3)`` uint8."""
    colours = np.zeros((count, 3), dtype=np.uint8)
    for index in range(count):
        hue = (index * 0.618033988749895) % 1.0
        value = 0.95 if index % 2 == 0 else 0.75
        colours[index] = np.round(np.array(colorsys.hsv_to_rgb(hue, 0.85, value)) * 255).astype(np.uint8)
    return colours


def overlay_instances(
    image: np.ndarray,
    masks: np.ndarray,
    *,
    alpha: float = 0.5,
    colors: np.ndarray | None = None,
    draw_boundaries: bool = True,
) -> np.ndarray:
    """Blend one colour per instance over an image and outline each instance.

    Args:
        image: ``(H, W, 3)`` uint8.
        masks: ``(N, H, W)`` bool; later masks are drawn on top.
        alpha: opacity of the fill in ``[0, 1]``.
        colors: ``(N, 3)`` uint8 colours; default :func:`instance_colors`.
        draw_boundaries: draw each instance's 4-connected boundary in its colour at full opacity,
            which keeps touching same-class instances apart in the picture.

    Returns:
        ``(H, W, 3)`` uint8 overlay.

    Raises:
        ValueError: on inconsistent shapes or ``alpha`` outside ``[0, 1]``.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks must be (N, {image.shape[0]}, {image.shape[1]}), got shape {masks.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if colors is None:
        colors = instance_colors(masks.shape[0])
    if colors.shape != (masks.shape[0], 3):
        raise ValueError(f"colors must be ({masks.shape[0]}, 3), got {colors.shape}")
    out = image.astype(np.float32)  # (H, W, 3)
    masks = masks.astype(bool)
    for mask, colour in zip(masks, colors.astype(np.float32)):
        out[mask] = (1.0 - alpha) * out[mask] + alpha * colour
    if draw_boundaries:
        for mask, colour in zip(masks, colors.astype(np.float32)):
            padded = np.pad(mask, 1)
            interior = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
            out[mask & ~interior] = colour
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def panel_from_sample(sample: InstanceSample, title: str = "ground truth") -> OverlayPanel:
    """A panel showing a sample's annotated instances (crowd regions included)."""
    return OverlayPanel(sample.image, sample.masks, sample.class_ids, None, title)


def panel_from_predictions(
    image: np.ndarray,
    predictions: InstancePredictions,
    title: str = "prediction",
    score_threshold: float = 0.0,
) -> OverlayPanel:
    """A panel showing predictions with ``score >= score_threshold`` (lowest score drawn first)."""
    keep = np.flatnonzero(predictions.scores >= score_threshold)
    keep = keep[np.argsort(predictions.scores[keep], kind="stable")]
    return OverlayPanel(image, predictions.masks[keep], predictions.class_ids[keep], predictions.scores[keep], title)


def save_overlay_grid(
    path: str | os.PathLike[str],
    rows: Sequence[Sequence[OverlayPanel]],
    *,
    class_names: Sequence[str] | None = None,
    panel_inches: float = 3.0,
    dpi: int = 100,
    alpha: float = 0.5,
    label_instances: bool = True,
) -> Path:
    """Save a grid of overlay panels as a PNG (atomically: temporary file, then rename).

    Args:
        path: destination ``.png``; parent folders are created.
        rows: panels row by row (rows may have different lengths).
        class_names: names used for instance labels; class indices are shown without them.
        panel_inches: size of one panel.
        dpi: resolution.
        alpha: fill opacity.
        label_instances: write class (and score) at each instance's centroid.

    Returns:
        The written path.

    Raises:
        ValueError: if ``rows`` is empty or a panel is malformed.
    """
    if not rows or not any(rows):
        raise ValueError("rows must contain at least one panel")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    num_rows, num_cols = len(rows), max(len(row) for row in rows)
    figure = Figure(figsize=(panel_inches * num_cols, panel_inches * num_rows), dpi=dpi)
    FigureCanvasAgg(figure)
    for r, row in enumerate(rows):
        for c in range(num_cols):
            axis = figure.add_subplot(num_rows, num_cols, r * num_cols + c + 1)
            axis.set_axis_off()
            if c >= len(row):
                continue
            panel = row[c]
            axis.imshow(overlay_instances(panel.image, panel.masks, alpha=alpha), interpolation="nearest")
            axis.set_title(
                f"{panel.title} ({panel.masks.shape[0]})" if panel.title else f"{panel.masks.shape[0]} instances",
                fontsize=8,
            )
            if label_instances and panel.class_ids is not None:
                colours = instance_colors(panel.masks.shape[0])
                for index, mask in enumerate(panel.masks):
                    ys, xs = np.nonzero(mask)
                    if ys.size == 0:
                        continue
                    class_id = int(panel.class_ids[index])
                    name = (
                        class_names[class_id]
                        if class_names is not None and 0 <= class_id < len(class_names)
                        else str(class_id)
                    )
                    if panel.scores is not None:
                        name = f"{name} {float(panel.scores[index]):.2f}"
                    axis.text(
                        float(xs.mean()),
                        float(ys.mean()),
                        name,
                        fontsize=5,
                        color="white",
                        ha="center",
                        va="center",
                        bbox={"facecolor": tuple(colours[index] / 255.0), "alpha": 0.7, "pad": 0.5, "linewidth": 0},
                    )
    figure.tight_layout()
    with atomic_path(path, suffix=".tmp.png") as tmp:
        figure.savefig(tmp, format="png")
    return path
