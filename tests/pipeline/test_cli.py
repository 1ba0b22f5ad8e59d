"""The command line end to end at --quick size: demo, resume, evaluate, export, predict, and bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reference_pipeline.cli import main

STAGES = ("teacher_zero_shot", "teacher_finetune", "teacher_self_train", "distill", "refine",
          "baseline")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    """One --quick demo (all stages, two student seeds, the report); returns the common arguments and the run dir."""
    root = tmp_path_factory.mktemp("cli")
    common = ["--quick", "--no-progress", "--set", f"data.root={root / 'data' / 'synthetic'}",
              "--run-dir", str(root / "run"), "--set", "threads=1"]
    assert main(["demo", *common, "--set", "student_seeds=2"]) == 0
    return common, root / "run"


def test_demo_runs_every_stage_and_writes_the_report(quick_run) -> None:
    _, run = quick_run
    results = json.loads((run / "evaluation.json").read_text())
    seeded = {f"{name}@seed1" for name in ("distill", "refine", "baseline")}
    assert set(results) == set(STAGES) | seeded
    for name in STAGES:
        metrics = results[name]
        assert 0.0 <= metrics["AP"] <= 100.0 and metrics["parameters"] > 0 and metrics["latency_s"] > 0
    assert all(0.0 <= results[name]["AP"] <= 100.0 for name in seeded)
    assert results["teacher_self_train"]["parameters"] > results["refine"]["parameters"]
    # the second seed distils from the same adapted teacher and pseudo-labels, with its own seed
    seed_run = run / "seeds" / "seed1"
    assert (seed_run / "pseudo_labels_teacher_self_train.json").read_bytes() == (run / "pseudo_labels_teacher_self_train.json").read_bytes()
    assert (seed_run / "distill" / "model.safetensors").is_file()
    ceiling = json.loads((run / "resolution_ceiling.json").read_text())
    assert ceiling["stride"] == 2 and 0 < ceiling["AP"] <= 100
    report = (run / "report.md").read_text()
    for label in ("zero-shot teacher", "adapted teacher", "distilled student", "refined student", "supervised-only"):
        assert label in report
    assert "not one" in report  # the demo teacher is named for what it is
    assert "2 seed(s)" in report and "Resolution ceiling: perfect masks" in report
    for plot in ("ap_per_stage.png", "loss_curves.png", "contrast_diagnostics.png", "overlays.png", "learning_curves.png"):
        assert (run / plot).stat().st_size > 1000
    distill_log = [json.loads(line) for line in (run / "distill" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in distill_log if r["kind"] == "train"]
    assert all("fnr" in r and "pxl" in r and "semi" in r for r in train_records)  # J's terms + the library's stats
    assert (run / "pseudo_labels_teacher_self_train.json").is_file() and (run / "pseudo_labels_teacher_finetune.json").is_file()


def test_rerun_skips_finished_stages(quick_run) -> None:
    common, run = quick_run
    weights = run / "distill" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    metrics_before = (run / "distill" / "metrics.jsonl").read_text()
    assert main(["distill", *common]) == 0
    assert weights.stat().st_mtime_ns == before
    assert (run / "distill" / "metrics.jsonl").read_text() == metrics_before


def test_export_matches_pytorch(quick_run, tmp_path: Path, capsys) -> None:
    common, _ = quick_run
    out = tmp_path / "student.onnx"
    assert main(["export", *common, "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    printed = capsys.readouterr().out
    diff = float(printed.split("max |onnx - torch| = ")[1].split(")")[0])
    assert diff < 1e-3


def test_predict_writes_results_and_overlays(quick_run, tmp_path: Path) -> None:
    common, _ = quick_run
    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):
        Image.fromarray(np.random.default_rng(index).integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(
            images / f"img{index}.png"
        )
    out = tmp_path / "out"
    assert main(["predict", str(images), "--out", str(out), *common]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {r["image_id"] for r in results} <= {0, 1}
    assert all(r["segmentation"]["size"] == [48, 80] for r in results)  # masks at each image's own size
    assert (out / "img0_overlay.png").is_file() and (out / "img1_overlay.png").is_file()


def test_corrupt_image_is_named_and_nothing_is_written(quick_run, tmp_path: Path, capsys) -> None:
    common, _ = quick_run
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.png").write_bytes(b"not a png")
    assert main(["predict", str(images), "--out", str(tmp_path / "out"), *common]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_config_typo_lists_valid_keys(capsys) -> None:
    assert main(["distill", "--set", "distil.train.steps=3"]) == 2
    err = capsys.readouterr().err
    assert "distil" in err and "Did you mean 'distill'" in err and "Traceback" not in err


def test_missing_dataset_paths_are_named(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nowhere" / "train.json"
    code = main(["adapt-teacher", "--set", "data.format=coco", "--set", f"data.root={tmp_path}",
                 "--set", f"data.train_annotations={missing}", "--set", f"data.val_annotations={missing}",
                 "--run-dir", str(tmp_path / "run")])
    assert code == 2
    assert str(missing) in capsys.readouterr().err


def test_empty_labeled_split_is_a_clear_error(tmp_path: Path, capsys) -> None:
    annotations = tmp_path / "train.json"
    (tmp_path / "images").mkdir()
    annotations.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "car"}]}))
    code = main(["distill", "--set", "data.format=coco", "--set", f"data.root={tmp_path / 'images'}",
                 "--set", f"data.train_annotations={annotations}", "--set", f"data.val_annotations={annotations}",
                 "--run-dir", str(tmp_path / "run")])
    assert code == 2
    assert "labeled split is empty" in capsys.readouterr().err


def test_a_stage_made_with_other_settings_is_refused_naming_the_key(quick_run, tmp_path: Path, capsys) -> None:
    common, run = quick_run
    other = tmp_path / "run"
    shutil.copytree(run / "distill", other / "distill")
    code = main(["refine", *common, "--run-dir", str(other), "--set", "student.hidden_dim=32"])
    assert code == 2
    err = capsys.readouterr().err
    assert "student.hidden_dim: 64 -> 32" in err and "--no-resume" in err and len(err.strip().splitlines()) == 1


def test_distilling_from_a_teacher_made_for_another_teacher_setting_is_refused(quick_run, tmp_path: Path,
                                                                               capsys) -> None:
    common, run = quick_run
    other = tmp_path / "run"
    shutil.copytree(run / "teacher_self_train", other / "teacher_self_train")
    code = main(["distill", *common, "--run-dir", str(other), "--set", "demo_teacher.num_queries=5"])
    assert code == 2
    err = capsys.readouterr().err
    assert "teacher_self_train was made with other settings" in err and "demo_teacher.num_queries" in err
    assert not (other / "distill").exists()  # stopped before pseudo-labelling or training anything


def test_weights_that_do_not_fit_the_described_model_are_refused(quick_run, tmp_path: Path, capsys) -> None:
    _, run = quick_run
    other = tmp_path / "run"
    shutil.copytree(run / "refine", other / "refine")
    card = json.loads((other / "refine" / "config.json").read_text())
    card["architecture"]["hidden_dim"] = 32
    (other / "refine" / "config.json").write_text(json.dumps(card))
    code = main(["predict", str(tmp_path), "--out", str(tmp_path / "out"), "--model", str(other / "refine")])
    assert code == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "different model" in err


def test_unwritable_run_dir_is_a_clear_error(quick_run, tmp_path: Path, capsys) -> None:
    common, _ = quick_run
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run directory should be")
    code = main(["refine", *common, "--run-dir", str(blocker / "run")])
    assert code == 2
    assert str(blocker) in capsys.readouterr().err
    assert blocker.read_text().startswith("a file")


def test_help_lists_every_command(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("run", "demo", "show-config", "adapt-teacher", "distill", "refine", "baseline", "evaluate",
                    "predict", "export", "compare-sampling", "ablate"):
        assert command in text
    assert os.environ.get("OMP_WAIT_POLICY", "PASSIVE")  # the CLI module sets no global state on import


def test_show_config_prints_defaults_file_and_overrides_resolved(capsys) -> None:
    import yaml

    from reference_pipeline.config import PipelineConfig, config_from_dict

    assert main(["show-config", "--set", "distill.train.steps=7", "--set", "contrast.memory_bank=64"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    cfg = config_from_dict(PipelineConfig, shown)  # complete: every key, loadable back
    assert cfg.distill.train.steps == 7 and cfg.contrast.memory_bank == 64
    assert cfg.student.hidden_dim == 64  # from configs/demo.yaml, the default --config
    assert cfg.criterion.class_weight == PipelineConfig().criterion.class_weight  # a default the file leaves alone


def test_every_stage_folder_holds_the_config_it_ran_with_and_describes_its_model(quick_run) -> None:
    import yaml

    from reference_pipeline.trained import load_trained

    _, run = quick_run
    for stage in ("teacher_finetune", "teacher_self_train", "distill", "refine", "baseline"):
        ran_with = yaml.safe_load((run / stage / "run_config.yaml").read_text())
        assert ran_with["run_dir"] == str(run)
        model, card = load_trained(run / stage)  # no config, no dataset
        assert card.stage == stage and card.kind == ("pipeline" if stage.startswith("teacher") else "student")
        assert card.class_names and len(card.category_ids) == len(card.class_names)
        assert not model.training


def test_no_resume_recomputes_the_stage(quick_run, tmp_path: Path) -> None:
    common, run = quick_run
    other = tmp_path / "run"
    shutil.copytree(run, other, symlinks=True)
    weights = other / "refine" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    (other / "refine" / "stale.txt").write_text("left by an earlier run")
    assert main(["refine", *common, "--run-dir", str(other), "--no-resume"]) == 0
    assert weights.stat().st_mtime_ns != before and not (other / "refine" / "stale.txt").exists()


def test_a_bug_inside_the_model_keeps_its_traceback(quick_run, monkeypatch: pytest.MonkeyPatch) -> None:
    from reference_pipeline.models.student import Student

    def broken(self, images):
        raise ValueError("a bug in the model")  # not a UserError: must not be turned into a one-line message

    monkeypatch.setattr(Student, "forward", broken)
    common, _ = quick_run
    with pytest.raises(ValueError, match="a bug in the model"):
        main(["evaluate", *common, "--stage", "refine"])
