"""Recording stand-ins for the wiring tests of :mod:`reference_pipeline.stages` (not a test module).

* :class:`TaggedModel`: a one-parameter "segmentation model" whose outputs are a function of its
  input images and of its weight, and which records every call (the images, whether gradients were
  on). A weight value names a state ("pretrained", "fine-tuned", ...), so a recorded call tells
  which weights produced which outputs.
* :func:`tagged_batch`: a :class:`~reference_pipeline.data.semi.SemiBatch` whose four views (labeled
  weak / strong, unlabeled weak / strong) differ in every field a stage reads — image values, crop
  boxes, flips, targets and ground-truth ids — so that a recorded value names the view it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from instcontrast.views import ViewGeometry
from reference_pipeline.data.augment import ViewBatch
from reference_pipeline.data.semi import SemiBatch, TwoViewBatch
from reference_pipeline.models.outputs import SegmentationOutput

SIZE = 16  # image side of the tagged views
QUERIES, CLASSES, DIM = 2, 1, 3

#: Image value of each view (all pixels of image b of the view are ``VALUE + b / 100``).
VIEW_VALUE = {("labeled", "weak"): 1.0, ("labeled", "strong"): 2.0, ("unlabeled", "weak"): 3.0, ("unlabeled", "strong"): 4.0}
#: Class id of the single target instance of each view.
VIEW_CLASS = {("labeled", "weak"): 0, ("labeled", "strong"): 1, ("unlabeled", "weak"): 2, ("unlabeled", "strong"): 3}


@dataclass
class Call:
    """One forward pass of a :class:`TaggedModel`."""

    images: Tensor
    grad_enabled: bool
    weight: float


class TaggedModel(nn.Module):
    """``output = weight · f(images)`` with one scalar parameter; every call is recorded in ``calls``."""

    def __init__(self, weight: float = 1.0, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(float(weight)))
        self.num_classes = num_classes
        self.calls: list[Call] = []

    def forward(self, images: Tensor) -> SegmentationOutput:
        self.calls.append(Call(images.detach().clone(), torch.is_grad_enabled(), float(self.weight.detach())))
        b, _, h, w = images.shape
        pooled = images[:, :, ::4, ::4]  # (B, 3, h/4, w/4): the embeddings keep the image values
        masks = self.weight * pooled[:, :1].expand(b, QUERIES, -1, -1)  # (B, K, h/4, w/4)
        classes = self.weight * images.mean(dim=(1, 2, 3))[:, None, None].expand(b, QUERIES, self.num_classes + 1)
        return SegmentationOutput(mask_logits=masks, class_logits=classes, pixel_embeddings=self.weight * pooled)


def _view(part: str, which: str, batch: int) -> ViewBatch:
    value = VIEW_VALUE[(part, which)]
    images = torch.stack([torch.full((3, SIZE, SIZE), value + b / 100) for b in range(batch)])  # (B, 3, S, S)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(batch, 1)  # (B, 4)
    boxes[:, 2] = 1.0 - value / 10 - torch.arange(batch) / 100  # a distinct box per view and image
    flips = torch.tensor([(which == "strong") != (b % 2 == 1) for b in range(batch)])  # (B,)
    masks = [torch.zeros(1, SIZE, SIZE, dtype=torch.bool) for _ in range(batch)]
    for m in masks:
        m[0, : int(value) * 2, :] = True  # a distinct target mask per view
    return ViewBatch(
        images=images,
        geometry=ViewGeometry(boxes=boxes, flips=flips),
        masks=masks,
        class_ids=[torch.tensor([VIEW_CLASS[(part, which)]]) for _ in range(batch)],
        is_crowd=[torch.zeros(1, dtype=torch.bool) for _ in range(batch)],
        instance_index=[torch.zeros(1, dtype=torch.int64) for _ in range(batch)],
        image_ids=torch.arange(batch) + (0 if part == "labeled" else 100),
    )


def _part(part: str, batch: int) -> TwoViewBatch:
    ids = {which: torch.full((batch, SIZE, SIZE), 10 * VIEW_CLASS[(part, which)], dtype=torch.int64) for which in ("weak", "strong")}
    return TwoViewBatch(weak=_view(part, "weak", batch), strong=_view(part, "strong", batch),
                        weak_ids=ids["weak"], strong_ids=ids["strong"])


def tagged_batch(labeled: int = 2, unlabeled: int | None = 3) -> SemiBatch:
    """A batch of ``labeled`` labeled and ``unlabeled`` pseudo-labeled images (``None``: no unlabeled part)."""
    return SemiBatch(_part("labeled", labeled), None if unlabeled is None else _part("unlabeled", unlabeled))


def view_images(batch: SemiBatch, *views: tuple[str, str]) -> Tensor:
    """The images of ``views`` (``("labeled", "weak")``, ...) of ``batch``, concatenated in that order."""
    parts = []
    for part, which in views:
        two = batch.labeled if part == "labeled" else batch.unlabeled
        parts.append(getattr(two, which).images)
    return torch.cat(parts)


def view_geometry(batch: SemiBatch, *views: tuple[str, str]) -> tuple[Tensor, Tensor]:
    """``(boxes, flips)`` of ``views`` of ``batch``, concatenated in that order."""
    boxes, flips = [], []
    for part, which in views:
        two = batch.labeled if part == "labeled" else batch.unlabeled
        boxes.append(getattr(two, which).geometry.boxes)
        flips.append(getattr(two, which).geometry.flips)
    return torch.cat(boxes), torch.cat(flips)


def view_ids(batch: SemiBatch, *views: tuple[str, str]) -> Tensor:
    """Ground-truth instance-id maps of ``views`` of ``batch``, concatenated in that order."""
    return torch.cat([getattr(batch.labeled if p == "labeled" else batch.unlabeled, f"{w}_ids") for p, w in views])


#: Loss a :class:`RecordingCriterion` returns for targets of each view (by their class id); any
#: other view's targets give 1000.
CRITERION_VALUE = {VIEW_CLASS[("labeled", "weak")]: 1.0, VIEW_CLASS[("unlabeled", "strong")]: 10.0}


@dataclass
class RecordingCriterion:
    """A set criterion that records what it was given; its loss names the view of the targets (:data:`CRITERION_VALUE`)."""

    calls: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, output: SegmentationOutput, targets: list[Any]) -> Tensor:
        self.calls.append({"output": output, "targets": targets})
        value = CRITERION_VALUE.get(int(targets[0].class_ids[0]), 1000.0)
        return value + 0.0 * output.mask_logits.sum()  # (), in the graph of the outputs
