"""bench_pipeline.py runs at smoke size and reports what the issue asks for."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_pipeline.py"


@pytest.mark.slow
def test_bench_pipeline_smoke(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_pipeline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    payload = module.main(["--smoke", "--threads", "1", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path)])
    times = payload["step_time_s"]
    subsampled = f"with L_pxl, max_anchors={module.SUBSAMPLED_ANCHORS}"
    assert set(times) == {"with L_pxl", "without L_pxl", subsampled} and all(t > 0 for t in times.values())
    assert payload["contrastive_overhead"] == pytest.approx(times["with L_pxl"] / times["without L_pxl"])
    assert payload["contrastive_overhead_subsampled"] == pytest.approx(times[subsampled] / times["without L_pxl"])
    assert 0.0 < payload["second_view_share"] < 1.0
    assert payload["second_view_bf16_share"] > 0.0
    cosine = payload["second_view_bf16_cosine"]
    assert -1.0 <= cosine["min"] <= cosine["mean"] <= 1.0 and cosine["mean"] > 0.5  # the same embeddings, rounded
    assert 0.0 <= payload["data_time_share"] < 1.0
    assert payload["inference_images_per_s"] > 0
