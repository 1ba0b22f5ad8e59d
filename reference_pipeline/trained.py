"""Trained-model folders that describe themselves: ``model.safetensors`` + ``config.json``.

Every stage leaves ``run_dir/<stage>/model.safetensors`` and, beside it, ``config.json`` (in the
spirit of timm's ``pretrained_cfg`` and transformers' ``save_pretrained``): what the model is, the
architecture that rebuilds it, the class names and the dataset's category ids, the input size it was
trained at. :func:`load_trained` needs nothing else — no config file, no dataset::

    from reference_pipeline.trained import load_trained
    model, card = load_trained("runs/demo/refine")           # eval mode, on the CPU
    instances = card.predict(model, image)                    # image: (H, W, 3) uint8 RGB

A student's folder is self-contained (its encoder's configuration is stored, not the folder it was
initialised from). A foundation teacher's folder names the local Grounding-DINO / SAM2 folders it was
built from (their tokenizer and configs); its fine-tuned weights are in ``model.safetensors``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .atomic import atomic_write_json
from .checkpoint import load_weights, save_weights
from .config_loader import config_from_dict, config_to_dict
from .errors import UserError

__all__ = ["CARD_FILE", "FORMAT", "WEIGHTS_FILE", "ModelCard", "describe", "load_trained", "save_trained"]

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "config.json"
FORMAT = "reference_pipeline.trained_model/1"

Kind = Literal["student", "pipeline", "foundation", "transformers"]


@dataclass
class ModelCard:
    """What ``config.json`` of a trained-model folder holds.

    Attributes:
        kind: ``"student"``, ``"pipeline"`` (a teacher of the student's architecture), ``"foundation"``
            (Grounding-DINO + SAM2) or ``"transformers"`` (a universal-segmentation checkpoint).
        stage: the stage that trained it (``refine``, ``teacher_self_train``, ...).
        architecture: the model config that rebuilds it (a ``StudentConfig``, ``TeacherConfig`` or
            ``TransformersTeacherConfig`` as a dict).
        class_names: class index -> name (the model's class logits follow this order, no-object last).
        category_ids: class index -> the dataset's ``category_id`` (what results files carry).
        image_size: ``(height, width)`` the model was trained and evaluated at.
        top_k: predictions kept per image at inference.
        format: the folder format's version.
    """

    kind: Kind
    stage: str
    architecture: dict[str, Any]
    class_names: list[str]
    category_ids: list[int]
    image_size: tuple[int, int]
    top_k: int = 100
    format: str = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.class_names) != len(self.category_ids):
            raise UserError(
                f"{len(self.class_names)} class names but {len(self.category_ids)} category ids: {self.class_names} / "
                f"{self.category_ids}"
            )

    def category_id(self, class_index: int) -> int:
        """The dataset's ``category_id`` of class ``class_index``."""
        return int(self.category_ids[class_index])

    def predict(self, model: nn.Module, image: np.ndarray) -> Any:
        """Instances of one ``(H, W, 3)`` uint8 RGB image (resized to :attr:`image_size`, masks at ``H×W``).

        Returns:
            :class:`~reference_pipeline.evaluate.InstancePredictions` (``class_ids`` index
            :attr:`class_names`; :meth:`category_id` maps them to the dataset's ids).
        """
        from .data.structures import InstanceSample
        from .evaluate import postprocess_mask2former
        from .inference import images_to_batch

        height, width = image.shape[:2]
        sample = InstanceSample(
            image=image, masks=np.zeros((0, height, width), dtype=bool), class_ids=np.zeros(0, dtype=np.int64),
            is_crowd=np.zeros(0, dtype=bool), image_id=0, file_name="",
        )
        device = next(model.parameters()).device
        with torch.no_grad():
            output = model(images_to_batch([sample], tuple(self.image_size)).to(device))  # (1, 3, h, w)
        return postprocess_mask2former(output.mask_logits[0], output.class_logits[0], (height, width), self.top_k)


def describe(
    model: nn.Module, *, kind: Kind, stage: str, class_names: Sequence[str], category_ids: Sequence[int] | None,
    image_size: Sequence[int], top_k: int,
) -> ModelCard:
    """The card of ``model`` (a :class:`~reference_pipeline.models.student.Student` or a teacher)."""
    core = getattr(model, "module", model)
    if hasattr(core, "architecture"):
        architecture = config_to_dict(core.architecture())
    elif hasattr(core, "config") and hasattr(core.config, "__dataclass_fields__"):
        architecture = config_to_dict(core.config)
    else:
        raise TypeError(f"cannot describe a {type(core).__name__}: it has neither architecture() nor a dataclass config")
    ids = list(category_ids) if category_ids is not None else list(range(1, len(class_names) + 1))
    return ModelCard(kind=kind, stage=stage, architecture=architecture, class_names=list(class_names),
                     category_ids=[int(i) for i in ids], image_size=(int(image_size[0]), int(image_size[1])),
                     top_k=int(top_k))


def save_trained(model: nn.Module, folder: str | os.PathLike[str], card: ModelCard) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/config.json`` (both atomically); returns the folder."""
    folder = Path(folder)
    save_weights(getattr(model, "module", model), folder / WEIGHTS_FILE)
    record = {**card.__dict__, "image_size": list(card.image_size)}
    atomic_write_json(folder / CARD_FILE, record, indent=2)
    return folder


def read_card(folder: str | os.PathLike[str]) -> ModelCard:
    """The :class:`ModelCard` of a trained-model folder.

    Raises:
        FileNotFoundError: if the folder has no ``config.json`` (the message says what writes one).
        UserError: if the file is not a trained-model card.
    """
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a trained-model folder holds model.safetensors + config.json, written by every stage "
            "(python -m reference_pipeline run / distill / refine ...)"
        )
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UserError(f"{path} is not a trained-model card (format {FORMAT!r}); got format {record.get('format')!r}")
    record["image_size"] = tuple(record["image_size"])
    return ModelCard(**record)


def build_from_card(card: ModelCard) -> nn.Module:
    """The (untrained) model a card describes."""
    if card.kind in ("student", "pipeline"):
        from .models.student import Student, StudentConfig

        return Student(config_from_dict(StudentConfig, card.architecture))
    if card.kind == "foundation":
        from .models.teacher import FoundationTeacher, TeacherConfig

        return FoundationTeacher.from_pretrained_dirs(config_from_dict(TeacherConfig, card.architecture))
    if card.kind == "transformers":
        from .models.transformers_teacher import TransformersTeacher, TransformersTeacherConfig

        return TransformersTeacher.from_pretrained_dir(config_from_dict(TransformersTeacherConfig, card.architecture),
                                                       card.class_names)
    raise UserError(f"unknown model kind {card.kind!r} in a trained-model card")


def load_trained(folder: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """The trained model of ``folder`` (eval mode, on ``device``) and its card.

    Raises:
        FileNotFoundError: if ``config.json`` or ``model.safetensors`` is missing.
        CheckpointMismatchError: if the weights do not fit the described architecture.
    """
    card = read_card(folder)
    model = build_from_card(card)
    load_weights(model, Path(folder) / WEIGHTS_FILE)
    return model.eval().to(device), card
