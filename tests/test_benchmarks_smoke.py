"""Smoke tests of the benchmark scripts: each ``--smoke`` run finishes and writes a sane report.

Every script runs once, in a subprocess with a temporary output folder and one torch thread (two
scripts at a time), and the tests check the JSON: the expected keys, every provider present,
finite positive times and rates, non-negative peak memory, skipped providers with a reason. The
numbers themselves are not checked: tiny shapes on a shared machine say nothing about speed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = ("bench_peers", "bench_scaling", "bench_loss", "bench_roofline", "bench_bank", "bench_confidence", "bench_envelope")
HAVE_PML = importlib.util.find_spec("pytorch_metric_learning") is not None
TIMEOUT_S = 300

pytestmark = pytest.mark.slow


def _run_script(name: str, out_dir: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("INSTCONTRAST_BACKEND", None)
    command = [sys.executable, str(BENCHMARKS / f"{name}.py"), "--smoke", "--threads", "1", "--device", "cpu", "--out", str(out_dir)]
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    return {"returncode": completed.returncode, "stdout": completed.stdout, "stderr": completed.stderr}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, Any], Path]]:
    """Run every script's smoke mode once (two at a time); name → (process result, output folder)."""
    out_dirs = {name: tmp_path_factory.mktemp(name) for name in SCRIPTS}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run_script, name, out_dirs[name]) for name in SCRIPTS}
        return {name: (future.result(), out_dirs[name]) for name, future in futures.items()}


def _report(smoke_runs: dict[str, tuple[dict[str, Any], Path]], name: str) -> dict[str, Any]:
    result, out_dir = smoke_runs[name]
    assert result["returncode"] == 0, f"{name} --smoke failed:\n{result['stdout'][-3000:]}\n{result['stderr'][-3000:]}"
    json_path, markdown_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    assert json_path.is_file() and markdown_path.is_file()
    markdown = markdown_path.read_text(encoding="utf-8")
    assert markdown.startswith("# ") and "|---" in markdown
    report = json.loads(json_path.read_text(encoding="utf-8"))
    assert report["benchmark"] == name
    assert {"environment", "config"} <= report.keys()
    assert report["environment"]["device"] == "cpu"
    return report


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_timing(timing: dict[str, Any]) -> None:
    assert _positive(timing["median_s"])
    assert timing["repeats_s"] and all(_positive(t) for t in timing["repeats_s"])


def _check_peak(value: Any) -> None:
    assert isinstance(value, int) and value >= 0, value


def _check_ratios(ratios: dict[str, Any], required: set[str]) -> None:
    assert required <= ratios.keys()
    for key in required:
        entry = ratios[key]
        assert {"value", "target", "meets_target", "description"} <= entry.keys()
        assert _positive(entry["value"]), (key, entry)


def test_bench_loss_smoke(smoke_runs: dict[str, tuple[dict[str, Any], Path]]) -> None:
    report = _report(smoke_runs, "bench_loss")
    providers = {p["name"]: p for p in report["providers"]}
    assert set(providers) == {
        "fusion+chunked", "fusion+reference", "uniform+chunked", "naive-full-matrix", "fusion+triton", "uniform+triton"
    }  # fmt: skip
    for name in ("fusion+chunked", "fusion+reference", "uniform+chunked", "naive-full-matrix"):
        provider = providers[name]
        assert provider["status"] == "ok", provider
        for phase in ("step", "sampler", "loss"):
            _check_timing(provider["time"][phase])
            _check_peak(provider["memory"]["peak_bytes"][phase])
        assert 0.0 <= provider["sampler_draw"]["fnr"] <= 1.0
    for name in ("fusion+triton", "uniform+triton"):
        assert providers[name]["status"] == "skipped" and "CUDA" in providers[name]["reason"]
    _check_ratios(
        report["ratios"],
        {"fusion_over_uniform_time_chunked", "chunked_over_reference_peak_memory_loss",
         "chunked_over_reference_peak_memory_step", "naive_over_fusion_time"},
    )  # fmt: skip


def test_bench_scaling_smoke(smoke_runs: dict[str, tuple[dict[str, Any], Path]]) -> None:
    report = _report(smoke_runs, "bench_scaling")
    points = report["points"]
    for sweep in ("anchors", "negatives"):
        for provider in ("ours", "naive-full-matrix"):
            chosen = [p for p in points if p["sweep"] == sweep and p["provider"] == provider]
            assert len(chosen) >= 2
            for point in chosen:
                assert point["status"] == "ok", point
                _check_timing(point["time"])
                _check_peak(point["peak_bytes"])
            fit = report["fits"][sweep][provider]
            assert isinstance(fit["time_exponent"], float) and math.isfinite(fit["time_exponent"])
    assert {"ours_time_exponent_anchors", "ours_time_exponent_negatives", "naive_time_exponent_anchors"} <= report["goals"].keys()
    png = smoke_runs["bench_scaling"][1] / "bench_scaling.png"
    assert png.is_file() and png.stat().st_size > 0


