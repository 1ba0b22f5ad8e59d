"""Pseudo-labels from constructed teacher outputs: thresholds, overlaps, sizes, counts and quality."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reference_pipeline.data.structures import InstanceSample
from reference_pipeline.data.synthetic import THING_CLASSES, SyntheticConfig, synthetic_sample
from reference_pipeline.models.outputs import SegmentationOutput
from reference_pipeline.pseudo_labels import (
    PseudoLabelConfig,
    pseudo_label,
    pseudo_label_batch,
    pseudo_label_quality,
    resize_mask_logits,
    summarize_pseudo_labels,
)

torch.set_num_threads(1)

C = 3  # foreground classes; no-object is index C
IMAGE = (30, 30)  # stride-4 logits of 8 x 8 cover 32 x 32; the last row/column of cells is half padding
GRID = (8, 8)
BIG = 20.0


def _cells_to_image(cells: torch.Tensor) -> torch.Tensor:
    """Cell masks (..., 8, 8) as the (..., 30, 30) pixel masks they cover."""
    return cells.repeat_interleave(4, -2).repeat_interleave(4, -1)[..., : IMAGE[0], : IMAGE[1]]


def _class_logits(probabilities: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is exactly the given (K, C+1) probabilities."""
    return torch.tensor(probabilities).log()


