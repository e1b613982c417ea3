"""The compiled GELU (ssm_gym/model/pointwise.py) against torch's, values and gradients."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import ssm_gym.model.pointwise as pointwise

needs_kernel = pytest.mark.skipif(not pointwise.pointwise_kernel_ready(), reason="the CPU GELU kernel could not be built")


def gelu_reference(x):
    """torch's tanh GELU, 0.5 x (1 + tanh(u)), written as the equal x sigmoid(2u): in the far
    negative tail 1 + tanh(u) cancels to a few ulps even in fp64, which x sigmoid(2u) does not."""
    u = (2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)
    return x * torch.sigmoid(2 * u)


def test_gelu_reference_is_torchs_gelu():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    assert torch.allclose(gelu_reference(x), F.gelu(x, approximate="tanh"), rtol=0, atol=1e-14)


def rel_err(a, b):
    """max|a - b| / max|b|, with differences below 1e-30 counted as none (far in the negative
    tail the kernel's sigmoid bottoms out at 6e-39 where the true value is smaller still)."""
    return ((a.double() - b).abs().max().item() - 1e-30) / b.abs().max().clamp(min=1e-300).item()


@needs_kernel
@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=4), st.sampled_from([torch.float32, torch.bfloat16]),
       st.integers(0, 2**16), st.floats(0.1, 30))
@example([4096, 2, 3], torch.bfloat16, 0, 3.0)  # (more than one chunk of the kernel, and a tail)
def test_gelu_equals_torch_values_and_gradients(shape, dtype, seed, scale):
    """Within fp32 rounding of fp64 torch (fp32), bf16 rounding (bf16), in x's dtype, any shape."""
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    y = pointwise.gelu_tanh(x)
    gy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    (gx,) = torch.autograd.grad(y, x, gy)
    xr = x.detach().double().requires_grad_()
    yr = gelu_reference(xr)
    (gxr,) = torch.autograd.grad(yr, xr, gy.double())
    assert y.dtype == gx.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(y, yr) < tol and rel_err(gx, gxr) < tol


@needs_kernel
def test_gelu_extremes_and_fallbacks(monkeypatch):
    x = torch.tensor([-1e4, -100.0, -10.0, 0.0, 10.0, 100.0, 1e4, float("inf")])
    assert torch.allclose(pointwise.gelu_tanh(x), F.gelu(x, approximate="tanh"), rtol=1e-6, atol=1e-30)
    assert torch.isnan(pointwise.gelu_tanh(torch.tensor([float("nan")]))).all()
    strided = torch.randn(6, 8)[:, ::2]  # (made contiguous for the kernel)
    assert torch.allclose(pointwise.gelu_tanh(strided), F.gelu(strided, approximate="tanh"), atol=1e-6)
    x64 = torch.randn(5, dtype=torch.float64)  # (fp64: torch's GELU)
    assert torch.equal(pointwise.gelu_tanh(x64), F.gelu(x64, approximate="tanh"))
    with pytest.raises(RuntimeError, match="grad of y must match"):
        pointwise.POINTWISE_KERNEL.module.gelu_backward(torch.randn(4), torch.randn(3))
    monkeypatch.setattr(pointwise.POINTWISE_KERNEL, "module", False)  # (no compiler: torch's GELU)
    x = torch.randn(7)
    assert torch.equal(pointwise.gelu_tanh(x), F.gelu(x, approximate="tanh"))
