"""Shared fixtures for the reference-pipeline data / evaluation tests (tiny sizes only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reference_pipeline.data.synthetic import SyntheticConfig, generate_dataset


@pytest.fixture(scope="session")
def tiny_config() -> SyntheticConfig:
    """A few 64x64 images per split."""
    return SyntheticConfig(
        image_size=(64, 64), source_train=4, target_labeled=3, target_unlabeled=5, target_val=3, seed=7
    )


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory, tiny_config: SyntheticConfig) -> Path:
    """The tiny synthetic dataset written to disk once per session (in-process)."""
    root = tmp_path_factory.mktemp("synthetic") / "dataset"
    return generate_dataset(root, tiny_config, workers=0, progress=False)


# ------------------------------------------------------------------ a user's own COCO dataset
#: The user dataset's one category: an id that is not 1 and a capitalised name.
USER_CATEGORY = {"id": 7, "name": "Widget"}
#: Image ids of the user's labeled training images (not 0..N-1, not sorted) and their (height, width).
USER_TRAIN = {1003: (40, 56), 17: (48, 36), 250: (40, 56), 4: (44, 60)}
USER_VAL = {9001: (40, 56), 9002: (48, 36)}


def write_user_coco(
    folder: Path, name: str, images: dict[int, tuple[int, int]], categories: list[dict], seed: int = 0
) -> Path:
    """Grayscale PNGs ``folder/name/<id>_img.png`` with one or two bright boxes each, and ``folder/name.json``.

    Every box is an instance of ``categories[k % len(categories)]`` (polygon segmentation).
    """
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    image_dir = folder / name
    image_dir.mkdir(parents=True, exist_ok=True)
    records, annotations = [], []
    for image_id, (height, width) in images.items():
        pixels = np.full((height, width), 30, dtype=np.uint8)
        for k in range(1 + image_id % 2):
            box_h, box_w = int(rng.integers(8, height // 2)), int(rng.integers(8, width // 2))
            top, left = int(rng.integers(0, height - box_h)), int(rng.integers(0, width - box_w))
            pixels[top:top + box_h, left:left + box_w] = 200
            x0, y0, x1, y1 = left, top, left + box_w, top + box_h
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0,
                                "category_id": categories[k % len(categories)]["id"],
                                "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]], "area": box_h * box_w,
                                "bbox": [x0, y0, box_w, box_h]})
        Image.fromarray(pixels, mode="L").save(image_dir / f"{image_id}_img.png")
        records.append({"id": image_id, "file_name": f"{image_id}_img.png", "height": height, "width": width})
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"images": records, "annotations": annotations, "categories": categories}))
    return path


def write_unlabeled_folder(folder: Path) -> Path:
    """Unlabeled images of every kind a user may hold: grayscale, RGBA, 16-bit, RGB JPEG, in a sub-folder too."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "more").mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (40, 56), dtype=np.uint8), mode="L").save(folder / "b_gray.png")
    Image.fromarray(rng.integers(0, 255, (36, 52, 4), dtype=np.uint8), mode="RGBA").save(folder / "a_rgba.png")
    Image.fromarray((rng.integers(0, 65535, (44, 48))).astype(np.uint16)).save(folder / "c_16bit.png")
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(folder / "more" / "d_rgb.jpg")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="session")
def user_coco(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A COCO dataset unlike the built-in one: other sizes, one class (id 7), grayscale, sparse ids, unlabeled folder."""
    root = tmp_path_factory.mktemp("user_coco")
    return {
        "train_annotations": write_user_coco(root, "train", USER_TRAIN, [USER_CATEGORY]),
        "root": root / "train",
        "val_annotations": write_user_coco(root, "val", USER_VAL, [USER_CATEGORY], seed=1),
        "val_images": root / "val",
        "unlabeled_images": write_unlabeled_folder(root / "unlabeled"),
    }


def save_tiny_mask2former(folder: Path, labels: list[str], *, processor: dict | None = None, dropout: float = 0.1) -> Path:
    """A tiny random ``Mask2FormerForUniversalSegmentation`` (4-stage Swin of width 16) saved with ``save_pretrained``."""
    import json

    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(
        backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_layers=1,
        decoder_layers=3, num_queries=8, num_attention_heads=2, dim_feedforward=64, encoder_feedforward_dim=64,
        num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
        dropout=dropout,
    )
    Mask2FormerForUniversalSegmentation(config).save_pretrained(folder)
    if processor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


@pytest.fixture(scope="session")
def tiny_mask2former(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mask2Former checkpoint folder whose labels include the user dataset's class in other case."""
    return save_tiny_mask2former(tmp_path_factory.mktemp("m2f") / "checkpoint", ["person", "WIDGET", "car"])


@pytest.fixture(scope="session")
def mask2former_writer():
    """:func:`save_tiny_mask2former`, for tests that need a checkpoint with their own labels or processor."""
    return save_tiny_mask2former


#: Tiny sizes for whole-method runs on the user dataset (seconds per stage on one CPU thread).
TINY_MODEL = ("encoder=efficientnet_lite0", "encoder_weights=null", "neck=fpn", "neck_channels=16", "hidden_dim=16",
              "decoder_layers=1", "num_queries=4", "num_heads=2", "feedforward_dim=32", "projection_hidden_dim=8",
              "embedding_dim=8")
TINY_STAGES = ("teacher_pretrain", "teacher_finetune", "teacher_self_train", "distill", "refine", "baseline")


@pytest.fixture(scope="session")
def user_run_config(user_coco):
    """``(run_dir, *overrides) -> PipelineConfig``: the user dataset, tiny models and 2-step stages on the CPU."""
    from reference_pipeline.config import load_pipeline_config

    def make(run_dir: Path, *overrides: str):
        base = [
            "data.format=coco", f"data.root={user_coco['root']}", f"data.train_annotations={user_coco['train_annotations']}",
            f"data.val_annotations={user_coco['val_annotations']}", f"data.val_images={user_coco['val_images']}",
            f"data.unlabeled_images={user_coco['unlabeled_images']}", "data.image_size=[48,64]", f"run_dir={run_dir}",
            "contrast.num_negatives=8", "eval.batch_size=2", "eval.latency_repeats=1", "teacher_kind=pipeline",
            *[f"{model}.{setting}" for model in ("student", "demo_teacher") for setting in TINY_MODEL],
            "transformers_teacher.embedding_dim=8", "transformers_teacher.projection_hidden_dim=16",
        ]
        for stage in TINY_STAGES:
            base += [f"{stage}.train.steps=2", f"{stage}.train.batch_size=2", f"{stage}.train.num_workers=0",
                     f"{stage}.train.device=cpu", f"{stage}.train.checkpoint_every=0", f"{stage}.train.log_every=1"]
        return load_pipeline_config(None, [*base, *overrides])

    return make


@pytest.fixture(scope="session")
def coco_writer():
    """:func:`write_user_coco`, for tests that need a COCO dataset with their own categories."""
    return write_user_coco
