"""Loss weights and step budgets each stage runs with: by default and in every shipped configuration.

The rules (paper Sec. 3 and Table 7; ``pipeline_config`` docstrings):

* teacher fine-tuning sees labeled data only (``λ_semi = 0``) but keeps the pixel term; teacher
  self-training and student distillation use the full objective (``λ_semi > 0``, ``λ_pxl > 0``);
* refinement and the supervised-only baseline are labeled-only: ``λ_semi = λ_pxl = 0``;
* the baseline sees exactly as many images as the student does in distill + refine:
  ``baseline.steps · baseline.batch = distill.steps · distill.batch + refine.steps · refine.batch``.

Checked on the defaults, every ``configs/*.yaml`` pipeline config, the CLI's ``--quick`` sizes, and
the ablation runner's base (and quick) pipeline.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reference_pipeline.ablate import load_ablation_config
from reference_pipeline.config import QUICK_OVERRIDES, PipelineConfig, load_pipeline_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ABLATIONS = CONFIGS / "ablations.yaml"


def _shipped() -> dict[str, PipelineConfig]:
    configs = {"defaults": PipelineConfig()}
    for path in sorted(CONFIGS.glob("*.yaml")):
        if path != ABLATIONS:
            configs[path.name] = load_pipeline_config(str(path))
    configs["demo.yaml --quick"] = load_pipeline_config(str(CONFIGS / "demo.yaml"), list(QUICK_OVERRIDES))
    ablation, pipeline = load_ablation_config(ABLATIONS)
    configs["ablations.yaml"] = load_pipeline_config(str(pipeline), list(ablation.overrides))
    configs["ablations.yaml --quick"] = load_pipeline_config(
        str(pipeline), [*ablation.overrides, *QUICK_OVERRIDES, *ablation.quick.overrides]
    )
    return configs


SHIPPED = _shipped()


def _images(stage) -> int:
    return stage.train.steps * stage.train.batch_size


def test_every_shipped_pipeline_config_is_checked() -> None:
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert names <= set(SHIPPED) and "demo.yaml" in names


@pytest.mark.parametrize("name", list(SHIPPED))
def test_refinement_is_labeled_only(name: str) -> None:
    refine = SHIPPED[name].refine
    assert (refine.lambda_semi, refine.lambda_pxl) == (0.0, 0.0)


@pytest.mark.parametrize("name", list(SHIPPED))
def test_supervised_baseline_is_labeled_only(name: str) -> None:
    baseline = SHIPPED[name].baseline
    assert (baseline.lambda_semi, baseline.lambda_pxl) == (0.0, 0.0)


@pytest.mark.parametrize("name", list(SHIPPED))
def test_supervised_baseline_sees_as_many_images_as_distill_plus_refine(name: str) -> None:
    cfg = SHIPPED[name]
    assert _images(cfg.baseline) == _images(cfg.distill) + _images(cfg.refine), (
        f"{name}: baseline {cfg.baseline.train.steps}x{cfg.baseline.train.batch_size}, distill "
        f"{cfg.distill.train.steps}x{cfg.distill.train.batch_size}, refine {cfg.refine.train.steps}x{cfg.refine.train.batch_size}"
    )


@pytest.mark.parametrize("name", list(SHIPPED))
def test_distillation_and_self_training_use_every_term_fine_tuning_no_pseudo_labels(name: str) -> None:
    cfg = SHIPPED[name]
    for stage in (cfg.distill, cfg.teacher_self_train):
        assert stage.lambda_semi > 0 and stage.lambda_pxl > 0
    assert cfg.teacher_finetune.lambda_semi == 0.0 and cfg.teacher_finetune.lambda_pxl > 0


def test_defaults_are_the_papers_table_7() -> None:
    cfg = PipelineConfig()
    assert (cfg.distill.lambda_semi, cfg.distill.lambda_pxl) == (1.0, 0.2)
    assert (cfg.teacher_self_train.lambda_semi, cfg.teacher_self_train.lambda_pxl) == (1.0, 0.2)
    assert (cfg.teacher_finetune.lambda_semi, cfg.teacher_finetune.lambda_pxl) == (0.0, 0.2)
    assert (cfg.distill.train.steps, cfg.refine.train.steps, cfg.baseline.train.steps) == (90000, 2000, 92000)
    contrast = cfg.contrast
    assert (contrast.temperature, contrast.num_negatives, contrast.strategy, contrast.score, contrast.loss) == (
        0.2, 256, "fusion", "linear", "infonce"
    )
    assert contrast.memory_bank == 0
    assert cfg.pseudo_labels.score_threshold == 0.3
