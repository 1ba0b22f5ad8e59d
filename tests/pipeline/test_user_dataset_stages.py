"""The whole method on a user's own COCO dataset, with each teacher a user can get, on the CPU at tiny sizes.

The spec (issue 16): on a COCO dataset unlike the built-in one (other sizes, one class with id 7, grayscale
images, sparse image ids, plus a folder of unlabeled images) zero-shot evaluation, adapt-teacher, distill,
refine and the supervised baseline all complete with the pipeline-model teacher (no pretraining, or pretrained
on a COCO source of the user's choice) and with a ``transformers`` Mask2Former checkpoint folder; the
pseudo-labels are keyed by the unlabeled folder's image ids.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from reference_pipeline import stages


def _run_every_stage(cfg) -> dict[str, dict[str, float]]:
    datasets = stages.load_datasets(cfg, progress=False)
    stages.adapt_teacher(cfg, datasets, progress=False)
    stages.distill(cfg, datasets, progress=False)
    stages.refine(cfg, datasets, progress=False)
    stages.supervised_baseline(cfg, datasets, progress=False)
    metrics = {stage: stages.evaluate_stage(cfg, datasets, stage, progress=False) for stage in stages.EVALUABLE}
    for name in ("pseudo_labels_teacher_finetune.json", "pseudo_labels_teacher_self_train.json"):
        pseudo = json.loads((cfg.run_path / name).read_text())
        assert sorted(int(i) for i in pseudo) == [0, 1, 2, 3], name  # the unlabeled folder's ids
    for stage, values in metrics.items():
        assert math.isfinite(values["AP"]) and values["images"] == 2, stage
    return metrics


def test_pipeline_teacher_without_pretraining(user_run_config, tmp_path: Path) -> None:
    cfg = user_run_config(tmp_path / "run", "teacher_pretrain.source=none")
    _run_every_stage(cfg)
    assert not list(tmp_path.rglob("*_pipeline_teacher"))  # nothing pretrained, nothing cached


def test_pipeline_teacher_pretrained_on_a_coco_source(user_run_config, user_coco, tmp_path: Path) -> None:
    source = user_coco["train_annotations"]  # the user's labeled set doubles as a (same-class) source here
    cfg = user_run_config(tmp_path / "run", f"teacher_pretrain.source={source}",
                          f"teacher_pretrain.source_images={user_coco['root']}",
                          f"teacher_pretrain.cache_dir={tmp_path / 'cache'}")
    _run_every_stage(cfg)
    (cached,) = (tmp_path / "cache").iterdir()
    assert (cached / stages.WEIGHTS_FILE).is_file() and (cached / "result.json").is_file()


def test_transformers_mask2former_teacher(user_run_config, tiny_mask2former, tmp_path: Path) -> None:
    cfg = user_run_config(tmp_path / "run", "teacher_kind=transformers",
                          f"transformers_teacher.path={tiny_mask2former}")
    _run_every_stage(cfg)


def test_the_synthetic_source_on_a_user_dataset_says_what_to_set_instead(user_run_config, tmp_path: Path) -> None:
    cfg = user_run_config(tmp_path / "run", "teacher_kind=demo")  # demo = pipeline with the synthetic source
    datasets = stages.load_datasets(cfg, progress=False)
    with pytest.raises(ValueError, match=r"needs data\.format=synthetic.*teacher_pretrain\.source=none"):
        stages.adapt_teacher(cfg, datasets, progress=False)
