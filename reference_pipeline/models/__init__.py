"""Segmentation models of the reference pipeline (student, teachers) and their shared interface."""

from .outputs import InstanceTargets, SegmentationOutput

__all__ = ["InstanceTargets", "SegmentationOutput"]
