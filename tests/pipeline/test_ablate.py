"""The ablation runner: ``ablate --quick --only table4`` end to end, resume, the FNR's provenance, and the statistics."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from reference_pipeline import losses, stages
from reference_pipeline.ablate import (
    METRICS,
    RowSpec,
    Summary,
    TableSpec,
    agreement,
    expected_direction,
    format_summary,
    load_ablation_config,
    paired_difference,
    plan_cells,
    run_ablations,
    summarize,
)
from reference_pipeline.config import ConfigError, load_pipeline_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "ablations.yaml"
STRATEGIES = ("uniform", "mask", "class", "fusion")
SEEDS = 2


# ------------------------------------------------------------------------------------ statistics
def test_summary_is_mean_and_sample_std_ignoring_nan() -> None:
    summary = summarize([1.0, 2.0, 3.0, math.nan])
    assert summary == Summary(2.0, 1.0, 3)


def test_summary_of_one_value_has_no_spread_and_of_none_is_empty() -> None:
    one = summarize([4.0])
    assert one.mean == 4.0 and math.isnan(one.std) and one.n == 1
    assert summarize([]).n == 0 and math.isnan(summarize([math.nan]).mean)


def test_paired_difference_pairs_by_seed_and_uses_common_seeds_only() -> None:
    difference = paired_difference({0: 3.0, 1: 5.0, 2: 9.0}, {0: 1.0, 1: 4.0})  # seed 2 has no default
    assert difference.n == 2
    assert difference.mean == pytest.approx(1.5)
    assert difference.std == pytest.approx(math.sqrt(0.5))  # diffs 2 and 1


def test_paired_spread_is_smaller_than_unpaired_when_seeds_shift_together() -> None:
    row, default = {0: 10.0, 1: 20.0, 2: 30.0}, {0: 9.0, 1: 19.0, 2: 29.0}
    assert paired_difference(row, default).std == pytest.approx(0.0)
    assert summarize(list(row.values())).std == pytest.approx(10.0)


def test_expected_direction_from_the_papers_numbers() -> None:
    assert expected_direction(29.4, 32.2) == -1
    assert expected_direction(32.7, 32.2) == 1
    assert expected_direction(32.2, 32.2) == 0
    assert expected_direction(None, 32.2) is None


def test_agreement_verdicts_on_hand_made_differences() -> None:
    lower = expected_direction(29.4, 32.2)
    agrees = agreement(Summary(-1.0, 0.3, 3), lower, -2.8)
    assert agrees.verdict == "agrees" and "agrees with the paper's direction (lower" in agrees.text
    assert "-2.8" in agrees.text and "0.30 over 3 seeds" in agrees.text
    assert agreement(Summary(+1.0, 0.3, 3), lower, -2.8).verdict == "disagrees"
    noisy = agreement(Summary(-1.0, 1.5, 3), lower, -2.8)
    assert noisy.verdict == "within noise" and "within noise" in noisy.text
    assert agreement(Summary(0.0, 0.0, 2), lower).verdict == "within noise"
    assert "no measurable difference" in agreement(Summary(0.0, math.nan, 1), lower).text
    assert agreement(Summary(-1.0, 0.3, 3), None).verdict == "no paper value"
    assert agreement(Summary(math.nan, math.nan, 0), lower).verdict == "not measured"
    single = agreement(Summary(-1.0, math.nan, 1), lower, -2.8)
    assert single.verdict == "agrees" and "one seed" in single.text


def test_format_summary_signs_the_mean_only() -> None:
    assert format_summary(Summary(1.5, 0.25, 2), "{:+.2f}") == "+1.50 ± 0.25"
    assert format_summary(Summary(1.5, math.nan, 1)) == "1.50"
    assert format_summary(Summary(math.nan, math.nan, 0)) == "—"


# ------------------------------------------------------------------------------------ the config
def test_shipped_config_has_every_table_and_valid_overrides() -> None:
    config, pipeline = load_ablation_config(CONFIG)
    expected = {f"table{n}" for n in (2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13)}
    assert set(config.tables) == expected
    assert config.seeds == 3
    for table in config.tables.values():
        for row in table.rows:  # every row's overrides are valid pipeline keys and values
            load_pipeline_config(str(pipeline), [*config.overrides, *row.set])
    assert [r.name for r in config.tables["table4"].rows] == list(STRATEGIES)


def test_architecture_rows_build_small_students_of_each_family() -> None:
    config, pipeline = load_ablation_config(CONFIG)
    parameters = {}
    for row in config.tables["table5"].rows:
        cfg = load_pipeline_config(str(pipeline), [*config.overrides, *row.set, "data.image_size=[64,64]"])
        student = stages.build_student(cfg, num_classes=3).eval()
        with torch.no_grad():
            output = student(torch.zeros(1, 3, 64, 64))
        stride = cfg.student.mask_stride  # the demo's stride-2 masks, inherited by every row
        assert output.mask_logits.shape[-2:] == (64 // stride, 64 // stride)
        assert output.pixel_embeddings.shape[-2:] == (16, 16)
        parameters[row.name] = sum(p.numel() for p in student.parameters())
    assert all(count < 30e6 for count in parameters.values()), parameters
    assert parameters["dinov2_fpn"] != parameters["dinov2_dpt"]


def test_unknown_table_and_bad_rows_are_rejected_by_name() -> None:
    config, _ = load_ablation_config(CONFIG)
    with pytest.raises(ValueError, match="table99"):
        plan_cells(config, ["table99"], 1)
    with pytest.raises(ValueError, match="refine needs the distill stage"):
        RowSpec("r", stages=["refine"])
    with pytest.raises(ValueError, match="needs a teacher"):
        RowSpec("r", teacher="none", stages=["distill"])
    with pytest.raises(ValueError, match="default row 'x'"):
        TableSpec("t", "x", [RowSpec("a")])
    assert len(plan_cells(config, ["table4"], 3)) == 12


def test_a_bad_override_is_rejected_by_name_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="strategyy"):
        run_ablations(CONFIG, quick=True, only=["table4"], run_dir=tmp_path / "out", progress=False,
                      overrides=["contrast.strategyy=uniform"])
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ ablate --quick --only table4
def _run(root: Path, data: Path) -> Path:
    return run_ablations(
        CONFIG, quick=True, only=["table4"], seeds=SEEDS, run_dir=root, progress=False,
        overrides=[f"data.root={data}", "threads=1", "distill.train.checkpoint_every=1"],
    )


@pytest.fixture(scope="module")
def quick_table4(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """One ``ablate --quick --only table4`` run (2 seeds): (report, root, data root)."""
    base = tmp_path_factory.mktemp("ablate")
    root, data = base / "ablations", base / "data" / "synthetic"
    return _run(root, data), root, data


def _table_rows(report: str, table: str) -> dict[str, list[str]]:
    section = report.split(f"## {table}:")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("*")] = cells
    rows["__header__"] = header
    return rows


def test_quick_table4_writes_a_well_formed_report(quick_table4: tuple[Path, Path, Path]) -> None:
    report_path, root, _ = quick_table4
    assert report_path == root / "ablations.md"
    report = report_path.read_text()
    rows = _table_rows(report, "table4")
    header = rows.pop("__header__")
    assert list(rows) == list(STRATEGIES)
    assert "FNR (training)" in header and "student AP" in header and "Δ student AP" in header
    number = re.compile(r"^[+-]?\d+\.\d+( ± \d+\.\d+)?$")
    fnr_column = header.index("FNR (training)")
    for name, cells in rows.items():
        assert len(cells) == len(header)
        assert number.match(cells[header.index("student AP")]), cells
        assert number.match(cells[fnr_column]), cells
        if name != "fusion":
            assert number.match(cells[header.index("Δ student AP")]), cells
            assert re.search(rf"\*\*{name}\*\* vs fusion, student AP: .*(agrees|disagrees|within noise)", report)
    assert (root / "table4.png").stat().st_size > 0 and (root / "figure3.png").stat().st_size > 0
    for name in STRATEGIES:
        for k in range(SEEDS):
            assert (root / "table4" / name / f"seed{k}" / "cell.json").is_file()


def test_reported_fnr_is_the_mean_of_the_fnr_the_library_logged(quick_table4: tuple[Path, Path, Path]) -> None:
    _, root, _ = quick_table4
    per_row = {}
    for name in STRATEGIES:
        values = []
        for k in range(SEEDS):
            cell = root / "table4" / name / f"seed{k}"
            lines = (cell / "distill" / "metrics.jsonl").read_text().splitlines()
            finite = [r["fnr"] for r in map(json.loads, lines) if "fnr" in r and math.isfinite(r["fnr"])]
            assert finite, f"no finite fnr logged in {cell}"
            reported = json.loads((cell / "cell.json").read_text())["metrics"]["fnr"]
            assert reported == pytest.approx(float(np.mean(finite)), rel=1e-12)
            values.append(reported)
        per_row[name] = summarize(values)
    rows = _table_rows((root / "ablations.md").read_text(), "table4")
    column = rows["__header__"].index("FNR (training)")
    for name, summary in per_row.items():
        assert rows[name][column] == format_summary(summary, METRICS["fnr"][1])


def test_rerun_skips_finished_cells(quick_table4: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    report_path, root, data = quick_table4
    watched = [*root.glob("table4/*/seed*/cell.json"), *root.glob("table4/*/seed*/distill/model.safetensors")]
    assert len(watched) == 2 * len(STRATEGIES) * SEEDS
    before = {path: path.stat().st_mtime_ns for path in watched}

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished cell was retrained")

    monkeypatch.setattr(stages, "train", no_training)
    monkeypatch.setattr(stages, "evaluate_stage", no_training)
    assert _run(root, data) == report_path
    assert {path: path.stat().st_mtime_ns for path in watched} == before


def test_interrupted_cell_resumes_from_its_last_checkpoint(
    quick_table4: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, root, data = quick_table4
    cell = root / "table4" / "mask" / "seed1"
    distill = cell / "distill"
    checkpoints = distill / "checkpoints"
    names = sorted(p.name for p in checkpoints.glob("step_*"))
    assert names[-1] == "step_00000003" and "step_00000002" in names
    # the state a kill between the checkpoints of steps 2 and 3 leaves behind
    shutil.rmtree(checkpoints / names[-1])
    (checkpoints / "latest").write_text("step_00000002")
    for name in ("model.safetensors", "result.json"):
        (distill / name).unlink()
    (cell / "cell.json").unlink()
    calls = []
    original = losses.Objective.__call__

    def counting(self: losses.Objective, model: torch.nn.Module, batch: object) -> object:
        calls.append(1)
        return original(self, model, batch)

    monkeypatch.setattr(losses.Objective, "__call__", counting)
    _run(root, data)
    assert len(calls) == 1  # only step 3 was trained again
    record = json.loads((cell / "cell.json").read_text())
    assert record["metrics"]["student_AP"] >= 0 and math.isfinite(record["metrics"]["fnr"])
    assert (distill / "model.safetensors").is_file()
