"""The one interface every segmentation model of the pipeline returns (student and teacher alike).

Stages, losses, pseudo-labelling, evaluation and the contrastive term only ever see a
:class:`SegmentationOutput`, so a student, the demo teacher and the Grounding-DINO + SAM2 teacher
are interchangeable in every stage.

Conventions:

* models take ``images (B, 3, H, W)`` float in ``[0, 1]`` (RGB); each model normalises internally;
* ``mask_logits`` are at stride 4 of the (unpadded) input: ``(B, K, ceil(H/4), ceil(W/4))``;
* ``class_logits`` have the no-object class last: ``(B, K, C + 1)``;
* ``pixel_embeddings`` are the projection head's output on the same grid as ``mask_logits``:
  ``(B, D, ceil(H/4), ceil(W/4))`` (not normalised; the library normalises);
* ``aux_outputs`` are the intermediate decoder layers' predictions for deep supervision, in
  ``transformers``' ``Mask2FormerLoss`` format (``masks_queries_logits`` / ``class_queries_logits``).

Targets (ground truth and pseudo-labels) are one :class:`InstanceTargets` per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["InstanceTargets", "SegmentationOutput"]


@dataclass
class SegmentationOutput:
    """What a segmentation model returns.

    Attributes:
        mask_logits: ``(B, K, h, w)`` per-query mask logits at stride 4.
        class_logits: ``(B, K, C + 1)`` per-query class logits, no-object last.
        pixel_embeddings: ``(B, D, h, w)`` contrastive projection-head output.
        aux_outputs: per intermediate decoder layer, a dict with ``masks_queries_logits``
            ``(B, K, h, w)`` and ``class_queries_logits`` ``(B, K, C + 1)``.
    """

    mask_logits: Tensor
    class_logits: Tensor
    pixel_embeddings: Tensor
    aux_outputs: list[dict[str, Tensor]] = field(default_factory=list)


@dataclass
class InstanceTargets:
    """Instances of one image (ground truth or pseudo-labels) at the input image size.

    Attributes:
        masks: ``(M, H, W)`` float (0/1) or bool; ``M`` may be 0.
        class_ids: ``(M,)`` int64 contiguous class indices in ``0 .. C-1``.
    """

    masks: Tensor
    class_ids: Tensor
