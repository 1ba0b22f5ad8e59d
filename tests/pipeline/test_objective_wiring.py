"""Which view of which image enters one step of ``J = L_sup + λ_semi·L_semi + λ_pxl·L_pxl``, with or without gradients.

The spec (``losses.Objective``, paper Sec. 3): the *anchor* views — weak views of labeled images,
strong views of pseudo-labeled ones — go through the model with gradients; ``L_sup`` is the set
criterion on the labeled anchors against the weak views' ground truth, ``L_semi`` on the
pseudo-labeled anchors against the strong views' pseudo-labels. For ``L_pxl`` the *other* view of
each image (labeled strong, pseudo-labeled weak) goes through the model once more without
gradients, and the pixel term receives the anchor outputs as its weak side, the other views as its
strong side, with the geometry and ground-truth ids of the same views.

A recording model (outputs = weight × image values), criterion and pixel term stand in for the
real ones, so every recorded tensor names the view it came from (``stage_stubs.tagged_batch``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from instcontrast import InstanceAwarePixelContrast
from reference_pipeline import losses

_spec = importlib.util.spec_from_file_location("stage_stubs", Path(__file__).with_name("stage_stubs.py"))
stubs = sys.modules.setdefault("stage_stubs", importlib.util.module_from_spec(_spec))
if not hasattr(stubs, "TaggedModel"):
    _spec.loader.exec_module(stubs)

LW, LS, UW, US = ("labeled", "weak"), ("labeled", "strong"), ("unlabeled", "weak"), ("unlabeled", "strong")
PXL_VALUE = 100.0


@pytest.fixture
def pixel_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace the pixel term by a recorder returning ``PXL_VALUE`` (in the graph of the weak side)."""
    calls: list[dict[str, Any]] = []

    def recording(criterion, weak, strong, weak_geometry, strong_geometry, instance_ids=None, **kwargs):
        calls.append({"weak": weak, "strong": strong, "weak_geometry": weak_geometry,
                      "strong_geometry": strong_geometry, "instance_ids": instance_ids, "kwargs": kwargs})
        loss = PXL_VALUE + 0.0 * weak.pixel_embeddings.sum()
        return SimpleNamespace(loss=loss, stats=SimpleNamespace(margin=0.0, acceptance=1.0, fallbacks=0, fnr=None))

    monkeypatch.setattr(losses, "pixel_contrast_term", recording)
    return calls


def _objective(lambda_semi: float, lambda_pxl: float) -> tuple[losses.Objective, Any]:
    criterion = stubs.RecordingCriterion()
    contrast = InstanceAwarePixelContrast(num_negatives=4)
    return losses.Objective(criterion, contrast, lambda_semi, lambda_pxl), criterion


def test_anchor_views_are_labeled_weak_and_pseudo_labeled_strong_with_gradients(pixel_calls) -> None:
    batch = stubs.tagged_batch(labeled=2, unlabeled=3)
    model = stubs.TaggedModel(weight=1.5)
    objective, _ = _objective(1.0, 0.2)
    objective(model, batch)
    with_grad = [c for c in model.calls if c.grad_enabled]
    assert len(with_grad) == 1
    torch.testing.assert_close(with_grad[0].images, stubs.view_images(batch, LW, US), rtol=0, atol=0)


def test_the_other_view_of_each_image_goes_through_the_model_once_without_gradients(pixel_calls) -> None:
    batch = stubs.tagged_batch(labeled=2, unlabeled=3)
    model = stubs.TaggedModel(weight=1.5)
    objective, _ = _objective(1.0, 0.2)
    objective(model, batch)
    without_grad = [c for c in model.calls if not c.grad_enabled]
    assert len(without_grad) == 1
    torch.testing.assert_close(without_grad[0].images, stubs.view_images(batch, LS, UW), rtol=0, atol=0)


def test_pixel_term_gets_the_anchor_outputs_as_weak_side_and_the_other_views_as_strong_side(pixel_calls) -> None:
    batch = stubs.tagged_batch(labeled=2, unlabeled=3)
    model = stubs.TaggedModel(weight=1.5)
    objective, _ = _objective(1.0, 0.2)
    objective(model, batch)
    (call,) = pixel_calls
    weak, strong = call["weak"], call["strong"]
    expected_weak = 1.5 * stubs.view_images(batch, LW, US)[:, :, ::4, ::4]
    expected_strong = 1.5 * stubs.view_images(batch, LS, UW)[:, :, ::4, ::4]
    torch.testing.assert_close(weak.pixel_embeddings.detach(), expected_weak)
    torch.testing.assert_close(strong.pixel_embeddings, expected_strong)
    assert weak.pixel_embeddings.requires_grad  # the anchors carry the gradient
    assert not strong.pixel_embeddings.requires_grad  # the other view is a detached target
    assert not torch.equal(weak.pixel_embeddings.detach(), strong.pixel_embeddings)  # really two views


