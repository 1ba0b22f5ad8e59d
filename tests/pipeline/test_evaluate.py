"""COCO mask AP: perfect / wrong-class predictions and agreement with a direct COCOeval run."""

from __future__ import annotations

import contextlib
import io
import logging
import math

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from reference_pipeline.data.structures import InstanceSample
from reference_pipeline.data.synthetic import THING_CLASSES, SyntheticConfig, synthetic_sample
from reference_pipeline.evaluate import (
    METRIC_NAMES,
    CocoMaskEvaluator,
    InstancePredictions,
    coco_from_samples,
    evaluate_coco_masks,
    postprocess_mask2former,
)

C = len(THING_CLASSES)


@pytest.fixture(scope="module")
def samples() -> list[InstanceSample]:
    config = SyntheticConfig(image_size=(64, 64))
    return [synthetic_sample(config, "target_val", i) for i in range(4)]


def test_perfect_predictions_give_100(samples: list[InstanceSample]) -> None:
    predictions = {s.image_id: InstancePredictions.from_sample(s) for s in samples}
    metrics = evaluate_coco_masks(samples, predictions, THING_CLASSES, per_class=True)
    assert set(METRIC_NAMES) <= set(metrics)
    assert metrics["AP"] == pytest.approx(100.0)
    assert metrics["AP50"] == pytest.approx(100.0) and metrics["AP75"] == pytest.approx(100.0)
    for name in ("APs", "APm", "APl"):
        assert math.isnan(metrics[name]) or metrics[name] == pytest.approx(100.0)
    present = {THING_CLASSES[int(c)] for s in samples for c in s.class_ids}
    for name in present:
        assert metrics[f"AP-{name}"] == pytest.approx(100.0)


def test_wrong_classes_give_0(samples: list[InstanceSample]) -> None:
    predictions = {}
    for s in samples:
        perfect = InstancePredictions.from_sample(s)
        predictions[s.image_id] = InstancePredictions(perfect.masks, (perfect.class_ids + 1) % C, perfect.scores)
    metrics = evaluate_coco_masks(samples, predictions, THING_CLASSES)
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0


def test_no_predictions_give_0(samples: list[InstanceSample]) -> None:
    assert evaluate_coco_masks(samples, {}, THING_CLASSES)["AP"] == 0.0


def _box(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_hand_built_case_matches_cocoeval_run_directly() -> None:
    h, w = 40, 50
    image = np.zeros((h, w, 3), np.uint8)
    gt_a = np.stack([_box(h, w, 0, 10, 0, 10), _box(h, w, 0, 10, 10, 22), _box(h, w, 20, 40, 0, 30)])
    gt_b = np.stack([_box(h, w, 5, 25, 5, 45), _box(h, w, 30, 38, 30, 48)])
    samples = [
        InstanceSample(image, gt_a, np.array([0, 0, 1]), np.zeros(3, bool), 1, "a.png"),
        InstanceSample(image, gt_b, np.array([1, 0]), np.array([False, False]), 2, "b.png"),
    ]
    pred_a = InstancePredictions(
        masks=np.stack(
            [
                _box(h, w, 0, 10, 0, 12),  # IoU 10/12 with gt 0 (touching neighbour bleeds in)
                _box(h, w, 0, 10, 8, 22),  # IoU 120/140 with gt 1
                _box(h, w, 22, 40, 0, 30),  # IoU 0.9 with gt 2
                _box(h, w, 25, 35, 35, 45),  # false positive
            ]
        ),
        class_ids=np.array([0, 0, 1, 0]),
        scores=np.array([0.9, 0.6, 0.8, 0.7]),
    )
    pred_b = InstancePredictions(
        masks=np.stack([_box(h, w, 5, 25, 5, 30), _box(h, w, 30, 38, 30, 48)]),  # IoU 0.625, 1.0
        class_ids=np.array([1, 1]),  # second one has the wrong class
        scores=np.array([0.95, 0.5]),
    )
    ours = evaluate_coco_masks(samples, {1: pred_a, 2: pred_b}, ["a", "b"])

    # Independent path: JSON-style GT, COCO.loadRes, COCOeval.
    gt_dict = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    for sample in samples:
        gt_dict["images"].append({"id": sample.image_id, "height": h, "width": w, "file_name": sample.file_name})
        for mask, cls in zip(sample.masks, sample.class_ids):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            gt_dict["annotations"].append(
                {
                    "id": len(gt_dict["annotations"]) + 1,
                    "image_id": sample.image_id,
                    "category_id": int(cls) + 1,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                    "area": float(mask.sum()),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    results = []
    for image_id, pred in ((1, pred_a), (2, pred_b)):
        for mask, cls, score in zip(pred.masks, pred.class_ids, pred.scores):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(cls) + 1,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                    "score": float(score),
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()
        dt = gt.loadRes(results)
        reference = COCOeval(gt, dt, iouType="segm")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    for name, value in zip(METRIC_NAMES, reference.stats[:6]):
        if value < 0:
            assert math.isnan(ours[name])
        else:
            assert ours[name] == pytest.approx(100.0 * value, abs=1e-9)
    assert 0.0 < ours["AP"] < 100.0 and 0.0 < ours["AP50"] < 100.0


def test_crowd_regions_are_ignored() -> None:
    h, w = 20, 20
    masks = np.stack([_box(h, w, 0, 8, 0, 8), _box(h, w, 10, 20, 10, 20)])
    sample = InstanceSample(np.zeros((h, w, 3), np.uint8), masks, np.array([0, 0]), np.array([False, True]), 3, "c.png")
    prediction = InstancePredictions(masks, np.array([0, 0]), np.array([0.9, 0.8]))  # one hits the crowd
    assert evaluate_coco_masks([sample], {3: prediction}, ["x"])["AP"] == pytest.approx(100.0)
    only_crowd = InstanceSample(sample.image, masks[1:], np.array([0]), np.array([True]), 3, "c.png")
    with pytest.raises(ValueError, match="no non-crowd"):
        evaluate_coco_masks([only_crowd], {}, ["x"])


def test_postprocess_mask2former_hand_case() -> None:
    mask_logits = torch.full((2, 4, 4), -5.0)
    mask_logits[0, :2, :2] = torch.tensor([[4.0, 2.0], [1.0, 3.0]])
    mask_logits[1, 2:, :] = 6.0
    class_logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, -1.0]])  # C = 2 + no-object
    out = postprocess_mask2former(mask_logits, class_logits, (4, 4), top_k=3)
    probs = class_logits.softmax(-1)[:, :2]
    pairs = sorted(((probs[q, c].item(), q, c) for q in range(2) for c in range(2)), reverse=True)[:3]
    assert out.masks.shape == (3, 4, 4) and out.scores.shape == (3,)
    for slot, (prob, query, cls) in enumerate(pairs):
        binary = mask_logits[query] > 0
        mask_score = (mask_logits[query].sigmoid() * binary).sum() / (binary.sum() + 1e-6)
        assert out.class_ids[slot] == cls
        np.testing.assert_array_equal(out.masks[slot], binary.numpy())
        assert out.scores[slot] == pytest.approx(prob * mask_score.item(), rel=1e-5)


