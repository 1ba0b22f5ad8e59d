"""Smoke test of ``benchmarks/bench_models.py``: the ``--smoke`` run (tiny models) writes a sane report.

The numbers are not checked (tiny models on a shared machine say nothing about speed); the structure
is: parameters from the meta device, positive FLOPs and times per size, the ratios when a student is
measured (or a note saying why not), and the JSON, Markdown and PNG files.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[2]

torch.set_num_threads(1)


def _load_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_models", ROOT / "benchmarks" / "bench_models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    bench = _load_benchmark()
    bench.main(["--smoke", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "bench_models.json").read_text(encoding="utf-8"))
    assert (tmp_path / "bench_models.png").stat().st_size > 0
    markdown = (tmp_path / "bench_models.md").read_text(encoding="utf-8")
    assert markdown.startswith("# Teacher vs student") and "|---" in markdown
    assert report["smoke"] is True and report["sizes"] == ["64x96"]
    teacher = report["models"]["teacher"]
    parameters = teacher["parameters"]
    assert parameters["total"] == parameters["detector"] + parameters["segmenter"] + parameters["projection"] > 0
    for role, record in report["models"].items():
        if record is None:
            assert any("No student measured" in note for note in report["notes"]), role
            continue
        for measured in record["sizes"].values():
            assert measured["flops"] > 0 and measured["repeats"] >= 1
            assert all(math.isfinite(t) and t > 0 for t in measured["times_s"])
    if report["models"]["student"] is not None:
        assert report["ratios"]["parameters"] > 0 and report["ratios"]["flops@64x96"] > 0


def test_ratios_divide_teacher_by_student() -> None:
    bench = _load_benchmark()
    teacher = {"parameters": {"total": 600}, "sizes": {"8x8": {"flops": 90, "median_s": 3.0}}}
    student = {"parameters": {"total": 50}, "sizes": {"8x8": {"flops": 9, "median_s": 0.5}}}
    assert bench.compute_ratios(teacher, student) == {"parameters": 12.0, "flops@8x8": 10.0, "latency@8x8": 6.0}
    assert bench.compute_ratios(teacher, None) == {}
