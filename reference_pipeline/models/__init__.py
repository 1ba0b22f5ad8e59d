"""Segmentation models of the reference pipeline (student, teachers) and their shared interface.

The foundation teacher (:mod:`reference_pipeline.models.teacher`, Grounding-DINO + SAM2 through
``transformers``) is not imported here: import it from its module.
"""

from .demo import DEMO_STUDENT_NAME, DEMO_TEACHER_NAME, demo_student_config, demo_teacher_config
from .outputs import InstanceTargets, SegmentationOutput
from .student import ENCODERS, NECKS, Student, StudentConfig, count_parameters, load_efficientnet_lite_weights

__all__ = [
    "DEMO_STUDENT_NAME",
    "DEMO_TEACHER_NAME",
    "ENCODERS",
    "NECKS",
    "InstanceTargets",
    "SegmentationOutput",
    "Student",
    "StudentConfig",
    "count_parameters",
    "demo_student_config",
    "demo_teacher_config",
    "load_efficientnet_lite_weights",
]
