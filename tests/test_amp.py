"""Mixed precision: the loss accumulates in float32 under autocast; nothing overflows."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from instcontrast import InstanceAwarePixelContrast


def _inputs(seed: int = 0, scale: float = 1.0):
    generator = torch.Generator().manual_seed(seed)
    features = scale * torch.randn(2, 12, 6, 7, generator=generator)
    head = torch.nn.Conv2d(12, 16, 1)
    mask_logits = scale * torch.randn(2, 5, 12, 14, generator=generator)
    class_logits = scale * torch.randn(2, 5, 4, generator=generator)
    return features, head, mask_logits, class_logits


def _step(features, head, mask_logits, class_logits, autocast: bool, backend: str = "chunked"):
    crit = InstanceAwarePixelContrast(num_negatives=16, backend=backend)
    head.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        z_weak = head(features)  # (B, D, h, w), bfloat16 under autocast
        z_strong = head(features + 0.1)
        logits = mask_logits @ torch.eye(mask_logits.shape[-1])  # a bfloat16 matmul under autocast
        out = crit(z_weak, z_strong, logits, class_logits, generator=torch.Generator().manual_seed(1))
    out.loss.backward()
    return out, z_weak.dtype, head.weight.grad.clone()


def test_bfloat16_autocast_loss_is_float32_and_close_to_float32_run() -> None:
    features, head, mask_logits, class_logits = _inputs()
    full, full_dtype, full_grad = _step(features, head, mask_logits, class_logits, autocast=False)
    mixed, mixed_dtype, mixed_grad = _step(features, head, mask_logits, class_logits, autocast=True)
    assert full_dtype == torch.float32 and mixed_dtype == torch.bfloat16
    assert mixed.loss.dtype == torch.float32
    assert abs(mixed.loss.item() - full.loss.item()) < 0.03 * full.loss.item()
    cosine = torch.nn.functional.cosine_similarity(mixed_grad.flatten(), full_grad.flatten(), dim=0)
    assert cosine > 0.98


def test_autocast_does_not_lower_the_precision_of_the_loss_math() -> None:
    features, head, mask_logits, class_logits = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = head(features).float()  # float32 input: the loss math must stay float32 inside autocast
        inside = InstanceAwarePixelContrast(num_negatives=16)(z, z + 0.01, mask_logits, class_logits, generator=torch.Generator().manual_seed(2))
    outside = InstanceAwarePixelContrast(num_negatives=16)(z, z + 0.01, mask_logits, class_logits, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(inside.loss, outside.loss)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(st.floats(1.0, 3e4), st.sampled_from(["chunked", "reference"]), st.integers(0, 1000))
def test_large_magnitudes_under_autocast_never_give_nan_or_inf(scale: float, backend: str, seed: int) -> None:
    features, head, mask_logits, class_logits = _inputs(seed, scale)
    out, _, grad = _step(features, head, mask_logits, class_logits, autocast=True, backend=backend)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert out.stats.margin == out.stats.margin  # not NaN
