"""Which teacher makes each stage's pseudo-labels and which weights each stage starts from.

The spec (paper Sec. 3.3, ``stages`` module docstring):

1. adapt-teacher: fine-tune the *pretrained* teacher on the labeled set; pseudo-label the unlabeled
   set with the *fine-tuned* teacher; re-initialise from the *pretrained* weights and self-train on
   labeled + those pseudo-labels.
2. distill: pseudo-label with the *adapted* (self-trained, frozen) teacher — not the fine-tuned
   one's cached labels — and train a *freshly built* student with them.
3. refine: start from the *distilled* student, labeled data only.
   baseline: a *freshly built* student, labeled data only.

The stage functions are run for real with recording stand-ins for the training loop
(``train_stage``: records the weights it starts from and sets stage-specific ones),
pseudo-labelling (``make_pseudo_labels``: records the teacher's weights) and the model builders,
so each recorded weight names the state it came from.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from reference_pipeline import stages, teachers
from reference_pipeline.checkpoint import save_weights
from reference_pipeline.config import PipelineConfig

_spec = importlib.util.spec_from_file_location("stage_stubs", Path(__file__).with_name("stage_stubs.py"))
stubs = sys.modules.setdefault("stage_stubs", importlib.util.module_from_spec(_spec))
if not hasattr(stubs, "TaggedModel"):
    _spec.loader.exec_module(stubs)

# weights that name a model's state
FRESH_TEACHER, PRETRAINED, FRESH_STUDENT = 0.5, 1.0, -1.0
TRAINED = {"teacher_finetune": 2.0, "teacher_self_train": 3.0, "distill": 4.0, "refine": 5.0,
           "baseline": 6.0}
STAGE_FIELD = {"teacher_finetune": "teacher_finetune", "teacher_self_train": "teacher_self_train",
               "distill": "distill", "refine": "refine", "baseline": "baseline"}


class Recorder:
    """Stand-ins for the training loop, pseudo-labelling and the model builders, recording their calls."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.trained: dict[str, dict[str, Any]] = {}
        self.labelled: list[dict[str, Any]] = []

    def build_teacher(self, cfg: PipelineConfig, class_names: Any) -> stubs.TaggedModel:
        return stubs.TaggedModel(FRESH_TEACHER)

    def build_student(self, cfg: PipelineConfig, num_classes: int) -> stubs.TaggedModel:
        return stubs.TaggedModel(FRESH_STUDENT)

    def pretrained_teacher(self, cfg: PipelineConfig, datasets: Any, *, progress: bool = True) -> tuple[Any, float]:
        return stubs.TaggedModel(PRETRAINED), 0.0

    def train_stage(self, name, model, cfg, stage, datasets, *, pseudo=None, resume=True, progress=True, seed_offset=0):
        self.trained[name] = {"start": float(model.weight.detach()), "stage": stage, "pseudo": pseudo,
                              "datasets": datasets, "seed_offset": seed_offset}
        model.weight.data.fill_(TRAINED[name])
        path = cfg.run_path / name / stages.WEIGHTS_FILE
        save_weights(model, path)
        return stages.StageResult(name, path, 0.0, 1, {})

    def make_pseudo_labels(self, teacher, cfg, datasets, path, *, resume=True, progress=True):
        self.labelled.append({"teacher": float(teacher.weight.detach()), "path": Path(path),
                              "frozen": not any(p.requires_grad for p in teacher.parameters())})
        return {"made_by": float(teacher.weight.detach())}


@pytest.fixture
def recorder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Recorder:
    cfg = PipelineConfig(run_dir=str(tmp_path / "run"), teacher_kind="demo")
    rec = Recorder(cfg)
    for name in ("build_teacher", "build_student", "pretrained_teacher", "train_stage", "make_pseudo_labels"):
        monkeypatch.setattr(stages, name, getattr(rec, name))
    return rec


@pytest.fixture
def datasets() -> stages.Datasets:
    return stages.Datasets(labeled=["labeled"], unlabeled=["unlabeled"], val=["val"], source=["source"],
                           class_names=["thing"])


def _run_all(rec: Recorder, datasets: stages.Datasets) -> None:
    stages.adapt_teacher(rec.cfg, datasets, progress=False)
    stages.distill(rec.cfg, datasets, progress=False)
    stages.refine(rec.cfg, datasets, progress=False)
    stages.supervised_baseline(rec.cfg, datasets, progress=False)


def test_teacher_fine_tune_starts_from_the_pretrained_teacher_on_labeled_data_only(recorder, datasets) -> None:
    stages.adapt_teacher(recorder.cfg, datasets, progress=False)
    finetune = recorder.trained["teacher_finetune"]
    assert finetune["start"] == PRETRAINED
    assert finetune["pseudo"] is None


def test_stage_one_pseudo_labels_come_from_the_fine_tuned_teacher(recorder, datasets) -> None:
    stages.adapt_teacher(recorder.cfg, datasets, progress=False)
    (labels,) = recorder.labelled
    assert labels["teacher"] == TRAINED["teacher_finetune"]


def test_self_training_is_reinitialised_from_the_pretrained_teacher_and_uses_the_fine_tuned_pseudo_labels(
    recorder, datasets
) -> None:
    stages.adapt_teacher(recorder.cfg, datasets, progress=False)
    adapted = recorder.trained["teacher_self_train"]
    assert adapted["start"] == PRETRAINED  # not the fine-tuned weights
    assert adapted["pseudo"] == {"made_by": TRAINED["teacher_finetune"]}


