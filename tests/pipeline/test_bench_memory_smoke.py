"""``benchmarks/bench_memory.py --smoke``: every configuration runs in its own process and the report is sane."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.bench_memory import main, smoke_scale, specs_for


def test_bench_memory_smoke_measures_every_stage_component_and_slope(tmp_path: Path) -> None:
    main(["--smoke", "--out", str(tmp_path), "--tag", "smoke", "--threads", "1"])
    report = json.loads((tmp_path / "smoke.json").read_text())
    records = report["records"]
    assert [r["spec"]["name"] for r in records] == [s.name for s in specs_for(smoke_scale())]
    assert not [r["error"] for r in records if "error" in r]
    for record in records:
        assert record["peak_bytes"] >= record["before_step_bytes"] > 0, record["spec"]["name"]
    analysis = report["analysis"]
    assert set(analysis["stages"]) == {"teacher_finetune", "teacher_self_train", "pseudo_label", "distill", "refine"}
    assert all(stage["bytes"] and stage["bytes"] > 0 for stage in analysis["stages"].values())
    components = analysis["components"]
    for key in ("teacher_backbone", "student", "sam2_decoder_per_box_before", "sam2_decoder_per_box_after"):
        assert components[key] is not None and math.isfinite(components[key]), key
    dense, rle = components["pseudo_store_dense_per_image"], components["pseudo_store_rle_per_image"]
    assert dense > 10 * rle > 0  # the store measured with tracemalloc: RLE is a small fraction of dense
    markdown = (tmp_path / "smoke.md").read_text()
    assert markdown.startswith("# Peak memory per stage") and "## Components" in markdown and "|---" in markdown
