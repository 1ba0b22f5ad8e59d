"""What the pipeline teacher is pretrained on (``teacher_pretrain.source``) and how it is cached (``teachers.py``).

The spec: ``none`` builds the teacher without pretraining (nothing trained, nothing cached); a COCO source
is matched to the dataset's classes by name (case-insensitively), instances of source-only classes are
dropped, and a source sharing no class is an error listing both; the pretrained teacher is cached under a key
that changes with the source file (path, size, modification time) and the class names, and is loaded on the
next call instead of trained again; every kind is built with the run's seed, so two builds are identical;
``demo`` is another name of ``pipeline``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from reference_pipeline import stages, teachers
from reference_pipeline.checkpoint import save_weights
from reference_pipeline.data.loading import ClassMappedDataset, load_source_dataset


@pytest.fixture
def source_json(tmp_path: Path, coco_writer) -> Path:
    """A COCO source with the user's class (other case, other id) and a class the user does not have."""
    categories = [{"id": 3, "name": "WIDGET"}, {"id": 5, "name": "gadget"}]
    return coco_writer(tmp_path / "source", "src", {11: (40, 40), 12: (36, 44), 13: (40, 40)}, categories)


def _recording_train_stage(calls: list[dict[str, Any]]):
    def train_stage(name, model, cfg_, stage, datasets_, *, pseudo=None, resume=True, progress=True, seed_offset=0):
        calls.append({"labeled": datasets_.labeled, "stage": stage, "run": cfg_.run_path / name})
        save_weights(model, cfg_.run_path / name / stages.WEIGHTS_FILE)
        (cfg_.run_path / name / "result.json").write_text('{"wall_time": 1.0, "steps": 1, "final_logs": {}}')
        return stages.StageResult(name, cfg_.run_path / name / stages.WEIGHTS_FILE, 1.0, 1, {})

    return train_stage


def test_a_coco_source_is_mapped_by_name_and_source_only_instances_are_dropped(source_json: Path) -> None:
    source = load_source_dataset(str(source_json), str(source_json.parent / "src"), ["Widget"])
    raw = json.loads(source_json.read_text())
    widgets = {image_id: sum(a["image_id"] == image_id and a["category_id"] == 3 for a in raw["annotations"])
               for image_id in (11, 12, 13)}
    assert source.mapping == {0: 0}  # source index 0 (WIDGET, id 3) -> the user's Widget; gadget (id 5) dropped
    assert sum(widgets.values()) < len(raw["annotations"])  # the source has gadgets to drop
    for index, image_id in enumerate(source.image_ids):
        sample = source[index]
        assert sample.num_instances == widgets[image_id] and (sample.class_ids == 0).all()


def test_a_source_sharing_no_class_is_an_error_listing_both(source_json: Path) -> None:
    with pytest.raises(ValueError, match=r"\['WIDGET', 'gadget'\].*\['bolt'\].*source=none"):
        load_source_dataset(str(source_json), str(source_json.parent / "src"), ["bolt"])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_source_dataset(str(source_json.parent / "missing.json"), "", ["bolt"])


def test_a_coco_source_is_pretrained_once_then_loaded_from_its_cache(
    user_run_config, source_json: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = user_run_config(tmp_path / "run", f"teacher_pretrain.source={source_json}",
                          f"teacher_pretrain.source_images={source_json.parent / 'src'}")
    datasets = stages.load_datasets(cfg, progress=False)
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(stages, "train_stage", _recording_train_stage(calls))
    teachers.pretrained_teacher(cfg, datasets, progress=False)
    (call,) = calls
    assert isinstance(call["labeled"], ClassMappedDataset) and call["labeled"].base.annotation_file == source_json
    assert call["stage"] is cfg.teacher_pretrain
    assert call["run"] == teachers.pipeline_teacher_cache(cfg, datasets.class_names)
    assert call["run"].parent == source_json.parent / "src_pipeline_teacher"  # beside the source JSON
    _, seconds = teachers.pretrained_teacher(cfg, datasets, progress=False)
    assert len(calls) == 1 and seconds == 0.0


def test_the_cache_key_follows_the_source_file_and_the_class_names(user_run_config, source_json: Path, tmp_path) -> None:
    cfg = user_run_config(tmp_path / "run", f"teacher_pretrain.source={source_json}")
    first = teachers.pipeline_teacher_cache(cfg, ["Widget"])
    assert teachers.pipeline_teacher_cache(cfg, ["Widget"]) == first
    assert teachers.pipeline_teacher_cache(cfg, ["Widget", "bolt"]) != first
    source_json.write_text(source_json.read_text() + " ")  # the source changed: another teacher
    edited = teachers.pipeline_teacher_cache(cfg, ["Widget"])
    assert edited != first
    os.utime(source_json, ns=(1, 1))  # same size, another modification time
    assert teachers.pipeline_teacher_cache(cfg, ["Widget"]) != edited
    none = user_run_config(tmp_path / "run", "teacher_pretrain.source=none")
    with pytest.raises(ValueError, match="not pretrained"):
        teachers.pipeline_teacher_cache(none, ["Widget"])


@pytest.mark.parametrize("kind", ["pipeline", "transformers"])
def test_without_pretraining_nothing_trains_and_two_builds_are_identical(
    user_run_config, tiny_mask2former, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    cfg = user_run_config(tmp_path / "run", f"teacher_kind={kind}", "teacher_pretrain.source=none",
                          f"transformers_teacher.path={tiny_mask2former}")
    datasets = stages.load_datasets(cfg, progress=False)
    monkeypatch.setattr(stages, "train_stage", lambda *a, **k: pytest.fail("a teacher without source was trained"))
    first, seconds = teachers.pretrained_teacher(cfg, datasets, progress=False)
    torch.manual_seed(123)  # the global generator's state must not matter
    second, _ = teachers.pretrained_teacher(cfg, datasets, progress=False)
    assert seconds == 0.0
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_demo_is_the_pipeline_teacher(user_run_config, tmp_path: Path) -> None:
    demo = teachers.build_teacher(user_run_config(tmp_path, "teacher_kind=demo"), ["Widget"])
    pipeline = teachers.build_teacher(user_run_config(tmp_path, "teacher_kind=pipeline"), ["Widget"])
    assert type(demo) is type(pipeline) and demo.config == pipeline.config
    assert teachers.pretrains_teacher(user_run_config(tmp_path, "teacher_kind=demo"))
