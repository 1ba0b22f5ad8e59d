"""Offline stand-ins for the paper's inputs: tiny random weights and datasets in the real on-disk layouts.

``build_standins(root, dataset)`` writes, under ``root``, what ``docs/reproduce.rst`` asks a user to place
there, at the default paths of ``configs/{cityscapes,ade20k}_10pct.yaml``:

* ``weights/grounding-dino-large``: a tiny ``GroundingDinoForObjectDetection`` + its tokenizer
  (``save_pretrained``), with the real ``max_text_len`` (256) so ADE20K's 100-name prompt fits;
* ``weights/sam2-hiera-large``: a tiny ``Sam2Model``;
* ``weights/dinov2-small``: a ``Dinov2Model`` with DINOv2-S's depth (12 blocks, so the paper's
  intermediate layers ``[2, 5, 8, 11]`` exist) at a toy width;
* ``datasets/cityscapes`` or ``datasets/ADEChallengeData2016``: a few images at a *native size that
  differs from* ``data.image_size`` (Cityscapes' 1024×2048 is trained at 512×1024), each with 3 instances
  and (Cityscapes) a crowd region.

The test sizes are set with ``--set`` overrides that ``docs/reproduce.rst`` lists as its smoke test
(:data:`SMOKE_OVERRIDES`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from reference_pipeline.data.ade20k import ADE20K_INSTANCE_CLASSES
from reference_pipeline.data.cityscapes import CITYSCAPES_THING_CLASSES

#: Native size of the stand-in images (the config trains at SMOKE image_size, half of it).
NATIVE_SIZE = {"cityscapes": (128, 256), "ade20k": (96, 96)}

#: The smoke-test overrides documented in docs/reproduce.rst (tiny sizes and steps; everything else default).
SMOKE_OVERRIDES = {
    "cityscapes": ["data.image_size=[64,128]"],
    "ade20k": ["data.image_size=[48,48]"],
}
COMMON_OVERRIDES = [
    "data.label_fraction=0.5",
    "teacher_finetune.train.steps=1",
    "teacher_finetune.train.batch_size=2",
    "teacher_self_train.train.steps=1",
    "teacher_self_train.train.batch_size=2",
    "distill.train.steps=1",
    "distill.train.batch_size=2",
    "refine.train.steps=1",
    "refine.train.batch_size=2",
    "eval.batch_size=2",
    "eval.latency_repeats=1",
]


def _class_words(dataset: str) -> list[str]:
    names = [name for name, _ in CITYSCAPES_THING_CLASSES] if dataset == "cityscapes" else list(ADE20K_INSTANCE_CLASSES)
    return [word for name in names for word in name.lower().split()]


def save_teacher_weights(weights: Path, dataset: str) -> None:
    """Tiny Grounding-DINO (+ tokenizer) and SAM2 at the configs' default folders under ``weights``."""
    import torch
    from transformers import GroundingDinoForObjectDetection, Sam2Model

    from reference_pipeline.models.tiny_configs import tiny_grounding_dino_config, tiny_sam2_config, tiny_tokenizer

    torch.manual_seed(0)
    detector_config = tiny_grounding_dino_config()
    detector_config.max_text_len = 256  # the real value: ADE20K's prompt of 100 names needs it
    detector_config.text_config.max_position_embeddings = 512
    detector = GroundingDinoForObjectDetection(detector_config)
    detector.save_pretrained(weights / "grounding-dino-large")
    tiny_tokenizer(_class_words(dataset)).save_pretrained(weights / "grounding-dino-large")
    Sam2Model(tiny_sam2_config(64)).save_pretrained(weights / "sam2-hiera-large")


def save_student_weights(weights: Path) -> None:
    """A DINOv2 checkpoint folder with DINOv2-S's 12 blocks at a toy width."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=24, num_hidden_layers=12, num_attention_heads=2, intermediate_size=24,
                          patch_size=14, image_size=518)  # fmt: skip
    Dinov2Model(config).save_pretrained(weights / "dinov2-small")


def _scene(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, list[tuple[slice, slice]]]:
    height, width = size
    image = (rng.random((height, width, 3)) * 60 + 40).astype(np.uint8)
    boxes = []
    for index in range(3):
        h, w = height // 4, width // 6
        top = int(rng.integers(0, height - h))
        left = index * width // 3 + int(rng.integers(0, width // 3 - w))
        box = (slice(top, top + h), slice(left, left + w))
        image[box] = rng.integers(120, 255, size=3, dtype=np.uint8)
        boxes.append(box)
    return image, boxes


def write_cityscapes(root: Path, train: int = 16, val: int = 2) -> Path:
    """Cityscapes layout with ``train`` / ``val`` images at :data:`NATIVE_SIZE`; 3 instances + 1 crowd region each."""
    rng = np.random.default_rng(0)
    labels = [label for _, label in CITYSCAPES_THING_CLASSES]
    for split, count in (("train", train), ("val", val)):
        for index in range(count):
            image, boxes = _scene(rng, NATIVE_SIZE["cityscapes"])
            ids = np.zeros(image.shape[:2], dtype=np.uint16)
            for instance, box in enumerate(boxes):
                ids[box] = labels[(index + instance) % 3] * 1000 + instance
            ids[-8:, :16] = 24  # a group of persons: one crowd region
            stem = f"city_{index:06d}_000019"
            (root / "leftImg8bit" / split / "city").mkdir(parents=True, exist_ok=True)
            (root / "gtFine" / split / "city").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / "leftImg8bit" / split / "city" / f"{stem}_leftImg8bit.png")
            Image.fromarray(ids).save(root / "gtFine" / split / "city" / f"{stem}_gtFine_instanceIds.png")
    return root


def write_ade20k(root: Path, train: int = 16, val: int = 2) -> Path:
    """ADE20K instance layout (``images/``, ``annotations_instance/``) at :data:`NATIVE_SIZE`; 3 instances each."""
    rng = np.random.default_rng(1)
    for split, count in (("training", train), ("validation", val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations_instance" / split).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, boxes = _scene(rng, NATIVE_SIZE["ade20k"])
            encoded = np.zeros((*image.shape[:2], 3), dtype=np.uint8)
            for instance, box in enumerate(boxes):
                encoded[box] = (1 + (index + instance) % 5, instance + 1, 0)
            stem = f"ADE_{split}_{index:08d}"
            Image.fromarray(image).save(root / "images" / split / f"{stem}.jpg", quality=95)
            Image.fromarray(encoded).save(root / "annotations_instance" / split / f"{stem}.png")
    return root


def build_standins(root: Path, dataset: str) -> Path:
    """Weights and dataset for ``configs/<dataset>_10pct.yaml`` at its default relative paths under ``root``."""
    weights = root / "weights"
    save_teacher_weights(weights, dataset)
    save_student_weights(weights)
    if dataset == "cityscapes":
        write_cityscapes(root / "datasets" / "cityscapes")
    else:
        write_ade20k(root / "datasets" / "ADEChallengeData2016")
    return root
