r"""COCO mask AP evaluation with pycocotools.

Ground truth comes from :class:`~reference_pipeline.data.structures.InstanceSample` objects (any
reader); it is converted to a COCO object in memory (:func:`coco_from_samples`). Predictions are
either ground-truth-format (:class:`InstancePredictions`: binary masks, classes, scores) or raw
Mask2Former-style model outputs, converted by :func:`postprocess_mask2former` exactly as
Mask2Former's ``instance_inference`` does:

.. math::
    P = \operatorname{softmax}(\text{class\_logits})_{:, :C}, \quad
    (k, c) = \operatorname{top\text{-}k}_{k, c}\, P_{k,c}, \quad
    M_k = [\text{mask\_logit}_k > 0], \quad
    \text{score} = P_{k,c} \cdot \frac{\sum_p \sigma(\text{mask\_logit}_{k,p}) M_{k,p}}{\sum_p M_{k,p} + 10^{-6}}

with the no-object class last (index ``C``) and mask logits resized bilinearly to the original
image size. Metrics are COCO ``segm`` AP, AP50, AP75, APs, APm, APl on a 0-100 scale.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from .data.coco import encode_mask, samples_to_coco_dict
from .data.structures import InstanceSample

__all__ = [
    "METRIC_NAMES",
    "CocoMaskEvaluator",
    "InstancePredictions",
    "coco_from_samples",
    "evaluate_coco_masks",
    "postprocess_mask2former",
    "predictions_to_coco_results",
    "resolution_ceiling",
]

logger = logging.getLogger(__name__)

#: Keys of the metric dictionary, in COCOeval ``stats`` order.
METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass
class InstancePredictions:
    """Scored instance predictions for one image, at the original image size.

    Attributes:
        masks: ``(K, H, W)`` bool.
        class_ids: ``(K,)`` int64 contiguous class indices.
        scores: ``(K,)`` float confidence.

    Raises:
        ValueError: on inconsistent shapes or non-finite scores.
    """

    masks: np.ndarray
    class_ids: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        self.masks = np.asarray(self.masks).astype(bool, copy=False)
        self.class_ids = np.asarray(self.class_ids).astype(np.int64, copy=False)
        self.scores = np.asarray(self.scores, dtype=np.float64)
        if self.masks.ndim != 3:
            raise ValueError(f"masks must be (K, H, W), got shape {self.masks.shape}")
        num = self.masks.shape[0]
        if self.class_ids.shape != (num,) or self.scores.shape != (num,):
            raise ValueError(
                f"class_ids and scores must be ({num},), got {self.class_ids.shape} and {self.scores.shape}"
            )
        if not np.isfinite(self.scores).all():
            raise ValueError("scores must be finite")

    @staticmethod
    def from_sample(sample: InstanceSample, score: float = 1.0) -> InstancePredictions:
        """Ground truth as predictions (crowd regions excluded), all with ``score``."""
        keep = ~sample.is_crowd
        return InstancePredictions(
            masks=sample.masks[keep],
            class_ids=sample.class_ids[keep],
            scores=np.full(int(keep.sum()), score, dtype=np.float64),
        )


def check_query_outputs(mask_logits: Tensor, class_logits: Tensor) -> None:
    """Check one image's per-query outputs: ``(K, h, w)`` mask and ``(K, C + 1)`` class logits, finite.

    Raises:
        ValueError: on mismatched shapes, ``C < 1`` or non-finite logits.
    """
    if mask_logits.ndim != 3 or class_logits.ndim != 2 or mask_logits.shape[0] != class_logits.shape[0]:
        raise ValueError(
            f"expected mask_logits (K, h, w) and class_logits (K, C+1) with equal K, got "
            f"{tuple(mask_logits.shape)} and {tuple(class_logits.shape)}"
        )
    if class_logits.shape[1] < 2:
        raise ValueError(f"class_logits needs at least one class plus no-object, got {tuple(class_logits.shape)}")
    if not (bool(torch.isfinite(mask_logits).all()) and bool(torch.isfinite(class_logits).all())):
        raise ValueError("mask_logits and class_logits must be finite")


def postprocess_mask2former(
    mask_logits: Tensor,
    class_logits: Tensor,
    image_size: tuple[int, int],
    top_k: int = 100,
) -> InstancePredictions:
    """Turn one image's query outputs into scored instances (Mask2Former ``instance_inference``).

    Args:
        mask_logits: per-query mask logits at any resolution.
        class_logits: per-query class logits with the no-object class last.
        image_size: ``(H, W)`` of the original image; masks are resized to it (bilinear).
        top_k: number of (query, class) pairs kept (Mask2Former's ``test_topk_per_image``).

    Shape:
        - mask_logits: :math:`(K, h, w)`
        - class_logits: :math:`(K, C + 1)`

    Returns:
        ``min(top_k, K·C)`` predictions sorted by decreasing score.

    Raises:
        ValueError: on mismatched shapes, ``C < 1``, ``top_k < 1`` or non-finite logits.
    """
    check_query_outputs(mask_logits, class_logits)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    with torch.no_grad():
        probs = class_logits.float().softmax(dim=-1)[:, :-1]  # (K, C)
        k = min(top_k, num_queries * num_classes)
        scores, flat = probs.flatten().topk(k, sorted=True)  # (k,), (k,)
        labels = flat % num_classes  # (k,)
        queries = flat // num_classes  # (k,)
        logits = F.interpolate(mask_logits[None].float(), size=tuple(image_size), mode="bilinear", align_corners=False)[
            0
        ]  # (K, H, W)
        logits = logits[queries]  # (k, H, W)
        binary = logits > 0  # (k, H, W)
        mask_probs = logits.sigmoid()  # (k, H, W)
        mask_scores = (mask_probs * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)  # (k,)
        final = scores * mask_scores  # (k,)
    return InstancePredictions(
        masks=binary.cpu().numpy(),
        class_ids=labels.cpu().numpy().astype(np.int64),
        scores=final.cpu().double().numpy(),
    )


def coco_from_samples(samples: Iterable[InstanceSample], class_names: Sequence[str]) -> COCO:
    """Build a pycocotools ground-truth object in memory (category id = class index + 1).

    Args:
        samples: ground-truth images; ``image_id`` must be unique.
        class_names: name of each class index.

    Returns:
        An indexed :class:`pycocotools.coco.COCO`.

    Raises:
        ValueError: on duplicate image ids or out-of-range class ids.
    """
    return _coco_from_dict(samples_to_coco_dict(samples, class_names))


def _coco_from_dict(data: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def predictions_to_coco_results(
    image_id: int,
    predictions: InstancePredictions,
    category_ids: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Convert one image's predictions to COCO result entries (compressed RLE).

    Args:
        image_id: the image.
        predictions: its scored masks.
        category_ids: COCO category id of each class index; default ``index + 1``.

    Returns:
        ``[{"image_id", "category_id", "segmentation", "score"}, ...]``.

    Raises:
        ValueError: if a class index has no category id.
    """
    results = []
    for mask, class_id, score in zip(predictions.masks, predictions.class_ids, predictions.scores):
        class_id = int(class_id)
        if category_ids is None:
            category = class_id + 1
        else:
            if not 0 <= class_id < len(category_ids):
                raise ValueError(f"predicted class {class_id} outside 0..{len(category_ids) - 1}")
            category = int(category_ids[class_id])
        results.append(
            {
                "image_id": int(image_id),
                "category_id": category,
                "segmentation": encode_mask(mask),
                "score": float(score),
            }
        )
    return results


def _results_to_coco(gt: COCO, results: list[dict[str, Any]]) -> COCO:
    """pycocotools' ``loadRes`` for segmentations, without its failure on an empty list."""
    annotations = []
    for index, result in enumerate(results, start=1):
        rle = {"size": result["segmentation"]["size"], "counts": result["segmentation"]["counts"].encode("ascii")}
        annotations.append(
            {
                **result,
                "id": index,
                "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            }
        )
    return _coco_from_dict(
        {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]), "annotations": annotations}
    )


