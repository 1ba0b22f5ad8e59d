"""A user's own COCO dataset through ``load_datasets``: nothing of theirs is renumbered or thrown away.

The spec (``data/loading.py``): every annotated training image stays labeled unless a subset is asked for
(``label_fraction < 1`` or ``split_file``, the rest then being the unlabeled set); otherwise the unlabeled set
is ``data.unlabeled_images`` (a folder) or ``data.unlabeled_annotations`` (a COCO JSON whose annotations are
ignored), or empty — and the semi-supervised stages refuse an empty one by name; category ids and names,
image ids and file names are the user's; the validation JSON must list the same categories; asking for two
sources of unlabeled images, or for both a fraction and a split file, is a config error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from reference_pipeline import stages
from reference_pipeline.config import ConfigError, PipelineConfig, load_pipeline_config
from reference_pipeline.data.splits import write_split_file

TRAIN_IDS = [1003, 17, 250, 4]  # conftest.USER_TRAIN
UNLABELED_FILES = ["a_rgba.png", "b_gray.png", "c_16bit.png", "more/d_rgb.jpg"]


def _config(paths: dict[str, Path], **data: object) -> PipelineConfig:
    overrides = [f"data.{key}={value}" for key, value in
                 {"format": "coco", "root": paths["root"], "train_annotations": paths["train_annotations"],
                  "val_annotations": paths["val_annotations"], "val_images": paths["val_images"], **data}.items()]
    return load_pipeline_config(None, overrides)


def test_every_annotated_image_stays_labeled_and_the_unlabeled_folder_is_the_unlabeled_set(user_coco) -> None:
    datasets = stages.load_datasets(_config(user_coco, unlabeled_images=user_coco["unlabeled_images"]), progress=False)
    assert sorted(int(i) for i in datasets.labeled.image_ids) == sorted(TRAIN_IDS)
    assert datasets.class_names == ["Widget"] and datasets.category_ids == [7]
    assert list(datasets.unlabeled.file_names) == UNLABELED_FILES
    assert list(datasets.unlabeled.image_ids) == [0, 1, 2, 3]
    for index, image_id in enumerate(datasets.labeled.image_ids):
        sample = datasets.labeled[index]
        assert sample.image_id == image_id and sample.file_name == f"{image_id}_img.png"
        assert sample.image.shape[2] == 3 and sample.num_instances == 1 + image_id % 2  # grayscale read as RGB
    assert sorted(int(i) for i in datasets.val.image_ids) == [9001, 9002]


def test_without_unlabeled_images_the_set_is_empty_and_the_semi_supervised_stages_say_what_to_set(
    user_coco, tmp_path: Path
) -> None:
    cfg = _config(user_coco)
    cfg.run_dir = str(tmp_path / "run")
    datasets = stages.load_datasets(cfg, progress=False)
    assert len(datasets.labeled) == len(TRAIN_IDS) and len(datasets.unlabeled) == 0
    for stage in (stages.adapt_teacher, stages.distill):
        with pytest.raises(ValueError, match=r"needs unlabeled images.*data\.unlabeled_images.*unlabeled_annotations"):
            stage(cfg, datasets, progress=False)


def test_an_unlabeled_coco_json_keeps_its_ids_and_its_annotations_are_ignored(user_coco) -> None:
    cfg = _config(user_coco, unlabeled_annotations=user_coco["val_annotations"], unlabeled_images=user_coco["val_images"])
    unlabeled = stages.load_datasets(cfg, progress=False).unlabeled
    assert list(unlabeled.image_ids) == [9001, 9002]
    assert all(unlabeled[i].num_instances == 0 for i in range(len(unlabeled)))


def test_a_label_fraction_or_a_split_file_carves_the_unlabeled_set_out_of_the_training_images(
    user_coco, tmp_path: Path
) -> None:
    carved = stages.load_datasets(_config(user_coco, label_fraction=0.5), progress=False)
    labeled, unlabeled = list(carved.labeled.image_ids), list(carved.unlabeled.image_ids)
    assert len(labeled) == 2 and sorted(labeled + unlabeled) == sorted(TRAIN_IDS)
    split = write_split_file(tmp_path / "labeled.txt", [17, 1003])
    chosen = stages.load_datasets(_config(user_coco, split_file=split), progress=False)
    assert list(chosen.labeled.image_ids) == [17, 1003]
    assert sorted(chosen.unlabeled.image_ids) == [4, 250]
    write_split_file(tmp_path / "bad.txt", [17, 5])
    with pytest.raises(ValueError, match=r"bad\.txt are not in the training set, e\.g\. \[5\]"):
        stages.load_datasets(_config(user_coco, split_file=tmp_path / "bad.txt"), progress=False)


@pytest.mark.parametrize("data", [
    {"label_fraction": 0.5, "unlabeled_images": "x"},
    {"split_file": "x.txt", "unlabeled_annotations": "x.json"},
    {"split_file": "x.txt", "label_fraction": 0.5},
])
def test_two_sources_of_unlabeled_images_are_a_config_error(user_coco, data: dict) -> None:
    with pytest.raises(ConfigError, match=r"data\.(label_fraction|split_file)"):
        _config(user_coco, **data)


def test_validation_categories_must_match_the_training_ones(user_coco, tmp_path: Path) -> None:
    val = json.loads(Path(user_coco["val_annotations"]).read_text())
    val["categories"] = [{"id": 8, "name": "Widget"}]
    for ann in val["annotations"]:
        ann["category_id"] = 8
    (tmp_path / "val.json").write_text(json.dumps(val))
    with pytest.raises(ValueError, match=r"categories .* differ"):
        stages.load_datasets(_config(user_coco, val_annotations=tmp_path / "val.json"), progress=False)


def test_the_shipped_coco_config_keeps_every_label(tmp_path: Path) -> None:
    cfg = load_pipeline_config(str(Path(__file__).resolve().parents[2] / "configs" / "coco_format.yaml"))
    assert cfg.data.label_fraction == 1.0 and not cfg.data.split_file
    assert np.isclose(PipelineConfig().data.label_fraction, 1.0)
