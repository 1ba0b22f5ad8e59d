"""Overlays and PNG grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reference_pipeline.data.synthetic import THING_CLASSES, SyntheticConfig, synthetic_sample
from reference_pipeline.evaluate import InstancePredictions
from reference_pipeline.visualize import (
    OverlayPanel,
    instance_colors,
    overlay_instances,
    panel_from_predictions,
    panel_from_sample,
    save_overlay_grid,
)


def test_overlay_blends_fill_and_draws_boundaries() -> None:
    image = np.full((10, 10, 3), 100, np.uint8)
    masks = np.zeros((2, 10, 10), bool)
    masks[0, 2:7, 2:7] = True
    masks[1, 2:7, 7:9] = True  # touches instance 0
    colours = np.array([[255, 0, 0], [0, 0, 255]], np.uint8)
    out = overlay_instances(image, masks, alpha=0.5, colors=colours)
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out[0, 0], [100, 100, 100])  # outside: unchanged
    np.testing.assert_array_equal(out[4, 4], [178, 50, 50])  # interior: 50 % blend
    np.testing.assert_array_equal(out[2, 4], [255, 0, 0])  # boundary: full colour
    np.testing.assert_array_equal(out[4, 6], [255, 0, 0])  # boundary towards the touching neighbour
    np.testing.assert_array_equal(out[4, 7], [0, 0, 255])
    no_edges = overlay_instances(image, masks, alpha=0.5, colors=colours, draw_boundaries=False)
    np.testing.assert_array_equal(no_edges[2, 4], [178, 50, 50])


def test_overlay_validation() -> None:
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="masks"):
        overlay_instances(image, np.zeros((1, 5, 4), bool))
    with pytest.raises(ValueError, match="alpha"):
        overlay_instances(image, np.zeros((1, 4, 4), bool), alpha=1.5)
    with pytest.raises(ValueError, match="colors"):
        overlay_instances(image, np.zeros((2, 4, 4), bool), colors=np.zeros((1, 3), np.uint8))


def test_instance_colors_are_distinct() -> None:
    colours = instance_colors(12)
    assert colours.shape == (12, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours}) == 12


def test_save_overlay_grid_writes_a_png(tmp_path: Path) -> None:
    config = SyntheticConfig(image_size=(64, 64))
    rows = []
    for index in range(2):
        sample = synthetic_sample(config, "target_val", index)
        truth = InstancePredictions.from_sample(sample)
        noisy = InstancePredictions(truth.masks, truth.class_ids, np.linspace(0.2, 0.9, len(truth.scores)))
        rows.append(
            [
                panel_from_sample(sample),
                panel_from_predictions(sample.image, noisy, "teacher pseudo-labels", score_threshold=0.3),
                panel_from_predictions(sample.image, noisy, "student"),
            ]
        )
    rows.append([OverlayPanel(rows[0][0].image, np.zeros((0, 64, 64), bool), title="empty")])  # shorter row
    path = save_overlay_grid(
        tmp_path / "figs" / "overlay.png", rows, class_names=THING_CLASSES, panel_inches=2.0, dpi=50
    )
    assert path.is_file() and not list(path.parent.glob(".*tmp*"))
    with Image.open(path) as handle:
        assert handle.format == "PNG"
        assert handle.size == (3 * 2 * 50, 3 * 2 * 50)
        pixels = np.asarray(handle.convert("RGB"))
    assert pixels.std() > 10  # not a blank canvas
    thresholded = panel_from_predictions(rows[0][0].image, noisy, score_threshold=0.5)
    assert thresholded.masks.shape[0] == int((noisy.scores >= 0.5).sum())
    assert np.all(np.diff(thresholded.scores) >= 0)  # lowest score drawn first, best on top


def test_save_overlay_grid_rejects_empty_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one panel"):
        save_overlay_grid(tmp_path / "x.png", [])
