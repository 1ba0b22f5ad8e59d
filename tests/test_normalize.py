"""l2_normalize and the loss at extreme magnitudes: no overflow, no underflow, finite defined gradients,
and every dtype combination of embeddings × logits through the module.

NOTE: the float64-logits cases of ``test_every_dtype_combination_runs_through_the_module`` need the
sampler to accept float64 fused probabilities (issue 9 §3, fixed in ``instcontrast/sampler.py``).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from instcontrast import InstanceAwarePixelContrast, PixelMemoryBank
from instcontrast.functional import pixel_info_nce
from instcontrast.ops.normalize import l2_normalize

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def test_hand_computed_unit_vectors_and_zero_rows() -> None:
    x = torch.tensor([[3.0, -4.0], [0.0, 0.0], [0.0, 2e-3]])
    torch.testing.assert_close(l2_normalize(x), torch.tensor([[0.6, -0.8], [0.0, 0.0], [0.0, 1.0]]))


@pytest.mark.parametrize("magnitude", [1e-40, 1e-30, 1e19, 1e30, 3e38])
def test_any_finite_float32_magnitude_normalizes_to_the_same_unit_vector(magnitude: float) -> None:
    x = torch.tensor([[3.0, -4.0, 12.0]], dtype=torch.float64) / 13.0
    scaled = (x * magnitude).float()  # 1e-40 is subnormal in float32, 3e38 near its largest value
    unit = l2_normalize(scaled)
    torch.testing.assert_close(unit, x.float(), rtol=2e-2 if magnitude < 1e-38 else 1e-6, atol=0)


def test_float64_huge_and_tiny_vectors_normalize() -> None:
    x = torch.tensor([[1.0, 2.0, 2.0]], dtype=torch.float64)
    for magnitude in (1e-300, 1e300):
        torch.testing.assert_close(l2_normalize(x * magnitude), x / 3.0)


def test_gradient_is_the_projected_gradient_over_the_norm() -> None:
    x = torch.tensor([[3.0, 4.0]], requires_grad=True)
    grad_unit = torch.tensor([[1.0, 0.0]])
    l2_normalize(x).backward(grad_unit)
    unit = torch.tensor([[0.6, 0.8]])
    expected = (grad_unit - unit * 0.6) / 5.0  # (g - x̂⟨x̂, g⟩) / ‖x‖
    torch.testing.assert_close(x.grad, expected)


def test_gradcheck_float64() -> None:
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: l2_normalize(v), (x,))
    big = (torch.randn(3, 4, dtype=torch.float64) * 1e150).requires_grad_()
    # scale invariance: d x̂ / dx at c·x is (d x̂ / dx at x) / c
    l2_normalize(big).backward(torch.ones(3, 4, dtype=torch.float64))
    small = (big.detach() / 1e150).requires_grad_()
    l2_normalize(small).backward(torch.ones(3, 4, dtype=torch.float64))
    torch.testing.assert_close(big.grad * 1e150, small.grad)


def test_zero_vector_has_zero_gradient_and_leaves_other_rows_alone() -> None:
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]], requires_grad=True)
    l2_normalize(x).backward(torch.tensor([[5.0, -1.0, 2.0], [1.0, 0.0, 0.0]]))
    assert torch.equal(x.grad[0], torch.zeros(3))
    unit = torch.tensor([1.0, 2.0, 2.0]) / 3.0
    torch.testing.assert_close(x.grad[1], (torch.tensor([1.0, 0.0, 0.0]) - unit * unit[0]) / 3.0)


def test_half_precision_gradient_too_large_for_the_dtype_is_capped_keeping_its_direction() -> None:
    x16 = torch.tensor([[1e-6, -2e-6, 3e-7]], dtype=torch.float16, requires_grad=True)
    grad_unit = torch.tensor([[1.0, 1.0, -1.0]])
    l2_normalize(x16).backward(grad_unit)
    x32 = x16.detach().float().requires_grad_()
    l2_normalize(x32).backward(grad_unit)
    assert x32.grad.abs().max() > torch.finfo(torch.float16).max  # the true gradient does not fit float16
    assert torch.isfinite(x16.grad).all()
    assert float(x16.grad.float().abs().max()) == torch.finfo(torch.float16).max
    cosine = torch.nn.functional.cosine_similarity(x16.grad.float(), x32.grad, dim=1)
    assert float(cosine) > 0.999


def test_non_floating_input_is_refused() -> None:
    with pytest.raises(TypeError, match="floating"):
        l2_normalize(torch.ones(2, 3, dtype=torch.long))


def _module_inputs(dim: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    z_weak = torch.randn(2, dim, 4, 5, generator=generator)
    z_strong = torch.randn(2, dim, 4, 5, generator=generator)
    mask_logits = torch.randn(2, 3, 8, 10, generator=generator)
    class_logits = torch.randn(2, 3, 4, generator=generator)
    return z_weak, z_strong, mask_logits, class_logits


@pytest.mark.parametrize("magnitude", [1e-30, 1e19, 1e30])
def test_the_loss_does_not_depend_on_the_embeddings_magnitude(magnitude: float) -> None:
    z_weak, z_strong, mask_logits, class_logits = _module_inputs()
    crit = InstanceAwarePixelContrast(num_negatives=6)
    grads, losses = [], []
    for scale in (1.0, magnitude):
        weak = (z_weak * scale).requires_grad_()
        out = crit(weak, z_strong * scale, mask_logits, class_logits, generator=torch.Generator().manual_seed(1))
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(weak.grad * scale)  # x̂ is scale-invariant, so the gradient scales as 1 / scale
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_a_zero_embedding_pixel_gets_a_zero_gradient_and_the_rest_is_unchanged() -> None:
    z_weak, z_strong, mask_logits, class_logits = _module_inputs()
    z_weak[0, :, 1, 2] = 0.0
    weak = z_weak.clone().requires_grad_()
    out = InstanceAwarePixelContrast(num_negatives=6)(weak, z_strong, mask_logits, class_logits)
    out.loss.backward()
    assert torch.equal(weak.grad[0, :, 1, 2], torch.zeros(6))
    assert float(weak.grad.abs().max()) < 10.0  # before: 1e11 at the zero pixel


def test_a_zero_pool_row_gets_a_zero_gradient() -> None:
    anchors = torch.randn(3, 4, requires_grad=True)
    pool = torch.randn(5, 4)
    pool[2] = 0.0
    pool.requires_grad_()
    index = torch.tensor([[0, 2, 4], [2, 2, 1], [3, 0, 2]])
    pixel_info_nce(anchors, anchors.detach() + 0.1, pool, index, backend="chunked").backward()
    assert torch.equal(pool.grad[2], torch.zeros(4)) and pool.grad[[0, 1, 3, 4]].abs().sum() > 0


def test_tiny_half_precision_leaf_embeddings_get_finite_gradients() -> None:
    z_weak, z_strong, mask_logits, class_logits = _module_inputs()
    weak = (z_weak * 1e-6).half().requires_grad_()
    out = InstanceAwarePixelContrast(num_negatives=6)(weak, z_strong.half(), mask_logits, class_logits)
    out.loss.backward()
    assert weak.grad.dtype == torch.float16
    assert torch.isfinite(weak.grad).all() and weak.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("embedding_dtype", "logit_dtype"),
    list(itertools.product(DTYPES, DTYPES)),
    ids=[f"z-{str(e)[6:]}-logits-{str(lo)[6:]}" for e, lo in itertools.product(DTYPES, DTYPES)],
)
def test_every_dtype_combination_runs_through_the_module(embedding_dtype: torch.dtype, logit_dtype: torch.dtype) -> None:
    z_weak, z_strong, mask_logits, class_logits = _module_inputs()
    weak = z_weak.to(embedding_dtype).requires_grad_()
    strong = z_strong.to(embedding_dtype).requires_grad_()
    bank = PixelMemoryBank(embedding_dim=6, prob_dim=3 + 4, size=64, pixels_per_step=16)
    crit = InstanceAwarePixelContrast(num_negatives=6, memory_bank=bank, detach_strong=False)
    ids = torch.randint(0, 3, (2, 8, 10))
    for step in range(2):  # the second step also samples from the bank
        weak.grad = strong.grad = None
        out = crit(weak, strong, mask_logits.to(logit_dtype), class_logits.to(logit_dtype), instance_ids=ids,
                   generator=torch.Generator().manual_seed(step))
        out.loss.backward()
    expected_loss_dtype = torch.float64 if embedding_dtype == torch.float64 else torch.float32
    assert out.loss.dtype == expected_loss_dtype and torch.isfinite(out.loss)
    assert weak.grad.dtype == strong.grad.dtype == embedding_dtype
    assert torch.isfinite(weak.grad).all() and torch.isfinite(strong.grad).all()
    assert out.stats.fallbacks == 0 and out.stats.bank_candidates == 16 and out.stats.fnr is not None
    # the same call with float64 embeddings (same logits, so the same negatives): low precision only rounds
    reference = InstanceAwarePixelContrast(num_negatives=6)
    logits = (mask_logits.to(logit_dtype), class_logits.to(logit_dtype))
    low = reference(weak.detach(), strong.detach(), *logits, generator=torch.Generator().manual_seed(9))
    high = reference(weak.detach().double(), strong.detach().double(), *logits, generator=torch.Generator().manual_seed(9))
    assert torch.equal(low.negative_index, high.negative_index)
    torch.testing.assert_close(low.loss.double(), high.loss, rtol=1e-2, atol=1e-3)


def test_leading_dimensions_are_batch_dimensions() -> None:
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    grad_unit = torch.randn(2, 3, 4, dtype=torch.float64)
    l2_normalize(x).backward(grad_unit)
    flat = x.detach().reshape(6, 4).requires_grad_()
    l2_normalize(flat).backward(grad_unit.reshape(6, 4))
    torch.testing.assert_close(l2_normalize(x.detach()), l2_normalize(flat.detach()).reshape(2, 3, 4))
    torch.testing.assert_close(x.grad, flat.grad.reshape(2, 3, 4))
    assert torch.autograd.gradcheck(lambda v: l2_normalize(v), (x,))


def test_the_half_precision_cap_is_per_vector() -> None:
    # row 0 overflows float16 and is capped; row 1 fits and must keep its exact gradient
    x16 = torch.tensor([[1e-6, -2e-6, 3e-7], [1e-5, 5e-6, -5e-6]], dtype=torch.float16, requires_grad=True)
    grad_unit = torch.tensor([[1.0, 1.0, -1.0], [0.01, -0.02, 0.01]])
    l2_normalize(x16).backward(grad_unit)
    x32 = x16.detach().float().requires_grad_()
    l2_normalize(x32).backward(grad_unit)
    assert x32.grad[0].abs().max() > 65504 > x32.grad[1].abs().max()
    assert float(x16.grad[0].float().abs().max()) == 65504
    torch.testing.assert_close(x16.grad[1].float(), x32.grad[1], rtol=2e-3, atol=0)
