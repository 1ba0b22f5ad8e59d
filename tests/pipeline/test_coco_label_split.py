"""The labeled / unlabeled split of a COCO-format training set (``stages.load_datasets``, ``data.format=coco``).

The spec: labeled and unlabeled are disjoint and together cover every training image exactly once;
the labeled part holds ``round(fraction · n)`` images (at least one) and is a function of
``split_seed`` only (same seed, same split; another seed, another split); each split's items are the
images its ids name; validation images never enter training. Image ids are non-contiguous and
unordered in the JSON so that an id/position mix-up shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reference_pipeline import stages
from reference_pipeline.config import PipelineConfig
from reference_pipeline.data.splits import labeled_count

TRAIN_IDS = [907, 13, 512, 77, 301, 45, 688, 2, 150, 999, 421, 60]
VAL_IDS = [5000, 5001]


def _write_split(root: Path, name: str, ids: list[int]) -> Path:
    images = root / name
    images.mkdir(parents=True)
    records, annotations = [], []
    for position, image_id in enumerate(ids):
        pixels = np.full((8, 8, 3), image_id % 251, dtype=np.uint8)  # the image's value names its id
        Image.fromarray(pixels).save(images / f"{image_id}.png")
        records.append({"id": image_id, "file_name": f"{image_id}.png", "height": 8, "width": 8})
        annotations.append({"id": position + 1, "image_id": image_id, "category_id": 3, "iscrowd": 0,
                            "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]})
    data = {"images": records, "annotations": annotations, "categories": [{"id": 3, "name": "thing"}]}
    path = root / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    _write_split(root, "train", TRAIN_IDS)
    _write_split(root, "val", VAL_IDS)
    return root


def _datasets(root: Path, fraction: float, seed: int) -> stages.Datasets:
    cfg = PipelineConfig(teacher_kind="demo")
    cfg.data.format = "coco"
    cfg.data.root = str(root / "train")
    cfg.data.train_annotations = str(root / "train.json")
    cfg.data.val_images = str(root / "val")
    cfg.data.val_annotations = str(root / "val.json")
    cfg.data.label_fraction = fraction
    cfg.data.split_seed = seed
    return stages.load_datasets(cfg, progress=False)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 1.0])
def test_labeled_and_unlabeled_are_disjoint_and_cover_every_training_image(coco_root: Path, fraction: float) -> None:
    data = _datasets(coco_root, fraction, seed=3)
    labeled, unlabeled = [int(i) for i in data.labeled.image_ids], [int(i) for i in data.unlabeled.image_ids]
    assert not set(labeled) & set(unlabeled)
    assert sorted(labeled + unlabeled) == sorted(TRAIN_IDS)
    assert len(labeled) == labeled_count(len(TRAIN_IDS), fraction)


def test_the_split_is_a_function_of_the_seed(coco_root: Path) -> None:
    first = _datasets(coco_root, 0.25, seed=3)
    again = _datasets(coco_root, 0.25, seed=3)
    other = [_datasets(coco_root, 0.25, seed=s) for s in (4, 5)]
    assert list(first.labeled.image_ids) == list(again.labeled.image_ids)
    assert list(first.unlabeled.image_ids) == list(again.unlabeled.image_ids)
    assert any(set(o.labeled.image_ids) != set(first.labeled.image_ids) for o in other)


def test_each_split_item_is_the_image_its_id_names(coco_root: Path) -> None:
    data = _datasets(coco_root, 0.25, seed=3)
    for split in (data.labeled, data.unlabeled, data.val):
        for index, image_id in enumerate(split.image_ids):
            sample = split[index]
            assert int(sample.image_id) == int(image_id)
            assert int(np.asarray(sample.image).reshape(-1)[0]) == int(image_id) % 251


def test_validation_images_never_enter_training(coco_root: Path) -> None:
    data = _datasets(coco_root, 0.5, seed=0)
    assert sorted(int(i) for i in data.val.image_ids) == VAL_IDS
    assert not set(VAL_IDS) & {int(i) for i in [*data.labeled.image_ids, *data.unlabeled.image_ids]}