def _run_cocoeval(gt: COCO, results: list[dict[str, Any]], per_class: bool) -> dict[str, float]:
    known = set(gt.getImgIds())
    unknown = {r["image_id"] for r in results} - known
    if unknown:
        raise ValueError(f"predictions for image ids not in the ground truth: {sorted(unknown)[:5]}")
    if not any(not a.get("iscrowd", 0) for a in gt.dataset["annotations"]):
        raise ValueError("the ground truth has no non-crowd instance; COCO AP is undefined")
    dt = _results_to_coco(gt, results)
    evaluator = COCOeval(gt, dt, iouType="segm")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    logger.debug("COCO segm evaluation:\n%s", buffer.getvalue().strip())
    metrics: dict[str, float] = {}
    for name, value in zip(METRIC_NAMES, evaluator.stats[: len(METRIC_NAMES)]):
        if value < 0:  # pycocotools' -1: no ground truth in this area range
            logger.debug("%s is undefined (no ground-truth instance in its area range); reported as NaN", name)
            metrics[name] = math.nan
        else:
            metrics[name] = float(value) * 100.0
    if per_class:
        precision = evaluator.eval["precision"]  # (T, R, K, A, M)
        for slot, category_id in enumerate(evaluator.params.catIds):
            values = precision[:, :, slot, 0, -1]
            values = values[values > -1]
            name = gt.cats[category_id]["name"]
            metrics[f"AP-{name}"] = float(values.mean()) * 100.0 if values.size else math.nan
    return metrics