def test_bench_peers_smoke(smoke_runs: dict[str, tuple[dict[str, Any], Path]]) -> None:
    report = _report(smoke_runs, "bench_peers")
    providers = {p["name"]: p for p in report["providers"]}
    assert set(providers) == {"ours-fusion", "ours-uniform", "ours-fusion+bank", "naive-full-matrix", "pml-ntxent", "pml-ntxent+xbm"}
    ours_and_naive = ("ours-fusion", "ours-uniform", "ours-fusion+bank", "naive-full-matrix")
    pml = ("pml-ntxent", "pml-ntxent+xbm")
    for name in ours_and_naive + (pml if HAVE_PML else ()):
        provider = providers[name]
        assert provider["status"] == "ok", provider
        measured = [p for p in provider["points"] if p.get("time")]
        assert measured, provider
        for point in measured:
            _check_timing(point["time"])
            _check_peak(point["peak_bytes"])
        limit = provider["largest_within_budget"]
        assert _positive(limit["measured_pixels"]) and limit["estimate_method"]
        if provider["reference"] is not None:
            at = provider["at_largest_common_size"]
            assert _positive(at["time_ratio_vs_reference"]) and _positive(at["memory_ratio_vs_reference"])
    if not HAVE_PML:
        for name in pml:
            assert providers[name]["status"] == "skipped" and "pip install" in providers[name]["reason"]


def test_bench_roofline_smoke(smoke_runs: dict[str, tuple[dict[str, Any], Path]]) -> None:
    report = _report(smoke_runs, "bench_roofline")
    assert all(_positive(report["machine"][key]) for key in ("matmul_gflops", "gather_gbps"))
    assert _positive(report["sampler"]["proposals"])
    assert set(report["components"]) == {"sampler", "forward", "backward"}
    keys = ("flops", "flops_executed", "compute_bound_s", "measured_over_compute_bound", "gathered_bytes",
            "traffic_bound_s", "measured_over_traffic_bound", "achieved_gflops")  # fmt: skip
    for component in report["components"].values():
        _check_timing(component["time"])
        for key in keys:
            assert _positive(component[key]), (key, component)
    total = report["total"]
    for key in ("measured_s", "flops", "compute_bound_s", "measured_over_compute_bound", "traffic_bound_s", "gathered_bytes"):
        assert _positive(total[key])
    _check_peak(total["peak_memory_bytes"])
    assert report["goal"]["value"] == total["measured_over_compute_bound"]


def test_bench_bank_smoke(smoke_runs: dict[str, tuple[dict[str, Any], Path]]) -> None:
    report = _report(smoke_runs, "bench_bank")
    providers = report["providers"]
    assert [p["name"] for p in providers][0] == "fusion" and providers[1]["name"].startswith("fusion+bank")
    for provider in providers:
        assert provider["status"] == "ok", provider
        _check_timing(provider["time"]["step"])
        _check_peak(provider["memory"]["peak_bytes"]["step"])
    assert providers[1]["pool_size"] == providers[0]["pool_size"] + report["config"]["bank_size"]
    _check_ratios(report["ratios"], {"bank_over_none_time", "bank_over_none_peak_memory"})


def test_bench_confidence_smoke(smoke_runs: dict[str, tuple[dict[str, Any], Path]]) -> None:
    report = _report(smoke_runs, "bench_confidence")
    cases = {case["case"]: case for case in report["timing"]["cases"]}
    assert set(cases) == {f"scale={scale:g}" for scale in (0.03, 0.1, 0.3, 1.0, 5.0)} | {"mask2former-random-init"}
    for case in cases.values():
        _check_timing(case["fusion"])
        _check_timing(case["uniform"])
        assert _positive(case["fusion_over_uniform"])
        assert 0.0 < case["acceptance"] <= 1.0 and _positive(case["proposals_per_negative"])
        assert case["fallbacks"] == 0 and case["zero_pool_anchors"] == 0, case
    rows = report["memory_small"]["rows"]
    assert [row["scale"] for row in rows] == [0.03, 0.1, 0.3, 1.0, 5.0]
    for row in rows:
        assert not row["errors"], row
        for run in row["runs"]:
            _check_peak(run["peak_rss_bytes"])
            assert run["fallbacks"] == 0


def test_bench_envelope_smoke(smoke_runs: dict[str, tuple[dict[str, Any], Path]]) -> None:
    report = _report(smoke_runs, "bench_envelope")
    (case,) = report["cases"]
    rates = [case["sampler_acceptance"], case["norm_envelope_acceptance"], *case["principal_shared"].values(),
             *case["principal_per_anchor_weights"].values(), *case["per_anchor_ideal"].values()]
    assert all(0.0 < rate <= 1.0 for rate in rates), case
    # the computed norm envelope is the sampler's own: its acceptance matches what the sampler measures
    assert abs(case["sampler_acceptance"] - case["norm_envelope_acceptance"]) < 0.1, case
    assert set(case["per_anchor_ideal"]) == {"0", "2"}
    assert set(case["principal_shared"]) == set(case["principal_per_anchor_weights"]) == {"r=2, 32 rows"}
