"""The student feeds ``transformers``' Mask2Former decoder module the way ``Mask2FormerModel`` does.

``Mask2FormerModel`` hands its ``Mask2FormerTransformerModule`` the pixel decoder's three multi-scale features
coarse → fine (strides 32, 16, 8) and stride-4 mask features, and ``Mask2FormerForUniversalSegmentation`` predicts
classes from the layer-normed intermediate hidden states. These tests pin each of those inputs. Whether the decoder
layers then improve on the prediction made before any of them is a matter of training settings, measured by
``benchmarks/bench_learning.py`` (its smoke run is ``test_bench_learning_smoke.py``).
"""

from __future__ import annotations

import math

import pytest
import torch

from reference_pipeline.models.student import Student, StudentConfig


def _tiny(**overrides) -> Student:
    config = StudentConfig(
        num_classes=3, encoder="efficientnet_lite0", encoder_weights=None, neck="fpn", neck_channels=32,
        hidden_dim=32, decoder_layers=2, num_queries=6, num_heads=4, feedforward_dim=64, projection_hidden_dim=16,
        embedding_dim=8, **overrides,
    )
    return Student(config).eval()


def _capture_decoder_inputs(model: Student) -> dict:
    seen: dict = {}

    def hook(module, args, kwargs):
        seen["levels"] = [tuple(level.shape[-2:]) for level in kwargs["multi_scale_features"]]
        seen["mask_features"] = tuple(kwargs["mask_features"].shape[-2:])

    model.decoder.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("mask_stride", [4, 2])
def test_decoder_levels_are_coarse_to_fine_and_mask_features_are_finest(mask_stride: int) -> None:
    model = _tiny(mask_stride=mask_stride)
    seen = _capture_decoder_inputs(model)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 128, 96))
    assert seen["levels"] == [(4, 3), (8, 6), (16, 12)]  # strides 32, 16, 8, as Mask2Former's pixel decoder
    assert seen["mask_features"] == (128 // mask_stride, 96 // mask_stride)
    assert out.mask_logits.shape[-2:] == (128 // mask_stride, 96 // mask_stride)
    assert out.pixel_embeddings.shape[-2:] == (32, 24)  # embeddings stay at stride 4


def test_fine_decoder_levels_are_strides_16_8_4() -> None:
    model = _tiny(decoder_levels="fine")
    seen = _capture_decoder_inputs(model)
    with torch.no_grad():
        model(torch.rand(1, 3, 128, 96))
    assert seen["levels"] == [(8, 6), (16, 12), (32, 24)]


def test_class_logits_come_from_the_layer_normed_hidden_state_of_each_stage() -> None:
    model = _tiny()
    captured = {}
    model.decoder.register_forward_hook(lambda module, args, output: captured.setdefault("decoded", output))
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
    states = captured["decoded"].intermediate_hidden_states  # already layer-normed, as transformers documents
    stages = [a["class_queries_logits"] for a in out.aux_outputs] + [out.class_logits]
    assert len(stages) == len(states) == model.config.decoder_layers + 1
    for logits, state in zip(stages, states):
        torch.testing.assert_close(logits, model.class_head(state.transpose(0, 1)))
    # the final stage is the output of the last layer, not of the initial queries
    assert not torch.allclose(stages[0], stages[-1])


def test_mask_stride_and_decoder_levels_are_validated() -> None:
    with pytest.raises(ValueError, match="mask_stride"):
        StudentConfig(num_classes=2, mask_stride=3)
    with pytest.raises(ValueError, match="decoder_levels"):
        StudentConfig(num_classes=2, decoder_levels="middle")


def test_selected_queries_point_at_the_image_and_every_parameter_gets_a_gradient() -> None:
    model = _tiny(query_init="selected").train()
    out = model(torch.rand(2, 3, 64, 64))
    loss = out.mask_logits.mean() + out.class_logits.mean() + out.pixel_embeddings.mean()
    loss = loss + sum(a["masks_queries_logits"].mean() + a["class_queries_logits"].mean() for a in out.aux_outputs)
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    with torch.no_grad():  # different images, different initial queries (learned queries would be identical)
        first = model.eval()(torch.rand(2, 3, 64, 64)).aux_outputs[0]["class_queries_logits"]
    assert not torch.allclose(first[0], first[1])


def test_fpn_levels_are_group_normalised_like_mask2formers_pixel_decoder() -> None:
    model = _tiny()
    with torch.no_grad():
        features = model.encoder(torch.rand(2, 3, 64, 64) * 4 - 2)
        levels = model.neck(features, None)
    for level in levels:  # GroupNorm (affine at its init): every group of every image has mean 0, variance 1
        groups = level.reshape(2, 32, -1)  # 32 channels, gcd(32, 32) = 32 groups of one channel
        torch.testing.assert_close(groups.mean(-1), torch.zeros(2, 32), atol=1e-4, rtol=0)
        torch.testing.assert_close(groups.var(-1, unbiased=False), torch.ones(2, 32), atol=0.1, rtol=0)  # eps on 2x2 maps
    plain = _tiny(neck_norm="none")
    with torch.no_grad():
        raw = plain.neck(plain.encoder(torch.rand(2, 3, 64, 64) * 4 - 2), None)
    assert not torch.allclose(raw[0].reshape(2, 32, -1).var(-1), torch.ones(2, 32), atol=0.2)


def test_decoder_layers_are_initialised_as_transformers_initialises_mask2former() -> None:
    from transformers import Mask2FormerConfig
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerMaskedAttentionDecoderLayer

    def fc1(model: Student) -> torch.Tensor:
        layer = next(m for m in model.decoder.modules() if isinstance(m, Mask2FormerMaskedAttentionDecoderLayer))
        return layer.fc1.weight

    xavier_bound = math.sqrt(6 / (32 + 64))  # fc1: 32 -> 64; PyTorch's default bound would be 1/sqrt(32) = 0.177
    assert fc1(_tiny()).abs().max() > 0.9 * xavier_bound > 1.2 / math.sqrt(32)
    assert fc1(_tiny(decoder_init="torch")).abs().max() <= 1 / math.sqrt(32)
    cross = next(m for m in _tiny().decoder.modules() if isinstance(m, Mask2FormerMaskedAttentionDecoderLayer))
    assert torch.count_nonzero(cross.cross_attn.in_proj_bias) == 0
    assert Mask2FormerConfig().init_xavier_std == 1.0  # the gain transformers uses
