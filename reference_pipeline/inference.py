"""Running a trained model over a dataset: predictions, mask AP, latency and pseudo-labels.

Every model of the pipeline (student, demo teacher, foundation teacher) returns a
:class:`~reference_pipeline.models.outputs.SegmentationOutput`, so one inference loop serves
evaluation (COCO mask AP on the validation split), pseudo-labelling (the teacher on the unlabeled
split) and the ``predict`` command (a folder of images).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data.structures import InstanceDataset, InstanceSample
from .evaluate import CocoMaskEvaluator

__all__ = ["ImagePrediction", "evaluate_model", "images_to_batch", "measure_latency", "predict_dataset"]


@dataclass
class ImagePrediction:
    """Raw query outputs of one image.

    Attributes:
        sample: the input sample (image and, when present, its annotations).
        mask_logits: ``(K, h, w)`` at stride 4 of the model's input size.
        class_logits: ``(K, C + 1)``.
    """

    sample: InstanceSample
    mask_logits: Tensor
    class_logits: Tensor


def images_to_batch(samples: Sequence[InstanceSample], image_size: tuple[int, int] | None) -> Tensor:
    """Stack sample images as a ``(B, 3, H, W)`` float batch in ``[0, 1]``, resized to ``image_size``.

    Without ``image_size`` every sample must have the same size.
    """
    tensors = [torch.from_numpy(s.image).permute(2, 0, 1).float().div_(255.0) for s in samples]  # (3, H, W) each
    if image_size is not None:
        tensors = [
            t if tuple(t.shape[1:]) == tuple(image_size)
            else F.interpolate(t[None], size=tuple(image_size), mode="bilinear", align_corners=False)[0]
            for t in tensors
        ]
    sizes = {tuple(t.shape) for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"images of different sizes {sorted(sizes)} need an image_size to be batched")
    return torch.stack(tensors)  # (B, 3, H, W)


@torch.no_grad()
def predict_dataset(
    model: nn.Module,
    dataset: InstanceDataset,
    *,
    image_size: tuple[int, int] | None,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "predict",
) -> Iterator[ImagePrediction]:
    """Yield the model's raw outputs for every image of ``dataset`` (model in eval mode).

    Args:
        model: returns a :class:`~reference_pipeline.models.outputs.SegmentationOutput`.
        dataset: images to run on.
        image_size: input size the images are resized to (``None``: as they are).
        batch_size: images per forward pass.
        progress: show a progress bar.
        desc: its label.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        bar = tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress, leave=False)
        for start in range(0, len(dataset), batch_size):
            samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            output = model(images_to_batch(samples, image_size).to(device))
            for i, sample in enumerate(samples):
                yield ImagePrediction(sample, output.mask_logits[i].float().cpu(), output.class_logits[i].float().cpu())
            bar.update(len(samples))
        bar.close()
    finally:
        model.train(was_training)


def evaluate_model(
    model: nn.Module,
    dataset: InstanceDataset,
    *,
    image_size: tuple[int, int] | None,
    batch_size: int = 8,
    top_k: int = 100,
    progress: bool = True,
    desc: str = "evaluate",
) -> dict[str, float]:
    """COCO mask AP of ``model`` on ``dataset`` (see :class:`~reference_pipeline.evaluate.CocoMaskEvaluator`).

    Returns:
        ``AP``, ``AP50``, ``AP75``, ... in percent, plus ``images``.
    """
    evaluator = CocoMaskEvaluator(dataset.class_names, top_k=top_k)
    for prediction in predict_dataset(
        model, dataset, image_size=image_size, batch_size=batch_size, progress=progress, desc=desc
    ):
        evaluator.add_model_output(prediction.sample, prediction.mask_logits, prediction.class_logits)
    metrics = evaluator.compute()
    metrics["images"] = float(len(evaluator))
    return metrics


@torch.no_grad()
def measure_latency(
    model: nn.Module, image_size: tuple[int, int], *, repeats: int = 10, warmup: int = 2, batch_size: int = 1
) -> float:
    """Median seconds per image of a forward pass at ``image_size`` (eval mode, current threads)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    images = torch.rand(batch_size, 3, *image_size, device=device)  # (B, 3, H, W)
    times: list[float] = []
    try:
        for index in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(images)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index >= warmup:
                times.append((time.perf_counter() - start) / batch_size)
    finally:
        model.train(was_training)
    return float(np.median(times))
