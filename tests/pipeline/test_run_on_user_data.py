"""``run --config FILE`` on a user's own COCO dataset, and what a user does with the result.

The spec (issue 16, "Done when"): on a COCO dataset unlike the built-in one (other sizes, one class with
id 7, grayscale images, sparse image ids, a folder of unlabeled images) ``run`` completes every stage and
writes the report, with the pipeline-model teacher and with a tiny ``transformers`` Mask2Former checkpoint;
``predict`` output loads with ``pycocotools`` against the user's annotations and scores the same AP as
``evaluate``; trained folders describe themselves (classes, the user's category ids).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reference_pipeline.cli import main
from reference_pipeline.config import STAGES, save_config
from reference_pipeline.trained import load_trained


def _run(cfg, folder: Path) -> Path:
    config_file = save_config(cfg, folder / "my_run.yaml")
    assert main(["run", "--config", str(config_file), "--no-progress"]) == 0
    return cfg.run_path


@pytest.fixture(scope="module")
def pipeline_run(user_run_config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("run_pipeline")
    # refine trains long enough to predict something (an AP of 0 everywhere would make the AP comparison empty)
    return _run(user_run_config(folder / "run", "teacher_pretrain.source=none", "refine.train.steps=120",
                                "refine.train.lr_decoder=2e-3", "refine.train.batch_size=4"), folder)


def test_run_with_the_pipeline_teacher_completes_every_stage_and_writes_the_report(pipeline_run: Path) -> None:
    results = json.loads((pipeline_run / "evaluation.json").read_text())
    assert set(results) == {s.name for s in STAGES}
    report = (pipeline_run / "report.md").read_text()
    for stage in STAGES:
        assert stage.label in report
    for stage in STAGES[1:]:
        _, card = load_trained(pipeline_run / stage.name)  # self-describing: no config, no dataset
        assert card.class_names == ["Widget"] and card.category_ids == [7] and card.image_size == (48, 64)


def test_run_with_a_transformers_mask2former_teacher_completes_every_stage(
    user_run_config, tiny_mask2former: Path, tmp_path: Path
) -> None:
    cfg = user_run_config(tmp_path / "run", "teacher_kind=transformers", f"transformers_teacher.path={tiny_mask2former}")
    run = _run(cfg, tmp_path)
    assert set(json.loads((run / "evaluation.json").read_text())) == {s.name for s in STAGES}
    _, card = load_trained(run / "teacher_self_train")
    assert card.kind == "transformers" and card.category_ids == [7]
    assert (run / "report.md").is_file()


def test_predict_writes_the_users_ids_and_scores_the_same_ap_as_evaluate(
    pipeline_run: Path, user_coco: dict[str, Path], tmp_path: Path
) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = tmp_path / "predictions"
    assert main(["predict", str(user_coco["val_images"]), "--out", str(out), "--model", str(pipeline_run / "refine"),
                 "--annotations", str(user_coco["val_annotations"]), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    truth = COCO(str(user_coco["val_annotations"]))
    assert results and {r["category_id"] for r in results} == {7}
    assert {r["image_id"] for r in results} <= set(truth.getImgIds())
    assert all(truth.imgs[r["image_id"]]["file_name"].endswith(r["file_name"]) for r in results)
    evaluation = COCOeval(truth, truth.loadRes(results), iouType="segm")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    ap = 100.0 * max(float(evaluation.stats[0]), 0.0)
    expected = json.loads((pipeline_run / "evaluation.json").read_text())["refine"]
    assert expected["AP50"] > 0  # something to compare
    assert ap == pytest.approx(expected["AP"], abs=1e-6)
    assert 100.0 * float(evaluation.stats[1]) == pytest.approx(expected["AP50"], abs=1e-6)


def test_evaluate_needs_no_training_annotations_for_a_trained_stage(pipeline_run: Path, tmp_path: Path,
                                                                    capsys) -> None:
    config = pipeline_run / "refine" / "run_config.yaml"
    text = config.read_text().replace("train_annotations: ", f"train_annotations: {tmp_path / 'gone.json'} # ")
    moved = tmp_path / "config.yaml"
    moved.write_text(text)
    assert main(["evaluate", "--config", str(moved), "--stage", "refine", "--no-progress"]) == 0
    assert "refine" in capsys.readouterr().out