def _scene() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Six queries, each exercising one rule; returns mask logits, class logits and the cell masks."""
    cells = torch.zeros(6, *GRID, dtype=torch.bool)
    cells[0, 0:4, 0:4] = True  # q0: class 1, score 0.9 -> kept whole
    cells[1, 4:8, 4:8] = True  # q1: no-object -> ignored
    cells[2, 4:8, 0:3] = True  # q2: best class 0.25 < 0.3 -> dropped
    cells[3, 2:4, 2:8] = True  # q3: class 2, score 0.8, overlaps q0 on 2 x 2 of 2 x 6 cells -> keeps 2 x 4
    cells[4, 0:4, 1:5] = True  # q4: class 0, score 0.6, 3/4 of it under q0 -> lost most of its area: dropped
    cells[5, 6, 6] = True  # q5: class 0, score 0.7, one interior cell (12 px once upsampled) -> below min_area 20
    mask_logits = torch.where(cells, BIG, -BIG)  # (K, h, w)
    class_logits = _class_logits(
        [
            [0.02, 0.9, 0.03, 0.05],
            [0.05, 0.05, 0.1, 0.8],
            [0.25, 0.25, 0.2, 0.3],
            [0.05, 0.05, 0.8, 0.1],
            [0.6, 0.1, 0.1, 0.2],
            [0.7, 0.1, 0.1, 0.1],
        ]
    )  # (K, C+1)
    return mask_logits, class_logits, cells


CONFIG = PseudoLabelConfig(min_area=20)


def test_pseudo_labels_of_a_constructed_output_are_the_expected_instances() -> None:
    mask_logits, class_logits, _ = _scene()
    result = pseudo_label(mask_logits, class_logits, IMAGE, CONFIG)
    assert result.query_indices.tolist() == [0, 3]  # by decreasing score
    assert result.targets().class_ids.tolist() == [1, 2]
    assert result.targets().class_ids.dtype == torch.int64
    assert result.scores.tolist() == pytest.approx([0.9, 0.8])
    binary = resize_mask_logits(mask_logits, IMAGE, stride=4) > 0  # (K, 30, 30) cell blocks, corners rounded
    expected = torch.stack([binary[0], binary[3] & ~binary[0]])  # (2, 30, 30) q3 loses the overlap to q0
    assert result.targets().masks.dtype == torch.bool
    assert torch.equal(result.targets().masks, expected)


def test_each_pixel_belongs_to_at_most_one_instance_the_highest_scoring() -> None:
    mask_logits, class_logits, _ = _scene()
    result = pseudo_label(mask_logits, class_logits, IMAGE, CONFIG)
    assert int(result.targets().masks.sum(0).max()) == 1
    binary = resize_mask_logits(mask_logits, IMAGE, stride=4) > 0  # (K, 30, 30)
    shared = binary[0] & binary[3]  # (30, 30) where q0 and q3 overlap
    assert int(shared.sum()) > 0
    assert bool(result.targets().masks[0][shared].all())  # the overlap went to q0 (0.9), not q3 (0.8)
    assert not bool(result.targets().masks[1][shared].any())


def test_score_threshold_applies_to_the_best_foreground_class() -> None:
    mask_logits, class_logits, _ = _scene()
    lenient = pseudo_label(mask_logits, class_logits, IMAGE, PseudoLabelConfig(score_threshold=0.2, min_area=20))
    assert 2 in lenient.query_indices.tolist()  # q2's best class (0.25) passes a 0.2 threshold
    assert 1 not in lenient.query_indices.tolist()  # q1's no-object probability is never a score


def test_min_area_counts_image_pixels() -> None:
    mask_logits, class_logits, _ = _scene()
    area = int((resize_mask_logits(mask_logits[5:6], IMAGE, stride=4) > 0).sum())  # one cell: 12 of 16 px
    assert area == 12  # bilinear upsampling rounds the block's four corners off
    allowed = pseudo_label(mask_logits, class_logits, IMAGE, PseudoLabelConfig(min_area=area))
    assert 5 in allowed.query_indices.tolist()
    assert int(allowed.targets().masks[allowed.query_indices.tolist().index(5)].sum()) == area
    too_small = pseudo_label(mask_logits, class_logits, IMAGE, PseudoLabelConfig(min_area=area + 1))
    assert 5 not in too_small.query_indices.tolist()


def test_visible_fraction_rule_decides_partially_covered_instances() -> None:
    mask_logits, class_logits, _ = _scene()
    keep_all = pseudo_label(mask_logits, class_logits, IMAGE, PseudoLabelConfig(min_area=20, min_visible_fraction=0.0))
    assert 4 in keep_all.query_indices.tolist()  # q4 keeps the quarter q0 did not take
    strict = pseudo_label(mask_logits, class_logits, IMAGE, PseudoLabelConfig(min_area=20, min_visible_fraction=0.7))
    assert strict.query_indices.tolist() == [0]  # q3 kept only 2/3 of its area


def test_max_instances_keeps_the_highest_scores() -> None:
    mask_logits, class_logits, _ = _scene()
    result = pseudo_label(mask_logits, class_logits, IMAGE, PseudoLabelConfig(min_area=20, max_instances=1))
    assert result.query_indices.tolist() == [0]


def test_mask_threshold_is_on_the_sigmoid() -> None:
    mask_logits = torch.full((1, *GRID), -BIG)
    mask_logits[0, 1:5, 1:5] = 0.5  # sigmoid 0.62
    class_logits = _class_logits([[0.9, 0.05, 0.03, 0.02]])
    assert pseudo_label(mask_logits, class_logits, IMAGE, PseudoLabelConfig(mask_threshold=0.5)).num_instances == 1
    assert pseudo_label(mask_logits, class_logits, IMAGE, PseudoLabelConfig(mask_threshold=0.7)).num_instances == 0


def test_no_confident_query_gives_an_empty_result_in_target_format() -> None:
    mask_logits, _, _ = _scene()
    class_logits = _class_logits([[0.05, 0.05, 0.05, 0.85]] * 6)
    result = pseudo_label(mask_logits, class_logits, IMAGE)
    assert result.num_instances == 0
    assert result.targets().masks.shape == (0, *IMAGE) and result.targets().masks.dtype == torch.bool
    assert result.targets().class_ids.shape == (0,) and result.targets().class_ids.dtype == torch.int64


def test_stride_4_logits_map_each_cell_to_its_own_pixels() -> None:
    cells = torch.zeros(1, *GRID, dtype=torch.bool)
    cells[0, :, 5:] = True  # a stripe (no corner to round off) into the padded last column
    logits = torch.where(cells, BIG, -BIG)
    assert torch.equal(resize_mask_logits(logits, IMAGE, stride=4) > 0, _cells_to_image(cells))
    stretched = resize_mask_logits(logits, IMAGE, stride=None) > 0  # 8 cells stretched over 30 px instead
    assert not torch.equal(stretched, _cells_to_image(cells))
    with pytest.raises(ValueError, match="stride 4"):
        resize_mask_logits(logits, (33, 30), stride=4)


def test_batch_uses_each_images_outputs_and_size() -> None:
    mask_logits, class_logits, _ = _scene()
    empty_classes = _class_logits([[0.05, 0.05, 0.05, 0.85]] * 6)
    output = SegmentationOutput(
        torch.stack([mask_logits, mask_logits]), torch.stack([class_logits, empty_classes]), torch.zeros(2, 4, *GRID)
    )
    results = pseudo_label_batch(output, [IMAGE, (32, 29)], CONFIG)
    assert [r.num_instances for r in results] == [2, 0]
    assert results[1].targets().masks.shape[1:] == (32, 29)
    with pytest.raises(ValueError, match="3 image sizes for a batch of 2"):
        pseudo_label_batch(output, [IMAGE] * 3)


def test_summary_counts_instances_and_empty_images() -> None:
    mask_logits, class_logits, _ = _scene()
    full = pseudo_label(mask_logits, class_logits, IMAGE, CONFIG)
    empty = pseudo_label(mask_logits, _class_logits([[0.05, 0.05, 0.05, 0.85]] * 6), IMAGE, CONFIG)
    summary = summarize_pseudo_labels([full, empty, full])
    assert summary == pytest.approx(
        {
            "images": 3,
            "instances": 4,
            "instances_mean": 4 / 3,
            "instances_min": 0,
            "instances_max": 2,
            "empty_images": 1,
            "score_mean": 0.85,
        }
    )
    assert math.isnan(summarize_pseudo_labels([empty])["score_mean"])
    with pytest.raises(ValueError):
        summarize_pseudo_labels([])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"score_threshold": 1.5},
        {"mask_threshold": 1.0},
        {"min_area": 0},
        {"max_instances": 0},
        {"min_visible_fraction": -0.1},
        {"mask_stride": 0},
    ],
)
def test_invalid_config_raises(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        PseudoLabelConfig(**kwargs)


def test_invalid_outputs_raise() -> None:
    mask_logits, class_logits, _ = _scene()
    with pytest.raises(ValueError, match="equal K"):
        pseudo_label(mask_logits[:5], class_logits, IMAGE)
    with pytest.raises(ValueError, match="finite"):
        pseudo_label(mask_logits.index_fill(0, torch.tensor([0]), math.nan), class_logits, IMAGE)


# --- quality against ground truth ---------------------------------------------------------------


@pytest.fixture(scope="module")
def samples() -> list[InstanceSample]:
    config = SyntheticConfig(image_size=(64, 64))
    return [synthetic_sample(config, "target_val", i) for i in range(3)]


def _teacher_that_knows_the_answer(sample: InstanceSample) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-resolution mask logits and confident class logits reproducing the ground truth."""
    masks = torch.from_numpy(sample.masks[~sample.is_crowd])  # (M, H, W)
    classes = torch.from_numpy(sample.class_ids[~sample.is_crowd])  # (M,)
    mask_logits = torch.where(masks, BIG, -BIG)  # (M, H, W)
    class_logits = torch.full((masks.shape[0], len(THING_CLASSES) + 1), -BIG)
    class_logits[torch.arange(masks.shape[0]), classes] = BIG
    return mask_logits, class_logits


