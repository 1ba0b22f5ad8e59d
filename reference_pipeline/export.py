"""Export a trained student to ONNX and check it against PyTorch with onnxruntime.

The exported graph takes ``images (B, 3, H, W)`` float in ``[0, 1]`` at the run's image size and
returns ``mask_logits (B, K, H/4, W/4)`` and ``class_logits (B, K, C+1)`` — what
:func:`reference_pipeline.evaluate.postprocess_mask2former` turns into instances.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .atomic import atomic_path
from .errors import UserError
from .trained import load_trained

__all__ = ["ExportResult", "InferenceWrapper", "export_model", "export_onnx"]


@dataclass
class ExportResult:
    """An exported model and how closely onnxruntime reproduces PyTorch.

    Attributes:
        path: the ``.onnx`` file.
        max_abs_diff: largest absolute difference over both outputs on a random batch.
        outputs: output names.
    """

    path: Path
    max_abs_diff: float
    outputs: tuple[str, ...]


class InferenceWrapper(nn.Module):
    """Returns the student's ``(mask_logits, class_logits)`` as a tuple (what ONNX can express)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        output = self.model(images)
        return output.mask_logits, output.class_logits


def export_model(model: nn.Module, image_size: tuple[int, int], path: Path, *, opset: int = 17) -> ExportResult:
    """Export ``model`` (eval mode) to ``path`` and verify it with onnxruntime on a random batch of 2.

    Raises:
        ImportError: if ``onnx`` / ``onnxruntime`` are missing (install the ``pipeline`` extra).
    """
    try:
        import onnxruntime
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("export needs onnx and onnxruntime: pip install -e '.[pipeline]'") from error
    model = model.eval()
    wrapper = InferenceWrapper(model).eval()
    images = torch.rand(2, 3, *image_size)  # (B, 3, H, W)
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape arithmetic traced as constants: fixed input size
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter handles this model; dynamo needs onnxscript
        expected = wrapper(images)
        torch.onnx.export(
            wrapper, (images,), str(tmp), input_names=["images"], output_names=["mask_logits", "class_logits"],
            dynamic_axes={"images": {0: "batch"}, "mask_logits": {0: "batch"}, "class_logits": {0: "batch"}},
            opset_version=opset, dynamo=False,
        )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy()})
    diff = max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))
    return ExportResult(path, diff, ("mask_logits", "class_logits"))


def export_onnx(model_folder: Path, path: Path) -> ExportResult:
    """Export the trained student of ``model_folder`` (a stage's folder; see :func:`export_model`).

    Needs no config and no dataset: the folder describes itself (:mod:`reference_pipeline.trained`).

    Raises:
        UserError: if the folder holds a teacher.
    """
    model, card = load_trained(model_folder)
    if card.kind != "student":
        raise UserError(f"export takes a student's folder; {model_folder} holds a {card.kind} teacher ({card.stage})")
    return export_model(model, tuple(card.image_size), path)
