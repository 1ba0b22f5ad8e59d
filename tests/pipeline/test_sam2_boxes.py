"""SAM2 box prompts against one shared image embedding: the same masks and gradients as ``Sam2Model``,
without its per-box copies of the image features (issue 19)."""

from __future__ import annotations

import pytest
import torch
from transformers import Sam2Model

from reference_pipeline.models.sam2_boxes import decode_boxes
from reference_pipeline.models.tiny_configs import tiny_sam2_config

torch.set_num_threads(1)
SIZE = 64  # SAM2 input S; embeddings at S/4, S/8, S/16


def _setup(batch: int = 2, boxes: int = 5, seed: int = 0) -> tuple[Sam2Model, list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(seed)
    sam = Sam2Model(tiny_sam2_config(SIZE))
    channels, side = sam.config.mask_decoder_config.hidden_size, SIZE // 16
    embeddings = [torch.randn(batch, channels // 8, 4 * side, 4 * side), torch.randn(batch, channels // 4, 2 * side,
                  2 * side), torch.randn(batch, channels, side, side)]  # fmt: skip
    corner = torch.rand(batch, boxes, 2) * SIZE * 0.6
    return sam, embeddings, torch.cat([corner, corner + 4 + torch.rand(batch, boxes, 2) * SIZE * 0.4], dim=-1)


def _reference(sam: Sam2Model, boxes: torch.Tensor, embeddings: list[torch.Tensor]) -> torch.Tensor:
    return sam(image_embeddings=embeddings, input_boxes=boxes, multimask_output=False).pred_masks[:, :, 0]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval-dynamic-multimask"])
def test_masks_equal_sam2_models_own_decoding(training: bool) -> None:
    sam, embeddings, boxes = _setup()
    sam.train(training)
    expected = _reference(sam, boxes, embeddings)  # (B, n, S/4, S/4)
    got = decode_boxes(sam, boxes, embeddings)
    assert got.shape == expected.shape == (2, 5, SIZE // 4, SIZE // 4)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


def test_gradients_equal_for_the_decoder_and_the_image_embeddings() -> None:
    sam, embeddings, boxes = _setup()
    sam.train()
    leaves = [level.requires_grad_() for level in embeddings]
    params = [p for p in sam.mask_decoder.parameters()] + leaves
    weight = torch.randn(2, 5, SIZE // 4, SIZE // 4)
    expected = torch.autograd.grad((_reference(sam, boxes, embeddings) * weight).sum(), params, allow_unused=True)
    got = torch.autograd.grad((decode_boxes(sam, boxes, embeddings) * weight).sum(), params, allow_unused=True)
    assert [g is None for g in got] == [g is None for g in expected]
    scale = max(float(g.abs().max()) for g in expected if g is not None)
    for want, have in zip(expected, got):
        if want is not None:  # (attention key biases have a zero gradient: only rounding noise differs)
            torch.testing.assert_close(have, want, rtol=0, atol=1e-5 * scale)


def _saved_bytes(decode, boxes: int) -> int:
    """Bytes autograd keeps for the backward pass of decoding ``boxes`` boxes of one image."""
    sam, embeddings, prompts = _setup(batch=1, boxes=boxes)
    sam.train()
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        decode(sam, prompts, embeddings)
    return saved


def test_the_per_box_cost_no_longer_holds_copies_of_the_image_features() -> None:
    """Per box, ``Sam2Model``'s first block saves three copies of the ``C``-wide image tokens (the repeated
    embedding as the value input, embedding + positions as the key and as the image→token query input) and
    their projections; the shared decoding saves them once per image. (What stays per box, SAM2's per-prompt
    update of the image embedding and its upscaling, is the same in both.)"""
    channels, side = 32, SIZE // 16
    three_copies = 3 * channels * side**2 * 4  # bytes per box
    slope = {}
    for name, decode in (("sam2", _reference), ("shared", decode_boxes)):
        slope[name] = (_saved_bytes(decode, 12) - _saved_bytes(decode, 4)) / 8
    assert slope["shared"] <= slope["sam2"] - three_copies, slope
