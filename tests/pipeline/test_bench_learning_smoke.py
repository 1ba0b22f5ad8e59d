"""``benchmarks/bench_learning.py --smoke`` trains two settings for a few steps and writes a sane report."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.bench_learning import SETTINGS, final_layer, main


def test_bench_learning_smoke_writes_per_layer_curves_and_ceilings(tmp_path: Path) -> None:
    main(["--smoke", "--out", str(tmp_path), "--tag", "smoke"])
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert (tmp_path / "smoke.png").stat().st_size > 0
    markdown = (tmp_path / "smoke.md").read_text()
    assert markdown.startswith("# Learnability") and "|---" in markdown
    results = report["results"]
    assert [r["setting"]["name"] for r in results] == list(SETTINGS)[:2]
    for result in results:
        layers = result["setting"]["model_overrides"].get("decoder_layers", 3)
        assert [r["step"] for r in result["curve"]] == [2, 4]
        for record in result["curve"]:
            for split in ("source", "target"):
                assert list(record[split]) == ["q"] + [f"L{i}" for i in range(1, layers + 1)]
                assert all(0.0 <= v <= 100.0 for v in record[split].values())
                assert final_layer(record[split]) == record[split][f"L{layers}"]
        assert 0 < result["ceiling"]["source"] <= 100 and 0 < result["ceiling"]["target"] <= 100
        assert math.isfinite(result["seconds_per_step"]) and result["seconds_per_step"] > 0
    assert len(report["ceilings"]) == 2
    for row in report["ceilings"]:
        assert 0 < row["source"]["AP"] <= 100 and 0 < row["target"]["AP"] <= 100
    assert "## Resolution ceilings" in markdown
