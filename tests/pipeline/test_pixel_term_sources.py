"""``losses.pixel_contrast_term``: whose predictions drive the negative sampler.

The spec: negatives are sampled from the fused mask / class probabilities of ``prediction_source``
(detached), and by default from the *anchor (weak) view's own* predictions — never from the other
view's, whose pixels sit on another grid. A recording loss module captures what it is given.
"""

from __future__ import annotations

import torch

from instcontrast import InstanceAwarePixelContrast
from instcontrast.views import ViewGeometry
from reference_pipeline.losses import pixel_contrast_term
from reference_pipeline.models.outputs import SegmentationOutput

B, K, C, D, H, W = 2, 3, 2, 4, 8, 8


class RecordingContrast(InstanceAwarePixelContrast):
    def __init__(self) -> None:
        super().__init__(num_negatives=4)
        self.seen: dict[str, torch.Tensor] = {}

    def forward(self, z_weak, z_strong, mask_logits, class_logits, **kwargs):  # type: ignore[override]
        self.seen = {"z_weak": z_weak, "mask_logits": mask_logits, "class_logits": class_logits}
        return super().forward(z_weak, z_strong, mask_logits, class_logits, **kwargs)


def _output(value: float, requires_grad: bool = False) -> SegmentationOutput:
    masks = torch.full((B, K, H, W), value, requires_grad=requires_grad)
    classes = torch.full((B, K, C + 1), value, requires_grad=requires_grad)
    return SegmentationOutput(masks, classes, torch.randn(B, D, H, W, requires_grad=requires_grad))


def test_by_default_the_anchor_views_own_predictions_drive_the_sampler() -> None:
    weak, strong = _output(1.0, requires_grad=True), _output(2.0)
    criterion = RecordingContrast()
    identity = ViewGeometry.identity(B)
    pixel_contrast_term(criterion, weak, strong, identity, identity)
    assert torch.equal(criterion.seen["mask_logits"], weak.mask_logits.detach())
    assert torch.equal(criterion.seen["class_logits"], weak.class_logits.detach())
    assert not criterion.seen["mask_logits"].requires_grad and not criterion.seen["class_logits"].requires_grad
    assert criterion.seen["z_weak"] is weak.pixel_embeddings  # the anchors keep their gradient


def test_a_given_prediction_source_drives_the_sampler() -> None:
    weak, strong, teacher = _output(1.0), _output(2.0), _output(3.0)
    criterion = RecordingContrast()
    identity = ViewGeometry.identity(B)
    pixel_contrast_term(criterion, weak, strong, identity, identity, prediction_source=teacher)
    assert torch.equal(criterion.seen["mask_logits"], teacher.mask_logits)
    assert torch.equal(criterion.seen["class_logits"], teacher.class_logits)
