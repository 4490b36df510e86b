"""The MaxMin layer against its formula and gradient; the fused pooling against the naive one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.layers import MaxMin, MaxMinPool, maxmin


def test_maxmin_matches_formula() -> None:
    x = torch.randn(4, 5, 7, 7)
    out = MaxMin()(x)
    assert out.shape == (4, 10, 7, 7)
    assert torch.equal(out[:, :5], x.clamp_min(0))
    assert torch.equal(out[:, 5:], (-x).clamp_min(0))
    # Presence and absence never fire together, and together they keep |x|.
    assert torch.all((out[:, :5] == 0) | (out[:, 5:] == 0))
    assert torch.allclose(out[:, :5] + out[:, 5:], x.abs())


def test_maxmin_gradient_reaches_both_halves() -> None:
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    (maxmin(x) * weights).sum().backward()
    # d/dx relu(x) = 1 where x > 0; d/dx relu(-x) = -1 where x < 0.
    expected = torch.where(x > 0, weights[:, :3], -weights[:, 3:])
    assert torch.allclose(x.grad, expected)
    assert torch.any(x.grad[x < 0] != 0) and torch.any(x.grad[x > 0] != 0)
    assert torch.autograd.gradcheck(maxmin, (x.detach().requires_grad_(),))


@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (1, 3, 15, 9), (3, 8, 5, 5), (1, 2, 3, 3)])
def test_fused_pool_equals_naive(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    naive = F.max_pool2d(torch.cat((F.relu(x1), F.relu(-x1)), 1), 3, 2, ceil_mode=True)
    fused = MaxMinPool(fused=True)(x2)
    assert torch.equal(naive, fused)
    assert torch.equal(MaxMinPool()(x), naive.detach())  # the per-device default
    g = torch.randn_like(naive)
    naive.backward(g)
    fused.backward(g)
    assert torch.allclose(x1.grad, x2.grad)


def test_unfused_pool_is_the_naive_order() -> None:
    x = torch.randn(2, 4, 12, 12)
    expected = F.max_pool2d(torch.cat((F.relu(x), F.relu(-x)), 1), 3, 2, ceil_mode=True)
    assert torch.equal(MaxMinPool(fused=False)(x), expected)
