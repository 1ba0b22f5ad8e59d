"""``run``: the whole method on one config, then ``report.md`` (``demo`` is ``run`` on ``configs/demo.yaml``).

Order (each step resumes / is skipped when its outputs exist in ``run_dir``):

1. open the data (the built-in dataset is generated once, under ``data.root``);
2. the teacher: a pipeline-model teacher is pretrained on its source once (cached beside the data);
   a foundation or ``transformers`` teacher is loaded from its local folders;
3. evaluate it zero-shot on the validation split;
4. stage 1 adapt-teacher, stage 2 distill, stage 3 refine, evaluating after each;
5. the supervised-only student with the same budget as distill + refine;
   steps 4's student side and 5 again for every further seed of ``student_seeds`` (shared teacher);
6. ``report.md`` (table + plots) in ``run_dir``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from . import stages
from .atomic import atomic_write_json, link_or_copy
from .config import PipelineConfig, save_config
from .engine import barrier, distributed_info
from .evaluate import resolution_ceiling
from .report import write_report

__all__ = ["run_method", "run_stages", "seed_run"]

logger = logging.getLogger(__name__)


def run_stages(cfg: PipelineConfig, *, resume: bool = True, progress: bool = True) -> dict[str, dict[str, float]]:
    """Every stage and the baseline, each evaluated; results saved to ``run_dir/evaluation.json``.

    Returns:
        Per evaluated model: its metrics (AP, AP50, parameters, latency) plus ``wall_time`` of its stage.
    """
    run = cfg.run_path
    if distributed_info().is_main:
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.yaml")
    results_file = run / "evaluation.json"
    results: dict[str, dict[str, float]] = json.loads(results_file.read_text()) if resume and results_file.is_file() else {}

    is_main = distributed_info().is_main

    def save_results() -> None:
        atomic_write_json(results_file, results, indent=2)

    def record(name: str, wall_time: float) -> None:
        if not is_main:  # evaluation and the report are rank 0's job under torchrun
            return
        if name not in results:
            metrics = stages.evaluate_stage(cfg, datasets, name, progress=progress)
            metrics["wall_time"] = wall_time
            results[name] = metrics
            save_results()
        logger.info("%s: mask AP %.2f, AP50 %.2f", name, results[name]["AP"], results[name]["AP50"])

    start = time.perf_counter()
    datasets = stages.load_datasets(cfg, progress=progress)
    logger.info("data: %d labeled, %d unlabeled, %d val images (%.1f s)", len(datasets.labeled), len(datasets.unlabeled),
                len(datasets.val), time.perf_counter() - start)
    ceiling_file = run / "resolution_ceiling.json"
    if is_main and not ceiling_file.is_file():
        stride = int(getattr(cfg.student, "mask_stride", 4))
        ceiling = resolution_ceiling((datasets.val[i] for i in range(len(datasets.val))), datasets.class_names,
                                     image_size=tuple(cfg.data.image_size), stride=stride)
        ceiling_file.write_text(json.dumps({**ceiling, "stride": stride}, indent=2))
    _, pretrain_time = stages.pretrained_teacher(cfg, datasets, progress=progress)
    timings_file = run / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    if pretrain_time > 0 and is_main:
        timings["teacher_pretrain"] = pretrain_time
        timings_file.write_text(json.dumps(timings))
    record("teacher_zero_shot", float(timings.get("teacher_pretrain", 0.0)))
    finetune, adapted = stages.adapt_teacher(cfg, datasets, resume=resume, progress=progress)
    record("teacher_finetune", finetune.wall_time)
    record("teacher_self_train", finetune.wall_time + adapted.wall_time)
    distilled = stages.distill(cfg, datasets, resume=resume, progress=progress)
    record("distill", distilled.wall_time)
    refined = stages.refine(cfg, datasets, resume=resume, progress=progress)
    record("refine", refined.wall_time)
    baseline = stages.supervised_baseline(cfg, datasets, resume=resume, progress=progress)
    record("baseline", baseline.wall_time)
    for offset in range(1, cfg.student_seeds):
        seed_cfg = seed_run(cfg, offset)
        for name, stage in (("distill", stages.distill), ("refine", stages.refine),
                            ("baseline", stages.supervised_baseline)):
            stage(seed_cfg, datasets, resume=resume, progress=progress)
            if is_main and f"{name}@seed{offset}" not in results:
                metrics = stages.evaluate_stage(seed_cfg, datasets, name, progress=progress)
                results[f"{name}@seed{offset}"] = {k: metrics[k] for k in ("AP", "AP50", "images")}
                save_results()
    return results


def seed_run(cfg: PipelineConfig, offset: int) -> PipelineConfig:
    """The run of student seed ``seed + offset`` in ``run_dir/seeds/seed<offset>``, sharing the adapted teacher.

    The adapted teacher's weights and its pseudo-labels are hard-linked (copied across file systems) from
    ``run_dir``, so every seed distils from the same teacher and labels.
    """
    folder = cfg.run_path / "seeds" / f"seed{offset}"
    if distributed_info().is_main:
        for shared in ("teacher_self_train/model.safetensors", "pseudo_labels_teacher_self_train.json"):
            if not (folder / shared).is_file():
                link_or_copy(cfg.run_path / shared, folder / shared)
    barrier(distributed_info())
    return replace(cfg, seed=cfg.seed + offset, run_dir=str(folder), student_seeds=1)


def run_method(cfg: PipelineConfig, *, resume: bool = True, progress: bool = True) -> Path:
    """Run :func:`run_stages` and write the report; returns the report's path."""
    start = time.perf_counter()
    results = run_stages(cfg, resume=resume, progress=progress)
    if not distributed_info().is_main:
        return cfg.run_path / "report.md"
    report = write_report(cfg, results, total_time=time.perf_counter() - start)
    logger.info("run finished in %.1f s; report at %s", time.perf_counter() - start, report)
    return report