def test_pseudo_labels_equal_to_ground_truth_have_ap_100(samples: list[InstanceSample]) -> None:
    config = PseudoLabelConfig(min_area=1, mask_stride=None)
    pseudo = [pseudo_label(*_teacher_that_knows_the_answer(s), (s.height, s.width), config) for s in samples]
    metrics = pseudo_label_quality(pseudo, samples, THING_CLASSES)
    assert metrics["AP"] == pytest.approx(100.0)
    assert metrics["AP50"] == pytest.approx(100.0)


def test_dropping_a_pseudo_instance_lowers_ap(samples: list[InstanceSample]) -> None:
    config = PseudoLabelConfig(min_area=1, mask_stride=None)
    pseudo = [pseudo_label(*_teacher_that_knows_the_answer(s), (s.height, s.width), config) for s in samples]
    first = pseudo[0]
    pseudo[0] = first.select(range(1, first.num_instances))
    metrics = pseudo_label_quality(pseudo, samples, THING_CLASSES)
    assert metrics["AP"] < 100.0 and metrics["AP50"] < 100.0


def test_quality_rejects_mismatched_lengths(samples: list[InstanceSample]) -> None:
    with pytest.raises(ValueError, match="2 pseudo-labels for 3 samples"):
        pseudo_label_quality(
            [pseudo_label(torch.zeros(1, 16, 16), torch.zeros(1, 7), (64, 64))] * 2, samples, THING_CLASSES
        )


def test_to_predictions_keeps_masks_classes_and_scores() -> None:
    mask_logits, class_logits, _ = _scene()
    result = pseudo_label(mask_logits, class_logits, IMAGE, CONFIG)
    predictions = result.to_predictions()
    assert np.array_equal(predictions.masks, result.targets().masks.numpy())
    assert predictions.class_ids.tolist() == [1, 2]
    assert predictions.scores.tolist() == pytest.approx([0.9, 0.8])
