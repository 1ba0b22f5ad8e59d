"""``stages.train_stage``: what one stage hands the training loop.

The spec: the loop runs with the stage's own ``TrainConfig`` (steps, batch, rates) seeded with
``seed + seed_offset``, and the objective with the stage's ``λ_semi`` / ``λ_pxl``; the training set
pairs the run's *labeled* split with the *pseudo-labeled unlabeled* split when pseudo-labels are
given and a term uses them, and is labeled-only otherwise; evaluation during training is on the
*validation* split; the final weights land in ``run_dir/<stage>/model.safetensors``, and a finished
stage is loaded, not trained again. The engine's ``train`` is replaced by a recorder.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.torch import load_file

from reference_pipeline import stages
from reference_pipeline.config import PipelineConfig, StageConfig, TrainConfig
from reference_pipeline.data.synthetic import load_synthetic_split
from reference_pipeline.engine import TrainResult
from reference_pipeline.pseudo_labels import PseudoInstances

_spec = importlib.util.spec_from_file_location("stage_stubs", Path(__file__).with_name("stage_stubs.py"))
stubs = sys.modules.setdefault("stage_stubs", importlib.util.module_from_spec(_spec))
if not hasattr(stubs, "TaggedModel"):
    _spec.loader.exec_module(stubs)

PSEUDO_CLASS = 2  # a class id the recorder can recognise in the pseudo-labeled targets


@pytest.fixture
def run(tiny_dataset: Path, tmp_path: Path) -> tuple[PipelineConfig, stages.Datasets]:
    cfg = PipelineConfig(run_dir=str(tmp_path / "run"), seed=40, teacher_kind="demo")
    cfg.data.image_size = (32, 32)
    cfg.contrast = replace(cfg.contrast, num_negatives=4)
    labeled = load_synthetic_split(tiny_dataset, "target_labeled")
    datasets = stages.Datasets(labeled, load_synthetic_split(tiny_dataset, "target_unlabeled"),
                               load_synthetic_split(tiny_dataset, "target_val"), None, list(labeled.class_names))
    return cfg, datasets


@pytest.fixture
def loop(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace the engine's ``train`` by a recorder that trains nothing."""
    calls: list[dict[str, Any]] = []

    def train(model, step_fn, dataset, config, run_dir, **kwargs):
        calls.append({"model": model, "objective": step_fn, "dataset": dataset, "config": config,
                      "run_dir": Path(run_dir), **kwargs})
        return TrainResult(step=config.steps, train_metrics={"loss": 1.0}, eval_metrics={}, checkpoint=Path(run_dir))

    monkeypatch.setattr(stages, "train", train)
    return calls


def _pseudo(datasets: stages.Datasets) -> dict[int, PseudoInstances]:
    """One whole-image pseudo-instance of class ``PSEUDO_CLASS`` per unlabeled image."""
    pseudo = {}
    for index, image_id in enumerate(datasets.unlabeled.image_ids):
        sample = datasets.unlabeled[index]
        pseudo[int(image_id)] = PseudoInstances.from_masks(np.ones((1, sample.height, sample.width), bool),
                                                           np.array([PSEUDO_CLASS]), np.array([0.9]))
    return pseudo


def _stage(steps: int = 3, batch: int = 2, lambda_semi: float = 1.0, lambda_pxl: float = 0.2) -> StageConfig:
    train = TrainConfig(steps=steps, batch_size=batch, device="cpu", eval_every=0)
    return StageConfig(train=train, lambda_semi=lambda_semi, lambda_pxl=lambda_pxl)


def test_the_loop_runs_the_stages_own_config_seeded_with_the_offset(run, loop) -> None:
    cfg, datasets = run
    stage = _stage(steps=7, batch=3)
    stages.train_stage("s", stubs.TaggedModel(), cfg, stage, datasets, progress=False, seed_offset=5)
    (call,) = loop
    assert call["config"] == replace(stage.train, seed=cfg.seed + 5)
    assert call["run_dir"] == cfg.run_path / "s"