def test_distillation_pseudo_labels_come_from_the_frozen_adapted_teacher_in_their_own_file(recorder, datasets) -> None:
    stages.adapt_teacher(recorder.cfg, datasets, progress=False)
    stages.distill(recorder.cfg, datasets, progress=False)
    stage_one, stage_two = recorder.labelled
    assert stage_two["teacher"] == TRAINED["teacher_self_train"]
    assert stage_two["frozen"]
    assert stage_two["path"] != stage_one["path"]  # never the fine-tuned teacher's cached labels


def test_distillation_trains_a_freshly_built_student_on_the_adapted_teachers_pseudo_labels(recorder, datasets) -> None:
    stages.adapt_teacher(recorder.cfg, datasets, progress=False)
    stages.distill(recorder.cfg, datasets, progress=False)
    distilled = recorder.trained["distill"]
    assert distilled["start"] == FRESH_STUDENT
    assert distilled["pseudo"] == {"made_by": TRAINED["teacher_self_train"]}


def test_refinement_starts_from_the_distilled_student_on_labeled_data_only(recorder, datasets) -> None:
    _run_all(recorder, datasets)
    refined = recorder.trained["refine"]
    assert refined["start"] == TRAINED["distill"]
    assert refined["pseudo"] is None


def test_supervised_baseline_starts_from_a_fresh_student_on_labeled_data_only(recorder, datasets) -> None:
    _run_all(recorder, datasets)
    baseline = recorder.trained["baseline"]
    assert baseline["start"] == FRESH_STUDENT
    assert baseline["pseudo"] is None


def test_each_stage_trains_with_its_own_config_block_on_the_runs_splits(recorder, datasets) -> None:
    _run_all(recorder, datasets)
    assert set(recorder.trained) == set(STAGE_FIELD)
    for name, field_name in STAGE_FIELD.items():
        assert recorder.trained[name]["stage"] is getattr(recorder.cfg, field_name), name
        assert recorder.trained[name]["datasets"] is datasets, name


def test_each_stage_draws_its_own_augmentations(recorder, datasets) -> None:
    _run_all(recorder, datasets)
    offsets = [record["seed_offset"] for record in recorder.trained.values()]
    assert len(set(offsets)) == len(offsets)


def test_the_demo_teacher_is_pretrained_on_the_source_domain_once_then_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, datasets
) -> None:
    cfg = PipelineConfig(run_dir=str(tmp_path / "run"), teacher_kind="demo")
    cfg.data.root = str(tmp_path / "data" / "synthetic")
    calls: list[dict[str, Any]] = []

    def train_stage(name, model, cfg_, stage, datasets_, *, pseudo=None, resume=True, progress=True, seed_offset=0):
        calls.append({"stage": stage, "labeled": datasets_.labeled, "pseudo": pseudo, "run": cfg_.run_path / name})
        model.weight.data.fill_(PRETRAINED)
        save_weights(model, cfg_.run_path / name / stages.WEIGHTS_FILE)
        (cfg_.run_path / name / "result.json").write_text('{"wall_time": 1.0, "steps": 1, "final_logs": {}}')
        return stages.StageResult(name, cfg_.run_path / name / stages.WEIGHTS_FILE, 1.0, 1, {})

    monkeypatch.setattr(teachers, "build_teacher", lambda cfg_, names: stubs.TaggedModel(FRESH_TEACHER))
    monkeypatch.setattr(stages, "train_stage", train_stage)
    teacher, _ = stages.pretrained_teacher(cfg, datasets, progress=False)
    (call,) = calls
    assert call["labeled"] is datasets.source  # the source domain, not the target's labeled split
    assert call["stage"] is cfg.teacher_pretrain and call["pseudo"] is None
    assert float(teacher.weight.detach()) == PRETRAINED
    again, seconds = stages.pretrained_teacher(cfg, datasets, progress=False)
    assert len(calls) == 1 and seconds == 0.0  # cached: loaded, not trained again
    assert float(again.weight.detach()) == PRETRAINED


def test_each_evaluable_stage_loads_its_own_weights_into_its_own_kind_of_model(recorder, datasets) -> None:
    _run_all(recorder, datasets)
    for stage, kind in stages.EVALUABLE.items():
        model = stages.load_stage_model(recorder.cfg, datasets, stage)
        expected = PRETRAINED if stage == "teacher_zero_shot" else TRAINED[stage]
        assert float(model.weight.detach()) == expected, stage
    # the model kind: a teacher stage must not be built with the student's builder
    recorder.build_student = lambda cfg, n: pytest.fail("a teacher stage built a student")  # type: ignore[method-assign]
    stages.build_student = recorder.build_student  # undone by monkeypatch (the fixture patched it)
    for stage, kind in stages.EVALUABLE.items():
        if kind == "teacher":
            stages.load_stage_model(recorder.cfg, datasets, stage)


def test_evaluation_runs_on_the_validation_split(recorder, datasets, monkeypatch: pytest.MonkeyPatch) -> None:
    _run_all(recorder, datasets)
    seen: list[Any] = []
    monkeypatch.setattr(stages, "evaluate_model", lambda model, dataset, **kw: seen.append(dataset) or {"AP": 0.0})
    import reference_pipeline.inference as inference

    monkeypatch.setattr(inference, "measure_latency", lambda *a, **k: 0.0)
    stages.evaluate_stage(recorder.cfg, datasets, "refine", progress=False)
    assert seen == [datasets.val]
