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


@needs_kernel
@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 20), st.integers(8, 70),  # (d < 8: x's gradient cancels to ~0)
       st.sampled_from([(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, True)]),
       st.integers(0, 2**16))
@example(4, 16, 64, 128, (torch.bfloat16, True), 0)  # the default model's shapes under bf16 autocast
def test_norm_modulate_equals_reference_values_and_gradients(b, t, n, d, case, seed):
    """The compiled modulated LayerNorm == modulate(layer_norm(x)) in fp64 on the same inputs:
    fp32 rounding, or bf16 rounding where the output (under autocast) or the modulation is bf16."""
    mdtype, autocast = case
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(b, t, n, d, generator=g) + torch.randn(b, t, 1, d, generator=g)).requires_grad_()
    shift, scale = ((0.5 * torch.randn(b, t, 1, d, generator=g)).to(mdtype).requires_grad_() for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = pointwise.norm_modulate(x, shift, scale, 1e-6)
    assert y.dtype == (torch.bfloat16 if autocast else torch.float32) and y.shape == x.shape
    gy = torch.randn(y.shape, generator=g).to(y.dtype)
    grads = torch.autograd.grad(y, [x, shift, scale], gy)
    ref_in = [z.detach().double().requires_grad_() for z in (x, shift, scale)]
    y_ref = pointwise.modulate(F.layer_norm(ref_in[0], (d,), eps=1e-6), ref_in[1], ref_in[2])
    grads_ref = torch.autograd.grad(y_ref, ref_in, gy.double())
    low = autocast or mdtype == torch.bfloat16
    assert rel_err(y, y_ref) < (1e-2 if autocast else 1e-5)
    assert [z.dtype for z in grads] == [torch.float32, mdtype, mdtype]
    for a, r, name in zip(grads, grads_ref, ("x", "shift", "scale")):
        assert rel_err(a, r) < (1e-2 if low else 1e-4), name


@needs_kernel
def test_norm_modulate_falls_back_and_checks():
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    shift, scale = torch.randn(2, 3, 1, 8, dtype=torch.float64), torch.randn(2, 3, 1, 8, dtype=torch.float64)
    ref = pointwise.modulate(F.layer_norm(x, (8,), eps=1e-6), shift, scale)
    assert torch.equal(pointwise.norm_modulate(x, shift, scale, 1e-6), ref)  # (fp64: the torch path)
    per_token = torch.randn(2, 3, 4, 8)  # (a shift per token, not per frame: the torch path too)
    x32 = x.float()
    assert torch.allclose(pointwise.norm_modulate(x32, per_token, per_token, 1e-6),
                          pointwise.modulate(F.layer_norm(x32, (8,), eps=1e-6), per_token, per_token), atol=1e-6)
    k = pointwise.POINTWISE_KERNEL.module
    with pytest.raises(RuntimeError, match="whole frames"):
        k.norm_modulate_forward(torch.randn(5, 8), torch.randn(2, 8), torch.randn(2, 8), 2, 1e-6, False)
    with pytest.raises(RuntimeError, match="shift and scale"):
        k.norm_modulate_forward(torch.randn(4, 8), torch.randn(2, 8), torch.randn(3, 8), 2, 1e-6, False)


@needs_kernel
def test_fused_pointwise_switch_and_backward_across_it():
    """fused_pointwise(False) gives torch's operations; a forward that took the kernel gets its
    gradient from the kernel even where the backward runs inside the switch."""
    x = torch.randn(64, 33, requires_grad=True)
    y = pointwise.gelu_tanh(x)
    assert "gelu_tanh_cpu" in type(y.grad_fn).__name__
    with pointwise.fused_pointwise(False):
        assert not pointwise.pointwise_kernel_ready()
        y_torch = pointwise.gelu_tanh(x)
        assert "GeluBackward" in type(y_torch.grad_fn).__name__
        (gx,) = torch.autograd.grad(y.sum(), x)
    (gx_torch,) = torch.autograd.grad(y_torch.sum(), x)
    assert torch.allclose(gx, gx_torch, atol=1e-5)
    assert pointwise.pointwise_kernel_ready()


@needs_kernel
def test_gelu_far_negative_inputs_go_to_zero():
    """sigmoid is exactly 0 far below zero: GELU and its gradient there are 0, not x times exp's
    clamp (a review found gelu(-3e38) = -1.8 before), and -inf gives NaN as torch's does."""
    x = torch.tensor([-3e38, -1e12, -200.0], requires_grad=True)
    y = pointwise.gelu_tanh(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(y.detach().abs(), torch.zeros(3))
    assert torch.equal(gx[1:].abs(), torch.zeros(2))  # (at -3e38, x^3 overflows: NaN, as torch's gradient)
    assert torch.isnan(pointwise.gelu_tanh(torch.tensor([float("-inf")]))).all()


@needs_kernel
@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 5), n=st.integers(1, 20), h=st.integers(1, 4),
       hd=st.sampled_from([2, 8, 16, 32, 64]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_rope_qkv_equals_the_reference_values_and_gradients(b, t, n, h, hd, dtype, seed):
    """The fused rotary embedding == attention.apply_rope on the split q, k (v passed through), in
    fp64 arithmetic to fp32 / bf16 rounding; its gradient of qkv == autograd's through the reference,
    for any frames, tokens, heads and head size, positions far into an episode included."""
    from ssm_gym.model.attention import apply_rope, rope_tables

    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, t, n, 3, h, hd, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    pos = torch.randint(0, 100_000, (b, t), generator=g)
    cos, sin = rope_tables(pos, hd, 10000.0, torch.float32)
    q, k, v = pointwise.rope_qkv(qkv, cos.reshape(b, t, -1), sin.reshape(b, t, -1))
    grads = [torch.randn(b, t, n, h, hd, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]
    (gqkv,) = torch.autograd.grad((q, k, v), qkv, grads)

    ref_in = qkv.detach().double().requires_grad_()
    c64, s64 = rope_tables(pos, hd, 10000.0, torch.float64)
    qr, kr, vr = ref_in.unbind(3)
    ref = apply_rope(qr, c64, s64), apply_rope(kr, c64, s64), vr
    (gref,) = torch.autograd.grad(ref, ref_in, [gr.double() for gr in grads])
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for out, r in zip((q, k, v), ref):
        assert out.dtype == dtype and out.is_contiguous() and out.shape == (b, t, n, h, hd)
        assert rel_err(out, r) < tol
    assert gqkv.dtype == dtype and rel_err(gqkv, gref) < tol


@needs_kernel
def test_attention_takes_the_fused_rope_and_matches_torchs_path():
    """FrameLocalAttention's output, and its input gradient, are the same (to fp32 rounding) with
    the kernels switched off (torch's rotary embedding)."""
    from ssm_gym.model.attention import FrameLocalAttention

    torch.manual_seed(0)
    m = FrameLocalAttention(64, 2, 16, window=4)
    x = torch.randn(2, 6, 16, 64, requires_grad=True)
    pos = torch.arange(6)[None].expand(2, 6) + 1000
    outs = []
    for fused in (True, False):
        with pointwise.fused_pointwise(fused):
            assert pointwise.rope_qkv_applies(x) == fused
            y, _ = m(x, pos)
            (gx,) = torch.autograd.grad(y.square().sum(), x)
        outs.append((y, gx))
    (y1, g1), (y0, g0) = outs
    assert torch.allclose(y1, y0, atol=1e-5, rtol=1e-4) and torch.allclose(g1, g0, atol=1e-4, rtol=1e-4)