def test_postprocess_resizes_to_the_original_image_size() -> None:
    mask_logits = torch.full((1, 8, 8), -4.0)
    mask_logits[0, :, :4] = 4.0  # left half
    out = postprocess_mask2former(mask_logits, torch.tensor([[3.0, -3.0]]), (32, 48))
    assert out.masks.shape == (1, 32, 48)
    assert out.masks[0, :, :23].all() and not out.masks[0, :, 25:].any()
    with pytest.raises(ValueError, match="equal K"):
        postprocess_mask2former(torch.zeros(2, 4, 4), torch.zeros(3, 3), (4, 4))
    with pytest.raises(ValueError, match="finite"):
        postprocess_mask2former(torch.full((1, 4, 4), float("nan")), torch.zeros(1, 3), (4, 4))


def test_streaming_evaluator_with_model_outputs(samples: list[InstanceSample]) -> None:
    evaluator = CocoMaskEvaluator(THING_CLASSES)
    for sample in samples:
        k = sample.num_instances + 3  # a few extra queries predict "no object"
        mask_logits = torch.full((k, sample.height, sample.width), -8.0)
        mask_logits[: sample.num_instances] = torch.where(torch.from_numpy(sample.masks), 8.0, -8.0)
        class_logits = torch.zeros(k, C + 1)
        class_logits[:, C] = 10.0
        for q, cls in enumerate(sample.class_ids):
            class_logits[q] = 0.0
            class_logits[q, int(cls)] = 10.0
        evaluator.add_model_output(sample, mask_logits, class_logits)
    assert len(evaluator) == len(samples)
    assert evaluator.compute()["AP"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="added twice"):
        evaluator.add(samples[0], InstancePredictions.from_sample(samples[0]))
    evaluator.reset()
    with pytest.raises(ValueError, match="no images"):
        evaluator.compute()


def test_input_errors(samples: list[InstanceSample], caplog: pytest.LogCaptureFixture) -> None:
    good = InstancePredictions.from_sample(samples[0])
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_coco_masks(samples, {123: good}, THING_CLASSES)
    small = InstancePredictions(good.masks[:, :32, :32], good.class_ids, good.scores)
    with pytest.raises(ValueError, match="size"):
        evaluate_coco_masks(samples, {samples[0].image_id: small}, THING_CLASSES)
    with pytest.raises(ValueError, match="class_names"):
        evaluate_coco_masks(samples, {})
    with pytest.raises(ValueError, match="finite"):
        InstancePredictions(good.masks, good.class_ids, np.full(len(good.scores), np.nan))
    gt = coco_from_samples(samples, THING_CLASSES)
    with caplog.at_level(logging.DEBUG):  # undefined area ranges are logged at debug level (normal on small images)
        metrics = evaluate_coco_masks(gt, {s.image_id: InstancePredictions.from_sample(s) for s in samples})
    assert metrics["AP"] == pytest.approx(100.0)
    assert math.isnan(metrics["APl"]) and "APl is undefined" in caplog.text  # no large object at 64x64
