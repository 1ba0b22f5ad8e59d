"""Row layouts: ``pixel_rows`` and ``row_dot`` equal the obvious expressions, values and gradients."""

from __future__ import annotations

import pytest
import torch

from instcontrast.ops.rows import pixel_rows, row_dot

torch.set_num_threads(1)


@pytest.mark.parametrize("shape", [(3, 5, 7, 1), (1, 1, 1, 1), (2, 130, 4, 9)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pixel_rows_equal_the_permuted_reshape_values_and_gradients(shape, channels_last) -> None:
    z = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    fast, slow = z.clone().requires_grad_(), z.clone().requires_grad_()
    rows = pixel_rows(fast)
    reference = slow.permute(0, 2, 3, 1).reshape(-1, shape[1])
    assert torch.equal(rows, reference)
    upstream = torch.randn_like(reference)
    (rows * upstream).sum().backward()
    (reference * upstream).sum().backward()
    assert torch.equal(fast.grad, slow.grad)
    if z.numel() < 200:  # the numerical Jacobian is numel² entries
        assert torch.autograd.gradcheck(pixel_rows, (z.clone().requires_grad_(),))


def test_pixel_rows_of_a_channels_last_map_are_a_view() -> None:
    z = torch.randn(2, 4, 3, 5).contiguous(memory_format=torch.channels_last)
    assert pixel_rows(z).data_ptr() == z.data_ptr()
    assert pixel_rows(torch.randn(2, 4, 3, 5)).is_contiguous()


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_row_dot_equals_the_summed_product_values_and_gradients(needs) -> None:
    a, b = torch.randn(37, 11, dtype=torch.float64), torch.randn(37, 11, dtype=torch.float64)
    fast = [a.clone().requires_grad_(needs[0]), b.clone().requires_grad_(needs[1])]
    slow = [a.clone().requires_grad_(needs[0]), b.clone().requires_grad_(needs[1])]
    torch.testing.assert_close(row_dot(*fast), (slow[0] * slow[1]).sum(-1))
    upstream = torch.randn(37, dtype=torch.float64)
    (row_dot(*fast) * upstream).sum().backward()
    ((slow[0] * slow[1]).sum(-1) * upstream).sum().backward()
    for x, y, need in zip(fast, slow, needs, strict=True):
        assert (x.grad is None) == (not need)
        if need:
            torch.testing.assert_close(x.grad, y.grad)
    assert torch.autograd.gradcheck(row_dot, (a.clone().requires_grad_(), b.clone().requires_grad_()))
