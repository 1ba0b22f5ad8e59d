"""The stage names: one table, so that command, config section, run folder and report row agree.

A module of its own, free of heavy imports, so the command line can offer the names without loading
PyTorch models; :mod:`reference_pipeline.config` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["STAGES", "Stage", "stage"]


@dataclass(frozen=True)
class Stage:
    """One trained model of the method. Its ``name`` is its config section, its folder under ``run_dir``,
    its row in ``report.md`` and ``evaluation.json``, and the ``--stage`` value of ``evaluate`` /
    ``predict`` / ``export``.

    Attributes:
        name: the stage's name.
        command: the command that trains it (``python -m reference_pipeline <command>``).
        model: ``"teacher"`` or ``"student"``.
        label: the report's row label.
        description: what the model is.
    """

    name: str
    command: str
    model: Literal["teacher", "student"]
    label: str
    description: str


#: The stages, in pipeline order. ``teacher_zero_shot`` is the teacher before adaptation (evaluated, not trained
#: by a stage; a pipeline-model teacher gets there through ``teacher_pretrain``, cached outside ``run_dir``).
STAGES: tuple[Stage, ...] = (
    Stage("teacher_zero_shot", "adapt-teacher", "teacher", "zero-shot teacher",
          "the teacher before adaptation: no training on the labeled split"),
    Stage("teacher_finetune", "adapt-teacher", "teacher", "fine-tuned teacher",
          "stage 1a: the teacher fine-tuned on the labeled split"),
    Stage("teacher_self_train", "adapt-teacher", "teacher", "adapted teacher",
          "stage 1b: re-initialised from the zero-shot teacher, trained on labeled + pseudo-labeled data"),
    Stage("distill", "distill", "student", "distilled student",
          "stage 2: the student on labeled + pseudo-labeled data with the pixel contrastive term"),
    Stage("refine", "refine", "student", "refined student", "stage 3: the distilled student fine-tuned on labeled data"),
    Stage("baseline", "baseline", "student", "supervised-only student",
          "the student on labeled data only, with the budget of distill + refine"),
)


def stage(name: str) -> Stage:
    """The :data:`STAGES` entry called ``name``.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
    """
    for entry in STAGES:
        if entry.name == name:
            return entry
    raise ValueError(f"unknown stage {name!r}; expected one of {[s.name for s in STAGES]}")
