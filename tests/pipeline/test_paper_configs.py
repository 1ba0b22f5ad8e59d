"""The paper's configs at their defaults: what stopped `docs/reproduce.rst` before (issue 19), one test per cause.

The end-to-end runs of every documented command on tiny stand-ins are in ``test_reproduce_commands.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from reference_pipeline.config import TrainConfig
from reference_pipeline.engine import build_optimizer
from reference_pipeline.models.teacher import DEFAULT_TRAINABLE, FoundationTeacher, TeacherConfig
from reference_pipeline.models.tiny_configs import tiny_teacher_components
from reference_pipeline.pseudo_labels import pseudo_label, resize_mask_logits

CLASSES = ("car", "person")


def _teacher(**overrides: object) -> FoundationTeacher:
    components = tiny_teacher_components(CLASSES)
    config = TeacherConfig(class_names=CLASSES, num_queries=4, embedding_dim=8, detector_shortest_edge=None,
                           **overrides)  # type: ignore[arg-type]  # fmt: skip
    return FoundationTeacher.from_configs(config, components.detector_config, components.segmenter_config,
                                          components.tokenizer)  # fmt: skip


# ---- 1. stage 1 with the teacher's default trainable parts -------------------------------------------


def test_the_default_teacher_builds_an_optimizer_without_its_frozen_backbones_and_without_bert() -> None:
    teacher = _teacher()
    assert teacher.config.trainable == DEFAULT_TRAINABLE
    optimizer = build_optimizer(teacher, TrainConfig(), teacher.parameter_groups())
    assert [group["name"] for group in optimizer.param_groups] == ["decoder"]  # the backbones are all frozen
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    bert = list(teacher.detector.model.text_backbone.parameters())
    assert bert and not any(id(p) in optimized for p in bert)
    assert not any(p.requires_grad for p in bert)
    trainable = {id(p) for p in teacher.parameters() if p.requires_grad}
    assert optimized == trainable


def test_a_trained_backbone_gets_the_encoder_learning_rate_and_bert_only_when_asked() -> None:
    teacher = _teacher(trainable=(*DEFAULT_TRAINABLE, "segmenter_backbone"))
    optimizer = build_optimizer(teacher, TrainConfig(lr_encoder=1e-5, lr_decoder=1e-4), teacher.parameter_groups())
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == {"encoder": 1e-5, "decoder": 1e-4}
    assert not any(p.requires_grad for p in teacher.detector.model.text_backbone.parameters())


def test_a_model_with_nothing_to_train_and_an_empty_group_are_refused() -> None:
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        build_optimizer(model, TrainConfig())
    with pytest.raises(ValueError, match="nothing to train"):
        build_optimizer(model, TrainConfig(), {"encoder": [model.weight], "decoder": [model.bias]})
    with pytest.raises(ValueError, match="'decoder' is empty"):
        linear = nn.Linear(2, 2)
        build_optimizer(linear, TrainConfig(), {"encoder": [linear.weight, linear.bias], "decoder": []})


# ---- 4. teacher outputs of an image run below its native size ---------------------------------------


def test_logits_of_a_resized_input_are_mapped_back_to_the_native_image() -> None:
    native, model_input = (128, 256), (64, 128)
    logits = torch.full((1, 16, 32), -10.0)  # stride 4 of the 64x128 input
    logits[0, 4:8, 8:16] = 10.0  # input pixels [16, 32) x [32, 64) -> native [32, 64) x [64, 128)
    with pytest.raises(ValueError, match="model input of 128x256"):
        resize_mask_logits(logits, native, stride=4)  # the native size alone does not fit the grid
    mask = resize_mask_logits(logits, native, stride=4, input_size=model_input)[0] > 0  # (128, 256)
    assert mask.shape == native
    expected = torch.zeros(native, dtype=torch.bool)
    expected[32:64, 64:128] = True
    assert (mask ^ expected).float().mean() < 0.01  # only the bilinear edge differs
    assert mask[40:56, 72:120].all() and not mask[:28].any() and not mask[:, :60].any()


def test_pseudo_labels_of_a_resized_input_are_at_the_native_size() -> None:
    logits = torch.full((2, 16, 32), -10.0)
    logits[0, 2:6, 2:10] = 10.0
    classes = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])  # query 1 is no-object
    labels = pseudo_label(logits, classes, (128, 256), input_size=(64, 128))
    assert labels.targets.masks.shape == (1, 128, 256)
    area = int(labels.targets.masks.sum())
    assert math.isclose(area, 32 * 64, rel_tol=0.05)  # a 16x32 region of the input, doubled each way
