"""InstanceAwarePixelContrast: equals the functional core, accepts real trainer outputs, rejects bad input."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from instcontrast import InstanceAwarePixelContrast, PixelMemoryBank
from instcontrast.functional import fused_probability, pixel_hinge, pixel_info_nce
from instcontrast.sampler import InstanceAwareSampler


def _batch(batch=2, dim=6, height=5, width=7, queries=4, classes=3, mask_size=(10, 14), seed=0):
    generator = torch.Generator().manual_seed(seed)
    z_weak = torch.randn(batch, dim, height, width, generator=generator)
    z_strong = torch.randn(batch, dim, height, width, generator=generator)
    mask_logits = torch.randn(batch, queries, *mask_size, generator=generator)
    class_logits = torch.randn(batch, queries, classes + 1, generator=generator)
    return z_weak, z_strong, mask_logits, class_logits


@pytest.mark.parametrize("loss_type", ["infonce", "hinge"])
def test_module_equals_functional_composition(loss_type: str) -> None:
    z_weak, z_strong, mask_logits, class_logits = _batch()
    crit = InstanceAwarePixelContrast(temperature=0.3, num_negatives=9, loss=loss_type)  # blocked chunked path
    out = crit(z_weak, z_strong, mask_logits, class_logits, generator=torch.Generator().manual_seed(5))

    # the same computation, spelled out with the functional core and the same random stream
    probs = fused_probability(mask_logits, class_logits, (5, 7)).reshape(70, -1)
    flat_weak = z_weak.permute(0, 2, 3, 1).reshape(70, 6)
    flat_strong = z_strong.permute(0, 2, 3, 1).reshape(70, 6)
    samples = InstanceAwareSampler(num_negatives=9)(probs, probs, torch.arange(70), generator=torch.Generator().manual_seed(5))
    assert torch.equal(samples.index, out.negative_index)
    if loss_type == "infonce":
        expected = pixel_info_nce(flat_weak, flat_strong, flat_strong, samples.index, temperature=0.3)
    else:
        expected = pixel_hinge(flat_weak, flat_strong, flat_strong, samples.index)
    torch.testing.assert_close(out.loss, expected)
    assert out.stats.num_anchors == 70 and out.stats.fallbacks == 0


def test_gradient_flows_to_weak_only_by_default_and_to_both_when_configured() -> None:
    z_weak, z_strong, mask_logits, class_logits = _batch()
    z_weak.requires_grad_()
    z_strong.requires_grad_()
    InstanceAwarePixelContrast(num_negatives=5)(z_weak, z_strong, mask_logits, class_logits).loss.backward()
    assert z_weak.grad is not None and z_strong.grad is None
    z_weak.grad = None
    InstanceAwarePixelContrast(num_negatives=5, detach_strong=False)(z_weak, z_strong, mask_logits, class_logits).loss.backward()
    assert z_weak.grad.abs().sum() > 0 and z_strong.grad.abs().sum() > 0


def test_backends_agree_inside_the_module() -> None:
    z_weak, z_strong, mask_logits, class_logits = _batch(batch=1, dim=3, height=1, width=13, queries=1, classes=1)
    grads = []
    for backend in ("reference", "chunked"):
        weak = z_weak.clone().requires_grad_()
        strong = z_strong.clone().requires_grad_()
        crit = InstanceAwarePixelContrast(num_negatives=7, backend=backend, detach_strong=False)
        out = crit(weak, strong, mask_logits, class_logits, generator=torch.Generator().manual_seed(1))
        out.loss.backward()
        grads.append((out.loss.detach(), weak.grad, strong.grad))
    for ref, chk in zip(*grads):
        torch.testing.assert_close(chk, ref)


def test_accepts_mask2former_dicts_and_transformers_outputs() -> None:
    z_weak, z_strong, mask_logits, class_logits = _batch()
    crit = InstanceAwarePixelContrast(num_negatives=4)
    raw = crit(z_weak, z_strong, mask_logits, class_logits, generator=torch.Generator().manual_seed(0)).loss
    as_dict = crit(z_weak, z_strong, {"pred_masks": mask_logits, "pred_logits": class_logits}, generator=torch.Generator().manual_seed(0)).loss
    hf_like = SimpleNamespace(masks_queries_logits=mask_logits, class_queries_logits=class_logits)
    as_object = crit(z_weak, z_strong, hf_like, generator=torch.Generator().manual_seed(0)).loss
    torch.testing.assert_close(as_dict, raw)
    torch.testing.assert_close(as_object, raw)


def test_valid_mask_restricts_anchors_and_negatives() -> None:
    z_weak, z_strong, mask_logits, class_logits = _batch()
    valid = torch.zeros(2, 5, 7, dtype=torch.bool)
    valid[0, :2] = True
    valid[1, 3:, 4:] = True
    out = InstanceAwarePixelContrast(num_negatives=6)(z_weak, z_strong, mask_logits, class_logits, valid=valid)
    assert out.stats.num_anchors == int(valid.sum()) == out.stats.pool_size
    assert set(out.anchor_index.tolist()) == set(valid.reshape(-1).nonzero().squeeze(1).tolist())
    assert out.negative_index.max() < int(valid.sum())


def test_max_anchors_subsamples() -> None:
    z_weak, z_strong, mask_logits, class_logits = _batch()
    out = InstanceAwarePixelContrast(num_negatives=3, max_anchors=11)(z_weak, z_strong, mask_logits, class_logits)
    assert out.stats.num_anchors == 11 and out.anchor_index.unique().numel() == 11


def test_uniform_strategy_needs_no_predictions() -> None:
    z_weak, z_strong, _, _ = _batch()
    out = InstanceAwarePixelContrast(num_negatives=5, strategy="uniform")(z_weak, z_strong)
    assert torch.isfinite(out.loss) and out.stats.fallbacks == 0
    assert abs(out.stats.acceptance - 0.5) < 0.05  # uniform = constant acceptance 0.5 (thinning)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_a_float32_loss_close_to_float32(dtype: torch.dtype) -> None:
    z_weak, z_strong, mask_logits, class_logits = _batch()
    crit = InstanceAwarePixelContrast(num_negatives=8)
    full = crit(z_weak, z_strong, mask_logits, class_logits, generator=torch.Generator().manual_seed(3))
    half = crit(z_weak.to(dtype), z_strong.to(dtype), mask_logits.to(dtype), class_logits.to(dtype), generator=torch.Generator().manual_seed(3))
    assert half.loss.dtype == torch.float32
    assert torch.isfinite(half.loss)
    assert abs(half.loss.item() - full.loss.item()) < 0.05


def test_channels_last_and_non_contiguous_inputs_match_contiguous() -> None:
    z_weak, z_strong, mask_logits, class_logits = _batch()
    crit = InstanceAwarePixelContrast(num_negatives=8)
    base = crit(z_weak, z_strong, mask_logits, class_logits, generator=torch.Generator().manual_seed(3)).loss
    channels_last = crit(
        z_weak.to(memory_format=torch.channels_last), z_strong.contiguous(memory_format=torch.channels_last),
        mask_logits.to(memory_format=torch.channels_last), class_logits, generator=torch.Generator().manual_seed(3),
    ).loss
    strided = crit(
        torch.stack([z_weak, z_weak], dim=2).flatten(1, 2)[:, ::2], z_strong.transpose(2, 3).contiguous().transpose(2, 3),
        mask_logits, class_logits, generator=torch.Generator().manual_seed(3),
    ).loss
    torch.testing.assert_close(channels_last, base)
    torch.testing.assert_close(strided, base)


def test_fnr_is_reported_with_instance_ids() -> None:
    z_weak, z_strong, mask_logits, class_logits = _batch()
    ids = torch.zeros(2, 10, 14, dtype=torch.long)  # one instance per image
    out = InstanceAwarePixelContrast(num_negatives=50)(z_weak, z_strong, mask_logits, class_logits, instance_ids=ids)
    # negatives from the other image are always other instances, so FNR is between 0 and 1
    assert out.stats.fnr is not None and 0.0 < out.stats.fnr < 1.0
    ignored = InstanceAwarePixelContrast(num_negatives=5, ignore_index=0)(z_weak, z_strong, mask_logits, class_logits, instance_ids=ids)
    assert ignored.stats.fnr is None  # every pixel ignored: undefined, not NaN


def test_empty_valid_mask_and_single_pixel_pool_give_a_defined_zero() -> None:
    z_weak, z_strong, mask_logits, class_logits = _batch()
    z_weak.requires_grad_()
    crit = InstanceAwarePixelContrast(num_negatives=5)
    out = crit(z_weak, z_strong, mask_logits, class_logits, valid=torch.zeros(2, 5, 7, dtype=torch.bool))
    assert out.loss.item() == 0.0 and out.stats.num_anchors == 0
    out.loss.backward()
    single = torch.zeros(2, 5, 7, dtype=torch.bool)
    single[0, 0, 0] = True
    assert crit(z_weak, z_strong, mask_logits, class_logits, valid=single).stats.num_anchors == 0


def test_one_instance_everywhere_falls_back_and_reports_it() -> None:
    z_weak, z_strong, _, _ = _batch()
    mask_logits = torch.zeros(2, 4, 5, 7)
    mask_logits[:, 0] = 50.0
    class_logits = torch.zeros(2, 4, 4)
    class_logits[:, :, 0] = 50.0
    out = InstanceAwarePixelContrast(num_negatives=5, max_rounds=2)(z_weak, z_strong, mask_logits, class_logits)
    assert torch.isfinite(out.loss)
    # identical predictions everywhere except across images (also identical) -> every score is 0
    assert out.stats.fallbacks == 70 * 5


def test_memory_bank_is_extra_pool() -> None:
    z_weak, z_strong, mask_logits, class_logits = _batch()
    bank = PixelMemoryBank(embedding_dim=6, prob_dim=4 + 4, size=100, pixels_per_step=None)
    crit = InstanceAwarePixelContrast(num_negatives=10, memory_bank=bank)
    first = crit(z_weak, z_strong, mask_logits, class_logits)
    assert first.stats.bank_candidates == 0 and int(bank.filled) == 70
    second = crit(z_weak, z_strong, mask_logits, class_logits)
    assert second.stats.bank_candidates == 70 and second.stats.pool_size == 70 + 70
    assert int(bank.filled) == 100 and int(bank.pointer) == 40
    crit.eval()
    crit(z_weak, z_strong, mask_logits, class_logits)
    assert int(bank.pointer) == 40  # eval mode does not enqueue


BAD_INPUTS = [
    (lambda z, s, m, c: (z[0], s[0], m, c), ValueError, "z_weak must have shape"),
    (lambda z, s, m, c: (z, s[:, :, :4], m, c), ValueError, "same shape"),
    (lambda z, s, m, c: (z, s, m[:1], c[:1]), ValueError, "batch size"),
    (lambda z, s, m, c: (z, s, m[:, :3], c), ValueError, "disagree on B or K"),
    (lambda z, s, m, c: (z, s, m, c[..., :1]), ValueError, "no-object"),
    (lambda z, s, m, c: (z * float("nan"), s, m, c), ValueError, "z_weak contains NaN"),
    (lambda z, s, m, c: (z, s * float("inf"), m, c), ValueError, "z_strong contains NaN or Inf"),
    (lambda z, s, m, c: (z, s, m * float("nan"), c), ValueError, "mask_logits contains NaN"),
    (lambda z, s, m, c: (z, s, m, None), ValueError, "needs mask_logits"),
    (lambda z, s, m, c: (z.long(), s, m, c), TypeError, "floating"),
    (lambda z, s, m, c: (z, s, "masks", None), TypeError, "mask_logits must be a tensor"),
]


@pytest.mark.parametrize(("mutate", "error", "message"), BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(mutate, error, message) -> None:
    args = mutate(*_batch())
    with pytest.raises(error, match=message):
        InstanceAwarePixelContrast(num_negatives=4)(*args)


def test_bad_valid_and_ids_raise() -> None:
    crit = InstanceAwarePixelContrast(num_negatives=4)
    with pytest.raises(ValueError, match=r"valid must have shape \(B, h, w\)"):
        crit(*_batch(), valid=torch.ones(2, 10, 14, dtype=torch.bool))
    with pytest.raises(TypeError, match="instance_ids must be an integer"):
        crit(*_batch(), instance_ids=torch.zeros(2, 5, 7))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0}, "temperature"),
        ({"num_negatives": 0}, "num_negatives"),
        ({"strategy": "random"}, "strategy"),
        ({"score": "cubic"}, "score"),
        ({"loss": "triplet"}, "loss"),
        ({"backend": "cuda"}, "backend"),
        ({"max_anchors": -1}, "max_anchors"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        InstanceAwarePixelContrast(**kwargs)


def test_loss_of_identical_embeddings_is_log_one_plus_r() -> None:
    z = torch.ones(1, 4, 3, 3)
    out = InstanceAwarePixelContrast(num_negatives=16, strategy="uniform")(z, z)
    assert math.isclose(out.loss.item(), math.log(17), rel_tol=1e-6)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # (B·h·w, D)


def _instance_keys(ids: torch.Tensor, height: int, width: int, ignore: int = -1) -> torch.Tensor:
    """Per feature pixel, a key unique across images (-1 = ignored), from nearest-resized ids."""
    resized = torch.nn.functional.interpolate(ids[:, None].double(), size=(height, width), mode="nearest")[:, 0].long()
    image = torch.arange(ids.shape[0])[:, None, None].expand_as(resized)
    keys = image * 1000 + resized
    return torch.where(resized == ignore, torch.full_like(keys, -1), keys).reshape(-1)


@pytest.mark.parametrize("loss_type", ["infonce", "hinge"])
def test_every_stats_field_and_the_loss_match_an_independent_computation(loss_type: str) -> None:
    z_weak, z_strong, mask_logits, class_logits = _batch(seed=4)
    z_weak, z_strong = 3 * z_weak, 0.5 * z_strong + 0.4 * z_weak  # non-unit, positives not parallel
    generator = torch.Generator().manual_seed(7)
    valid = torch.rand(2, 5, 7, generator=generator) > 0.2
    ids = torch.randint(0, 3, (2, 10, 14), generator=generator)
    ids[0, :2] = -1  # some ignored pixels
    crit = InstanceAwarePixelContrast(temperature=0.3, num_negatives=6, loss=loss_type, margin=0.4)
    out = crit(z_weak, z_strong, mask_logits, class_logits, valid=valid, instance_ids=ids, generator=generator)

    pool_rows = valid.reshape(-1).nonzero(as_tuple=True)[0]  # (M,)
    anchors = out.anchor_index  # (A,)
    index = out.negative_index  # (A, R) into the pool
    weak, strong = _unit(_flat(z_weak))[anchors], _unit(_flat(z_strong))
    positive_cos = (weak * strong[anchors]).sum(-1)  # (A,)
    negative_cos = (weak[:, None, :] * strong[pool_rows][index]).sum(-1)  # (A, R)
    stats = out.stats
    assert stats.num_anchors == stats.total_anchors == anchors.numel() == int(valid.sum())
    assert stats.pool_size == int(valid.sum()) and stats.bank_candidates == 0
    assert 0.0 < stats.acceptance <= 1.0 and stats.rounds >= 1
    assert stats.fallbacks == 0 and stats.fallback_anchors == 0
    assert stats.positive_cosine == pytest.approx(float(positive_cos.mean()), abs=1e-5)
    assert stats.negative_cosine == pytest.approx(float(negative_cos.mean()), abs=1e-5)
    assert stats.margin == pytest.approx(float(positive_cos.mean() - negative_cos.mean()), abs=1e-5)
    keys = _instance_keys(ids, 5, 7)
    anchor_keys, negative_keys = keys[anchors], keys[pool_rows][index]  # (A,), (A, R)
    countable = (anchor_keys[:, None] != -1) & (negative_keys != -1)
    same = countable & (negative_keys == anchor_keys[:, None])
    assert 0 < int(same.sum()) < int(countable.sum()) < index.numel()
    assert stats.fnr == pytest.approx(float(same.sum()) / float(countable.sum()), abs=1e-6)
    if loss_type == "infonce":
        logits = torch.cat([positive_cos[:, None], negative_cos], dim=1) / 0.3  # (A, 1 + R)
        expected = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
    else:
        expected = (0.4 - positive_cos[:, None] + negative_cos).clamp_min(0).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)


def test_false_negative_rate_with_bank_negatives_counts_them_as_other_instances() -> None:
    z_weak, z_strong, mask_logits, class_logits = _batch(seed=5)
    bank = PixelMemoryBank(embedding_dim=6, prob_dim=4 + 3 + 1, size=200, pixels_per_step=None)
    crit = InstanceAwarePixelContrast(num_negatives=8, memory_bank=bank)
    crit(z_weak, z_strong, mask_logits, class_logits)  # fills 70 bank rows
    ids = torch.zeros(2, 10, 14, dtype=torch.long)  # one instance per image, but a -1 stripe
    ids[:, :, :4] = -1
    out = crit.eval()(z_weak, z_strong, mask_logits, class_logits, instance_ids=ids, generator=torch.Generator().manual_seed(2))
    index = out.negative_index  # (70, 8): rows >= 70 are bank rows
    assert out.stats.bank_candidates == 70 and (index >= 70).any() and (index < 70).any()
    keys = _instance_keys(ids, 5, 7)  # batch pool = every pixel, in flat order
    bank_keys = -2 - torch.arange(70)  # bank rows: never anyone's instance, never ignored
    pool_keys = torch.cat([keys, bank_keys])
    anchor_keys, negative_keys = keys[out.anchor_index], pool_keys[index]
    countable = (anchor_keys[:, None] != -1) & (negative_keys != -1)
    same = countable & (negative_keys == anchor_keys[:, None])
    assert out.stats.fnr == pytest.approx(float(same.sum()) / float(countable.sum()), abs=1e-6)
    batch_only = countable & (index < 70)
    assert out.stats.fnr < float(same.sum()) / float(batch_only.sum())  # bank negatives dilute the rate


def test_the_generator_alone_decides_anchor_subsampling_and_negatives() -> None:
    z_weak, z_strong, mask_logits, class_logits = _batch(seed=6)
    crit = InstanceAwarePixelContrast(num_negatives=5, max_anchors=20)
    outs = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed + 100)  # the global stream must not matter
        outs.append(crit(z_weak, z_strong, mask_logits, class_logits, generator=torch.Generator().manual_seed(seed)))
    assert torch.equal(outs[0].anchor_index, outs[1].anchor_index) and torch.equal(outs[0].negative_index, outs[1].negative_index)
    assert not torch.equal(outs[0].anchor_index, outs[2].anchor_index)
    exact = InstanceAwarePixelContrast(num_negatives=5, max_anchors=70)(z_weak, z_strong, mask_logits, class_logits)
    assert exact.anchor_index.tolist() == list(range(70))  # max_anchors == valid pixels keeps them all, in order
