"""The no-grad second view of ``L_pxl`` computes only what the term reads: the same embeddings, faster.

``Student.embed`` runs encoder, neck and projection head without the decoder; ``losses.other_view_outputs``
uses it when a model has it and the full forward otherwise. The embeddings must be the very tensor
``forward(images).pixel_embeddings`` (train mode, batch-norm batch statistics included), so the loss
the paper defines is unchanged.
"""

from __future__ import annotations

import pytest
import torch

from reference_pipeline import losses
from reference_pipeline.models.outputs import SegmentationOutput
from reference_pipeline.models.student import Student, StudentConfig


def _tiny(**overrides) -> Student:
    config = StudentConfig(
        num_classes=3, encoder="efficientnet_lite0", encoder_weights=None, neck="fpn", neck_channels=32,
        hidden_dim=32, decoder_layers=2, num_queries=6, num_heads=4, feedforward_dim=64, projection_hidden_dim=16,
        embedding_dim=8, **overrides,
    )  # fmt: skip
    return Student(config)


@pytest.mark.parametrize("mask_stride", [4, 2])
@pytest.mark.parametrize("size", [(64, 64), (70, 45)], ids=["even", "odd"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_embed_equals_the_full_forwards_pixel_embeddings(mask_stride, size, train) -> None:
    torch.manual_seed(0)
    model = _tiny(mask_stride=mask_stride).train(train)
    images = torch.rand(3, 3, *size)
    with torch.no_grad():
        full = model(images).pixel_embeddings
        alone = model.embed(images)
    assert alone.shape == full.shape == (3, 8, -(-size[0] // 4), -(-size[1] // 4))
    torch.testing.assert_close(alone, full, rtol=0, atol=0)


def test_other_view_outputs_uses_embed_without_gradients() -> None:
    torch.manual_seed(1)
    model = _tiny().train()
    images = torch.rand(2, 3, 64, 64)
    out = losses.other_view_outputs(model, images)
    assert isinstance(out, SegmentationOutput)
    assert not out.pixel_embeddings.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(out.pixel_embeddings, model(images).pixel_embeddings, rtol=0, atol=0)
    assert out.mask_logits.shape == (2, 0, 16, 16) and out.class_logits.shape == (2, 0, 1)  # never read


def test_other_view_outputs_falls_back_to_the_full_forward() -> None:
    calls = []

    class NoEmbed(torch.nn.Module):
        def forward(self, images):
            calls.append(torch.is_grad_enabled())
            z = images[:, :2, ::4, ::4] * 2.0
            return SegmentationOutput(mask_logits=z, class_logits=z.new_zeros(z.shape[0], 2, 3), pixel_embeddings=z)

    images = torch.rand(2, 3, 16, 16)
    out = losses.other_view_outputs(NoEmbed(), images)
    assert calls == [False]
    torch.testing.assert_close(out.pixel_embeddings, images[:, :2, ::4, ::4] * 2.0)