@pytest.mark.parametrize(("lambda_semi", "lambda_pxl"), [(1.0, 0.2), (0.0, 0.0), (0.3, 0.0), (0.0, 0.5)])
def test_the_objective_carries_the_stages_loss_weights(run, loop, lambda_semi, lambda_pxl) -> None:
    cfg, datasets = run
    stage = _stage(lambda_semi=lambda_semi, lambda_pxl=lambda_pxl)
    stages.train_stage("s", stubs.TaggedModel(), cfg, stage, datasets, pseudo=_pseudo(datasets), progress=False)
    objective = loop[0]["objective"]
    assert (objective.lambda_semi, objective.lambda_pxl) == (lambda_semi, lambda_pxl)
    assert (objective.contrast is not None) == (lambda_pxl > 0)
    if lambda_pxl > 0:
        assert objective.contrast.temperature == cfg.contrast.temperature
        assert objective.contrast.num_negatives == cfg.contrast.num_negatives
        assert objective.contrast.strategy == cfg.contrast.strategy


def test_with_pseudo_labels_each_item_pairs_a_labeled_image_with_a_pseudo_labeled_one(run, loop) -> None:
    cfg, datasets = run
    stages.train_stage("s", stubs.TaggedModel(), cfg, _stage(), datasets, pseudo=_pseudo(datasets), progress=False)
    dataset = loop[0]["dataset"]
    assert len(dataset) == max(len(datasets.labeled), len(datasets.unlabeled))
    labeled_ids, unlabeled_ids = set(datasets.labeled.image_ids), set(datasets.unlabeled.image_ids)
    for index in range(len(dataset)):
        labeled, unlabeled = dataset.get_item(index, 0)
        assert labeled.weak.image_id in labeled_ids and labeled.strong.image_id == labeled.weak.image_id
        assert unlabeled is not None and unlabeled.weak.image_id in unlabeled_ids
        assert unlabeled.strong.class_ids.tolist() == [PSEUDO_CLASS]  # targets are the pseudo-labels
        assert unlabeled.weak.class_ids.tolist() == [PSEUDO_CLASS]


@pytest.mark.parametrize("pseudo_given", [False, True])
def test_without_pseudo_labels_or_terms_that_use_them_the_stage_is_labeled_only(run, loop, pseudo_given) -> None:
    cfg, datasets = run
    pseudo = _pseudo(datasets) if pseudo_given else None
    stage = _stage(lambda_semi=0.0, lambda_pxl=0.0) if pseudo_given else _stage()
    stages.train_stage("s", stubs.TaggedModel(), cfg, stage, datasets, pseudo=pseudo, progress=False)
    dataset = loop[0]["dataset"]
    assert len(dataset) == len(datasets.labeled)
    labeled, unlabeled = dataset.get_item(0, 0)
    assert unlabeled is None and labeled.weak.image_id in set(datasets.labeled.image_ids)


def test_evaluation_during_training_is_on_the_validation_split(run, loop, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, datasets = run
    stage = _stage()
    stage.train = replace(stage.train, eval_every=2)
    stages.train_stage("s", stubs.TaggedModel(), cfg, stage, datasets, progress=False)
    seen: list[Any] = []
    monkeypatch.setattr(stages, "evaluate_model", lambda model, dataset, **kw: seen.append(dataset) or {"AP": 0.0})
    loop[0]["evaluate_fn"](stubs.TaggedModel())
    assert seen == [datasets.val]


def test_final_weights_are_written_and_a_finished_stage_is_loaded_not_retrained(run, loop) -> None:
    cfg, datasets = run
    model = stubs.TaggedModel(weight=0.25)
    result = stages.train_stage("s", model, cfg, _stage(steps=4), datasets, progress=False)
    assert result.weights == cfg.run_path / "s" / stages.WEIGHTS_FILE and result.steps == 4
    assert float(load_file(str(result.weights))["weight"]) == 0.25
    again = stubs.TaggedModel(weight=9.0)
    second = stages.train_stage("s", again, cfg, _stage(steps=4), datasets, progress=False)
    assert len(loop) == 1  # not trained again
    assert float(again.weight.detach()) == 0.25 and second.steps == 4