def test_pixel_term_geometry_and_ids_belong_to_the_views_they_describe(pixel_calls) -> None:
    batch = stubs.tagged_batch(labeled=2, unlabeled=3)
    objective, _ = _objective(1.0, 0.2)
    objective(stubs.TaggedModel(), batch)
    (call,) = pixel_calls
    for side, views in (("weak_geometry", (LW, US)), ("strong_geometry", (LS, UW))):
        boxes, flips = stubs.view_geometry(batch, *views)
        torch.testing.assert_close(call[side].boxes, boxes, rtol=0, atol=0)
        assert torch.equal(call[side].flips, flips), side
    assert torch.equal(call["instance_ids"], stubs.view_ids(batch, LW, US))  # ids of the anchor views


def test_supervised_term_sees_labeled_anchors_and_weak_targets_semi_term_pseudo_labeled_anchors_and_strong_targets(
    pixel_calls,
) -> None:
    batch = stubs.tagged_batch(labeled=2, unlabeled=3)
    objective, criterion = _objective(1.0, 0.2)
    objective(stubs.TaggedModel(weight=1.0), batch)
    sup, semi = criterion.calls
    torch.testing.assert_close(sup["output"].pixel_embeddings.detach(), stubs.view_images(batch, LW)[:, :, ::4, ::4])
    torch.testing.assert_close(semi["output"].pixel_embeddings.detach(), stubs.view_images(batch, US)[:, :, ::4, ::4])
    assert [t.class_ids.tolist() for t in sup["targets"]] == [[stubs.VIEW_CLASS[LW]]] * 2
    assert [t.class_ids.tolist() for t in semi["targets"]] == [[stubs.VIEW_CLASS[US]]] * 3
    for got, masks in zip(sup["targets"], batch.labeled.weak.masks):
        assert torch.equal(got.masks.bool(), masks)


@pytest.mark.parametrize(("lambda_semi", "lambda_pxl"), [(1.0, 0.2), (0.5, 0.0), (0.0, 0.7), (2.0, 0.1)])
def test_objective_is_sup_plus_weighted_semi_plus_weighted_pxl(pixel_calls, lambda_semi, lambda_pxl) -> None:
    batch = stubs.tagged_batch(labeled=2, unlabeled=3)
    objective, _ = _objective(lambda_semi, lambda_pxl)
    loss, logs = objective(stubs.TaggedModel(), batch)
    sup, semi = stubs.CRITERION_VALUE[0], stubs.CRITERION_VALUE[3]
    assert float(loss.detach()) == pytest.approx(sup + lambda_semi * semi + lambda_pxl * PXL_VALUE)
    assert loss.requires_grad
    assert logs["sup"] == pytest.approx(sup)


def test_zero_weights_skip_their_terms_and_the_second_forward(pixel_calls) -> None:
    batch = stubs.tagged_batch(labeled=2, unlabeled=3)
    model = stubs.TaggedModel()
    objective, criterion = _objective(0.0, 0.0)
    loss, logs = objective(model, batch)
    assert len(model.calls) == 1 and not pixel_calls  # no pixel term: no forward of the other views
    assert len(criterion.calls) == 1  # L_sup only
    assert "semi" not in logs and "pxl" not in logs
    assert float(loss.detach()) == pytest.approx(stubs.CRITERION_VALUE[0])


def test_labeled_only_batch_uses_the_labeled_views_alone(pixel_calls) -> None:
    batch = stubs.tagged_batch(labeled=2, unlabeled=None)
    model = stubs.TaggedModel()
    objective, criterion = _objective(1.0, 0.2)
    objective(model, batch)
    anchors, others = model.calls
    assert anchors.grad_enabled and not others.grad_enabled
    torch.testing.assert_close(anchors.images, stubs.view_images(batch, LW), rtol=0, atol=0)
    torch.testing.assert_close(others.images, stubs.view_images(batch, LS), rtol=0, atol=0)
    assert len(criterion.calls) == 1
    (call,) = pixel_calls
    assert torch.equal(call["instance_ids"], stubs.view_ids(batch, LW))