def evaluate_coco_masks(
    ground_truth: Sequence[InstanceSample] | COCO,
    predictions: Mapping[int, InstancePredictions],
    class_names: Sequence[str] | None = None,
    *,
    per_class: bool = False,
) -> dict[str, float]:
    """COCO mask AP of predictions against ground truth.

    Args:
        ground_truth: samples (needs ``class_names``) or a ready COCO object whose category ids
            are ``class index + 1`` (as :func:`coco_from_samples` builds).
        predictions: ``{image_id: InstancePredictions}``; images without an entry count as having
            no detections.
        class_names: class names when ``ground_truth`` is a list of samples.
        per_class: also return ``"AP-<name>"`` for every class.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` on a 0-100 scale. A metric whose area
        range has no ground truth is NaN and a warning is logged.

    Raises:
        ValueError: if predictions reference unknown images, mask sizes differ from the image,
            ``class_names`` is missing, or the ground truth has no non-crowd instance.
    """
    if isinstance(ground_truth, COCO):
        gt = ground_truth
    else:
        if class_names is None:
            raise ValueError("class_names is required when ground_truth is a list of samples")
        gt = coco_from_samples(ground_truth, class_names)
    category_ids = sorted(gt.getCatIds())
    results: list[dict[str, Any]] = []
    for image_id, prediction in predictions.items():
        if image_id not in gt.imgs:
            raise ValueError(f"prediction for image id {image_id}, which is not in the ground truth")
        info = gt.imgs[image_id]
        if prediction.masks.shape[1:] != (info["height"], info["width"]):
            raise ValueError(
                f"predicted masks for image {image_id} have size {prediction.masks.shape[1:]}, "
                f"expected ({info['height']}, {info['width']})"
            )
        results.extend(predictions_to_coco_results(image_id, prediction, category_ids))
    return _run_cocoeval(gt, results, per_class)


