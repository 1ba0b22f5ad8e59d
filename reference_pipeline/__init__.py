"""Reference pipeline: semi-supervised teacher -> student distillation for instance segmentation.

A thin, readable pipeline that wires :mod:`instcontrast` into the three-stage distillation of a
vision foundation model (teacher adaptation, knowledge transfer, student refinement) and evaluates
with COCO mask AP. Data loading and evaluation live in :mod:`reference_pipeline.data` and
:mod:`reference_pipeline.evaluate`.
"""
