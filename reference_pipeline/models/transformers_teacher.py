"""A ``transformers`` universal-segmentation checkpoint as the teacher (Mask2Former, MaskFormer).

The COCO / Cityscapes / ADE20K Mask2Former checkpoints many users already have (``save_pretrained`` folders
or hub snapshots copied to disk) become a teacher with the pipeline's interface
(:class:`~reference_pipeline.models.outputs.SegmentationOutput`), so zero-shot evaluation, adaptation,
pseudo-labelling and distillation treat it like any other model:

* **Loading.** ``AutoConfig`` reads the folder's ``config.json``; ``model_type`` ``"mask2former"`` loads
  :class:`~transformers.Mask2FormerForUniversalSegmentation`, ``"maskformer"``
  :class:`~transformers.MaskFormerForInstanceSegmentation` (both return ``masks_queries_logits`` at stride 4
  and ``class_queries_logits`` with no-object last). OneFormer is rejected: it needs a tokenized task input.
  Nothing is downloaded (``local_files_only=True``).
* **Input.** Images in ``[0, 1]`` are normalised with the folder's image-processor statistics
  (``preprocessor_config.json`` ``image_mean`` / ``image_std``; ImageNet's when absent) and zero-padded to
  its ``size_divisor`` (32 when absent), as the image processor does.
* **Classes.** Each dataset class is the checkpoint label of the same name (``config.id2label``, compared
  case-insensitively): with :math:`A(j)` the checkpoint labels assigned to output :math:`j`,

  .. math:: \\mathrm{class\\_logits}_{q,j} = \\log \\sum_{l \\in A(j)} e^{\\ell_{q,l}},

  where every checkpoint label the dataset does not name, and the checkpoint's own no-object, are assigned to
  the no-object output (last). The softmax over the ``C + 1`` outputs is therefore exactly the checkpoint's
  softmax with the unnamed classes folded into no-object. A dataset class with no checkpoint label is an error.
* **Pixel embeddings.** A 2-layer MLP (1×1 convolutions) on the pixel decoder's mask features (stride 4):
  stage 1 trains the teacher with the pixel contrastive term (``λ_pxl = 0.2``).
* **Training.** ``transformers``' Mask2Former reuses ``dropout`` as the decoder's layer-drop probability,
  and a dropped layer breaks the next one's attention mask; layer drop is switched off.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from .outputs import SegmentationOutput
from .teacher import IMAGENET_MEAN, IMAGENET_STD, missing_checkpoint_files

__all__ = [
    "TRANSFORMERS_TEACHER_PARTS",
    "TransformersTeacher",
    "TransformersTeacherConfig",
    "check_checkpoint_dir",
    "class_assignment",
    "read_normalisation",
]

#: Parts of the teacher whose training can be switched on or off.
TRANSFORMERS_TEACHER_PARTS = ("backbone", "pixel_decoder", "transformer_decoder", "projection_head")

_PROCESSOR_FILE = "preprocessor_config.json"
_SUPPORTED = {"mask2former": "Mask2FormerForUniversalSegmentation", "maskformer": "MaskFormerForInstanceSegmentation"}


@dataclass
class TransformersTeacherConfig:
    """Settings of the ``transformers`` checkpoint teacher.

    Attributes:
        path: local folder of the checkpoint (``config.json`` + ``model.safetensors``, optionally
            ``preprocessor_config.json``), as written by ``save_pretrained``.
        trainable: the parts trained during adaptation, a subset of :data:`TRANSFORMERS_TEACHER_PARTS`
            (frozen parts stay in eval mode).
        embedding_dim: ``D``, the width of the contrastive pixel embeddings.
        projection_hidden_dim: hidden width of the 2-layer projection head.
    """

    path: str = "weights/mask2former"
    trainable: tuple[str, ...] = TRANSFORMERS_TEACHER_PARTS
    embedding_dim: int = 128
    projection_hidden_dim: int = 256

    def __post_init__(self) -> None:
        self.trainable = tuple(self.trainable)
        unknown = sorted(set(self.trainable) - set(TRANSFORMERS_TEACHER_PARTS))
        if unknown:
            raise UserError(f"unknown trainable parts {unknown}; valid parts: {TRANSFORMERS_TEACHER_PARTS}")
        if self.embedding_dim < 1 or self.projection_hidden_dim < 1:
            raise UserError(
                f"embedding_dim and projection_hidden_dim must be >= 1, got {self.embedding_dim}, {self.projection_hidden_dim}"
            )


def check_checkpoint_dir(path: str | Path) -> None:
    """Raise when ``path`` is not a checkpoint folder (cheap: no weights are read).

    Raises:
        FileNotFoundError: naming the folder, what is missing and the files expected there.
    """
    folder = Path(path)
    missing = missing_checkpoint_files(folder)
    if missing:
        raise FileNotFoundError(
            f"transformers teacher checkpoint not found at {str(folder)!r} (missing: {', '.join(missing)}). Nothing is "
            f"downloaded: set transformers_teacher.path to a folder written by save_pretrained holding\n"
            f"    {folder}/config.json\n    {folder}/model.safetensors (or pytorch_model.bin, or shards + index)\n"
            f"    {folder}/{_PROCESSOR_FILE} (optional: image mean / std)\n"
            "e.g. `huggingface-cli download facebook/mask2former-swin-small-coco-instance --local-dir "
            f"{folder}` on a machine with network access"
        )


def read_normalisation(path: str | Path) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """``(mean, std, size_divisor)`` of the checkpoint's image processor, in ``[0, 1]`` pixel units.

    Read from ``preprocessor_config.json`` when the folder has one (statistics written on the 0–255 scale are
    divided by 255; ``do_normalize: false`` gives mean 0, std 1); ImageNet's statistics and 32 otherwise.
    """
    file = Path(path) / _PROCESSOR_FILE
    if not file.is_file():
        return IMAGENET_MEAN, IMAGENET_STD, 32
    data = json.loads(file.read_text(encoding="utf-8"))
    divisor = int(data.get("size_divisor") or 32)
    if data.get("do_normalize", True) is False:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), divisor
    mean = [float(v) for v in data.get("image_mean", IMAGENET_MEAN)]
    std = [float(v) for v in data.get("image_std", IMAGENET_STD)]
    if len(mean) != 3 or len(std) != 3:
        raise UserError(f"{file}: image_mean / image_std must have 3 values, got {mean}, {std}")
    if max(mean) > 1.0:  # written on the 0-255 scale
        mean, std = [v / 255.0 for v in mean], [v / 255.0 for v in std]
    return tuple(mean), tuple(std), divisor


def class_assignment(checkpoint_labels: Sequence[str], class_names: Sequence[str]) -> list[int]:
    """Which output each checkpoint class goes to: the dataset class of the same name, else no-object.

    Args:
        checkpoint_labels: ``id2label`` of the checkpoint, in label-index order (``L`` names).
        class_names: the dataset's ``C`` class names.

    Returns:
        ``L + 1`` output indices in ``0 .. C``: entry ``l`` for checkpoint label ``l``, the last for the
        checkpoint's no-object; ``C`` means no-object. Names are compared case-insensitively, without
        surrounding spaces.

    Raises:
        ValueError: if a dataset class has no checkpoint label of its name (listing the unmatched dataset
            names and every checkpoint label).
    """
    index_of = {name.strip().lower(): c for c, name in enumerate(class_names)}
    assignment = [index_of.get(label.strip().lower(), len(class_names)) for label in checkpoint_labels]
    matched = set(assignment)
    unmapped = [name for c, name in enumerate(class_names) if c not in matched]
    if unmapped:
        raise UserError(
            f"the teacher checkpoint has no class named {unmapped} (names are matched case-insensitively); its "
            f"classes (config.id2label) are {list(checkpoint_labels)}. Rename the dataset's categories to the "
            "checkpoint's names, or use another teacher (teacher_kind=pipeline)"
        )
    return [*assignment, len(class_names)]


class TransformersTeacher(nn.Module):
    """A Mask2Former / MaskFormer checkpoint with the pipeline's interface and the dataset's classes.

    Build it with :meth:`from_pretrained_dir`.

    Args:
        model: a ``Mask2FormerForUniversalSegmentation`` or ``MaskFormerForInstanceSegmentation``.
        class_names: the dataset's ``C`` class names (mapped to ``model.config.id2label`` by name).
        config: the teacher settings.
        mean: image-processor mean in ``[0, 1]`` units.
        std: image-processor standard deviation.
        size_divisor: inputs are zero-padded to a multiple of it (after normalisation).

    Raises:
        TypeError: if ``model`` is not one of the two classes.
        ValueError: if a dataset class has no checkpoint label of its name.
    """

    mask_stride = 4

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str],
        config: TransformersTeacherConfig,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        size_divisor: int = 32,
    ) -> None:
        super().__init__()
        from transformers import Mask2FormerForUniversalSegmentation, MaskFormerForInstanceSegmentation

        if not isinstance(model, (Mask2FormerForUniversalSegmentation, MaskFormerForInstanceSegmentation)):
            raise TypeError(f"expected a Mask2Former or MaskFormer segmentation model, got {type(model).__name__}")
        self.config = config
        self.model = model
        self.is_mask2former = isinstance(model, Mask2FormerForUniversalSegmentation)
        if self.is_mask2former:
            # transformers reuses `dropout` as layer-drop; a dropped layer leaves the next one a wrong attention mask
            model.model.transformer_module.decoder.layerdrop = 0.0
        labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
        self.class_names = list(class_names)
        assignment = class_assignment(labels, class_names)
        self.register_buffer("assignment", torch.tensor(assignment, dtype=torch.long), persistent=False)  # (L+1,)
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.size_divisor = int(size_divisor)
        self.projection = nn.Sequential(
            nn.Conv2d(model.config.mask_feature_size, config.projection_hidden_dim, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(config.projection_hidden_dim, config.embedding_dim, kernel_size=1),
        )
        self.set_trainable(config.trainable)

    @classmethod
    def from_pretrained_dir(cls, config: TransformersTeacherConfig, class_names: Sequence[str]) -> TransformersTeacher:
        """Load the checkpoint in ``config.path`` (offline) for the dataset's ``class_names``.

        Raises:
            FileNotFoundError: if the folder or its files are missing (naming them).
            ValueError: for an unsupported ``model_type`` (OneFormer included) or unmapped class names.
        """
        from transformers import AutoConfig, Mask2FormerForUniversalSegmentation, MaskFormerForInstanceSegmentation

        check_checkpoint_dir(config.path)
        model_config = AutoConfig.from_pretrained(config.path, local_files_only=True)
        kind = model_config.model_type
        if kind == "oneformer":
            raise UserError(
                f"{config.path} is a OneFormer checkpoint, which needs a tokenized task input (\"the task is instance\"); "
                f"supported model types: {sorted(_SUPPORTED)}"
            )
        if kind not in _SUPPORTED:
            raise UserError(
                f"{config.path} holds a {kind!r} model; transformers_teacher supports {sorted(_SUPPORTED)} "
                f"({', '.join(_SUPPORTED.values())})"
            )
        model_class = Mask2FormerForUniversalSegmentation if kind == "mask2former" else MaskFormerForInstanceSegmentation
        model = model_class.from_pretrained(config.path, local_files_only=True)
        mean, std, divisor = read_normalisation(config.path)
        return cls(model, class_names, config, mean, std, divisor)

    # ---- trainable parts ---------------------------------------------------------------------------

    def part_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Every parameter exactly once, by part of :data:`TRANSFORMERS_TEACHER_PARTS`."""
        pixel_level = self.model.model.pixel_level_module
        backbone = list(pixel_level.encoder.parameters())
        pixel_decoder = list(pixel_level.decoder.parameters())
        taken = {id(p) for p in backbone + pixel_decoder}
        return {
            "backbone": backbone,
            "pixel_decoder": pixel_decoder,
            "transformer_decoder": [p for p in self.model.parameters() if id(p) not in taken],
            "projection_head": list(self.projection.parameters()),
        }

    def _part_modules(self) -> dict[str, list[nn.Module]]:
        pixel_level = self.model.model.pixel_level_module
        rest = [module for name, module in self.model.named_children() if name != "model"]
        return {
            "backbone": [pixel_level.encoder],
            "pixel_decoder": [pixel_level.decoder],
            "transformer_decoder": [self.model.model.transformer_module, *rest],
            "projection_head": [self.projection],
        }

    def set_trainable(self, trainable: Sequence[str]) -> None:
        """Train exactly the given parts; the others are frozen (``requires_grad=False``) and kept in eval mode.

        Raises:
            ValueError: naming unknown parts.
        """
        unknown = sorted(set(trainable) - set(TRANSFORMERS_TEACHER_PARTS))
        if unknown:
            raise UserError(f"unknown trainable parts {unknown}; valid parts: {TRANSFORMERS_TEACHER_PARTS}")
        self.trainable = tuple(trainable)
        for part, params in self.part_parameters().items():
            for param in params:
                param.requires_grad_(part in self.trainable)
        self.train(self.training)

    def train(self, mode: bool = True) -> TransformersTeacher:
        """Set train/eval mode; frozen parts always stay in eval mode (fixed normalisation statistics)."""
        super().train(mode)
        for part, modules in self._part_modules().items():
            if part not in getattr(self, "trainable", TRANSFORMERS_TEACHER_PARTS):
                for module in modules:
                    module.eval()
        return self

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters for the engine's two learning rates: ``"encoder"`` (the backbone) and ``"decoder"`` (the rest).

        Returns:
            ``{"encoder": [...], "decoder": [...]}``; together every parameter exactly once.
        """
        parts = self.part_parameters()
        return {
            "encoder": parts["backbone"],
            "decoder": parts["pixel_decoder"] + parts["transformer_decoder"] + parts["projection_head"],
        }

    # ---- forward -----------------------------------------------------------------------------------

    def map_class_logits(self, logits: Tensor) -> Tensor:
        """Checkpoint class logits → the dataset's, unnamed classes folded into no-object (module docstring).

        Shape:
            - logits: ``(..., L + 1)``
            - output: ``(..., C + 1)``
        """
        shift = logits.detach().amax(dim=-1, keepdim=True)  # (..., 1) for a stable log-sum-exp
        weights = (logits - shift).exp()  # (..., L+1)
        sums = weights.new_zeros(*logits.shape[:-1], len(self.class_names) + 1)  # (..., C+1)
        sums = sums.index_add(-1, self.assignment, weights)  # (..., C+1)
        return sums.clamp_min(torch.finfo(sums.dtype).tiny).log() + shift  # (..., C+1)

    def forward(self, images: Tensor) -> SegmentationOutput:
        """Predict instance masks, the dataset's classes and contrastive pixel embeddings.

        Args:
            images: RGB in ``[0, 1]``.

        Shape:
            - images: ``(B, 3, H, W)``
            - mask_logits: ``(B, K, ceil(H/4), ceil(W/4))``
            - class_logits: ``(B, K, C + 1)``, no-object last
            - pixel_embeddings: ``(B, D, ceil(H/4), ceil(W/4))``

        Returns:
            :class:`~reference_pipeline.models.outputs.SegmentationOutput` with the decoder's auxiliary
            predictions when the checkpoint computes them.

        Raises:
            ValueError: if ``images`` is not a float ``(B, 3, H, W)`` tensor.
        """
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise UserError(
                f"images must be a float (B, 3, H, W) tensor in [0, 1], got {tuple(images.shape)} {images.dtype}"
            )
        height, width = images.shape[-2:]
        divisor = self.size_divisor
        padded_height, padded_width = math.ceil(height / divisor) * divisor, math.ceil(width / divisor) * divisor
        pixels = (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)  # (B, 3, H, W)
        pixels = F.pad(pixels, (0, padded_width - width, 0, padded_height - height))  # (B, 3, H', W')
        out = self.model(pixel_values=pixels, output_auxiliary_logits=True)
        grid_height, grid_width = math.ceil(height / 4), math.ceil(width / 4)
        mask_logits = out.masks_queries_logits[..., :grid_height, :grid_width]  # (B, K, h, w)
        class_logits = self.map_class_logits(out.class_queries_logits)  # (B, K, C+1)
        features = out.pixel_decoder_last_hidden_state[..., :grid_height, :grid_width]  # (B, F, h, w) stride 4
        pixel_embeddings = self.projection(features)  # (B, D, h, w)
        aux_outputs = [
            {
                "masks_queries_logits": aux["masks_queries_logits"][..., :grid_height, :grid_width],  # (B, K, h, w)
                "class_queries_logits": self.map_class_logits(aux["class_queries_logits"]),  # (B, K, C+1)
            }
            for aux in (out.auxiliary_logits or [])
        ]
        return SegmentationOutput(mask_logits, class_logits, pixel_embeddings, aux_outputs)