class CocoMaskEvaluator:
    """Streaming evaluator: add images one at a time, then :meth:`compute`.

    Only RLE-encoded masks are kept, never images, so memory stays small.

    Args:
        class_names: name of each class index.
        top_k: top-k for :meth:`add_model_output`.
    """

    def __init__(self, class_names: Sequence[str], top_k: int = 100) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.class_names = list(class_names)
        self.top_k = top_k
        self.reset()

    def reset(self) -> None:
        """Forget everything added so far."""
        self._images: list[dict[str, Any]] = []
        self._gt_annotations: list[dict[str, Any]] = []
        self._results: list[dict[str, Any]] = []
        self._seen: set[int] = set()

    def __len__(self) -> int:
        return len(self._images)

    def add(self, sample: InstanceSample, prediction: InstancePredictions) -> None:
        """Add one ground-truth image and its predictions.

        Raises:
            ValueError: if the image id was already added or mask sizes differ.
        """
        if sample.image_id in self._seen:
            raise ValueError(f"image id {sample.image_id} added twice")
        if prediction.masks.shape[1:] != (sample.height, sample.width):
            raise ValueError(
                f"predicted masks for image {sample.image_id} have size {prediction.masks.shape[1:]}, "
                f"expected ({sample.height}, {sample.width})"
            )
        self._seen.add(sample.image_id)
        gt = samples_to_coco_dict([sample], self.class_names)
        self._images.extend(gt["images"])
        for ann in gt["annotations"]:
            ann["id"] = len(self._gt_annotations) + 1
            self._gt_annotations.append(ann)
        self._results.extend(predictions_to_coco_results(sample.image_id, prediction))

    def add_model_output(
        self, sample: InstanceSample, mask_logits: Tensor, class_logits: Tensor
    ) -> InstancePredictions:
        """Post-process raw query outputs (:func:`postprocess_mask2former`) and add them.

        Shape:
            - mask_logits: :math:`(K, h, w)`
            - class_logits: :math:`(K, C + 1)`

        Returns:
            The scored instances that were added.
        """
        if class_logits.shape[-1] != len(self.class_names) + 1:
            raise ValueError(
                f"class_logits has {class_logits.shape[-1]} columns, expected "
                f"{len(self.class_names)} classes + no-object"
            )
        prediction = postprocess_mask2former(mask_logits, class_logits, (sample.height, sample.width), self.top_k)
        self.add(sample, prediction)
        return prediction

    def compute(self, per_class: bool = False) -> dict[str, float]:
        """COCO mask AP over everything added (see :func:`evaluate_coco_masks`).

        Raises:
            ValueError: if nothing was added or there is no non-crowd ground truth.
        """
        if not self._images:
            raise ValueError("no images were added to the evaluator")
        categories = [{"id": i + 1, "name": name} for i, name in enumerate(self.class_names)]
        gt = _coco_from_dict({"images": self._images, "annotations": self._gt_annotations, "categories": categories})
        return _run_cocoeval(gt, self._results, per_class)


def resolution_ceiling(
    samples: Iterable[InstanceSample],
    class_names: Sequence[str],
    *,
    image_size: tuple[int, int],
    stride: int = 4,
) -> dict[str, float]:
    r"""The mask AP a perfect model can reach when its masks live on the stride-``s`` grid.

    Every ground-truth instance becomes one query whose mask logit on the ``ceil(H/s) × ceil(W/s)`` grid is
    :math:`\operatorname{logit}(a)`, with :math:`a` the fraction of the cell the instance covers (area
    average pooling, clipped to :math:`[10^{-4}, 1 - 10^{-4}]`), and whose class is certain. These outputs go
    through the same post-processing as a model's (:func:`postprocess_mask2former`: bilinear resize to the
    image, threshold at 0), so the AP they score is the ceiling the output resolution allows.

    Args:
        samples: ground truth; images are resized to ``image_size`` (masks nearest) as the models see them.
        class_names: name of each class index.
        image_size: ``(H, W)`` the model runs at.
        stride: output stride of the mask logits.

    Returns:
        ``AP``, ``AP50``, ... in percent, plus ``images``.
    """
    evaluator = CocoMaskEvaluator(class_names, top_k=100)
    num_classes = len(class_names)
    height, width = image_size
    grid = (math.ceil(height / stride), math.ceil(width / stride))
    for sample in samples:
        keep = ~sample.is_crowd
        masks = torch.from_numpy(sample.masks[keep]).float()  # (M, H0, W0)
        if masks.shape[0] == 0:
            continue
        if tuple(masks.shape[1:]) != (height, width):
            masks = F.interpolate(masks[None], size=(height, width), mode="nearest")[0]  # (M, H, W)
        padded = F.pad(masks, (0, grid[1] * stride - width, 0, grid[0] * stride - height))  # (M, h·s, w·s)
        coverage = F.avg_pool2d(padded[None], stride)[0].clamp(1e-4, 1 - 1e-4)  # (M, h, w)
        mask_logits = torch.log(coverage) - torch.log1p(-coverage)  # (M, h, w)
        class_logits = torch.full((masks.shape[0], num_classes + 1), -20.0)  # (M, C + 1)
        class_logits[torch.arange(masks.shape[0]), torch.from_numpy(sample.class_ids[keep])] = 20.0
        resized = InstanceSample(
            image=np.zeros((height, width, 3), np.uint8), masks=masks.bool().numpy(),
            class_ids=sample.class_ids[keep], is_crowd=np.zeros(masks.shape[0], bool),
            image_id=sample.image_id, file_name=sample.file_name,
        )
        evaluator.add_model_output(resized, mask_logits, class_logits)
    metrics = evaluator.compute()
    metrics["images"] = float(len(evaluator))
    return metrics
