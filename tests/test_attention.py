"""Frame-local attention: mask, window, cache (ring buffer / growing / token pool) == parallel form."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ssm_gym.model.attention as attention_module
from ssm_gym.model.attention import FrameLocalAttention, TokenPool, apply_rope, rope_tables



N_TOK, D, HEADS = 6, 32, 4


def dense_reference(m, x, window):
    """Attention over the flattened clip with an explicit (T*N x T*N) frame-window mask."""
    b, t, n, d = x.shape
    hd = d // HEADS
    pos = torch.arange(t)[None].expand(b, t)
    q, k, v = m.qkv(x).reshape(b, t, n, 3, HEADS, hd).unbind(3)
    cos, sin = rope_tables(pos, hd, m.rope_base, q.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    fi = torch.arange(t).repeat_interleave(n)
    allowed = fi[None, :] <= fi[:, None]
    if window is not None:
        allowed &= fi[:, None] - fi[None, :] < window
    heads = lambda z: z.permute(0, 3, 1, 2, 4).reshape(b, HEADS, t * n, hd)
    y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=allowed)
    return m.proj(y.reshape(b, HEADS, t, n, hd).permute(0, 2, 3, 1, 4).reshape(b, t, n, d))


def frame_by_frame(m, x, pos, keep=None, denoise_first=False):
    """Outputs of feeding x (B, T, N, D) one frame at a time with an in-place cache, and the cache."""
    cache, ys = m.init_cache(x.shape[0]), []
    for i in range(x.shape[1]):
        if denoise_first:
            m(torch.randn_like(x[:, i:i + 1]), pos[:, i:i + 1], cache, update="none")
        yi, cache = m(x[:, i:i + 1], pos[:, i:i + 1], cache, update="inplace",
                      keep=None if keep is None else keep[:, i:i + 1])
        ys.append(yi)
    return torch.cat(ys, 1), cache


def clip_with_keep_flags(window, keep_p, t, offsets, seed):
    """A module, a clip x (B, T, N, D) of envs starting at frame ``offsets``, their frame indices
    and random keep flags (each token kept with probability ``keep_p``)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = FrameLocalAttention(D, HEADS, N_TOK, window=window)
    x = torch.randn(len(offsets), t, N_TOK, D, generator=g)
    pos = torch.tensor(offsets)[:, None] + torch.arange(t)
    keep = torch.rand(len(offsets), t, N_TOK, generator=g) < keep_p
    return m, x, pos, keep


@pytest.mark.parametrize("window,chunk", [(1, None), (3, None), (3, 2), (10, None), (10, 4), (None, 4), (None, 32)])
def test_parallel_matches_dense_mask(window, chunk):
    torch.manual_seed(0)
    m = FrameLocalAttention(D, HEADS, N_TOK, window=window, chunk_frames=chunk)
    x = torch.randn(2, 13, N_TOK, D)
    y, _ = m(x, torch.arange(13)[None].expand(2, 13))
    torch.testing.assert_close(y, dense_reference(m, x, window), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [1, 2, 4, None])
@pytest.mark.parametrize("grad", [True, False])  # without autograd, local windows take the in-place step path
def test_cache_steps_and_pieces_equal_parallel(window, grad):
    torch.manual_seed(0)
    m = FrameLocalAttention(D, HEADS, N_TOK, window=window, chunk_frames=3)
    t = 11
    x = torch.randn(2, t, N_TOK, D)
    pos = torch.arange(t)[None].expand(2, t)
    y, _ = m(x, pos)
    with torch.set_grad_enabled(grad):
        # with a denoising pass before each step (scratch write, no update): must not change what follows
        ys, cache = frame_by_frame(m, x, pos, denoise_first=True)
    torch.testing.assert_close(ys, y, rtol=1e-4, atol=1e-5)
    if window is not None:
        assert cache.k.shape[1] == window  # ring buffer: constant size (k-1 past frames + the next one's slot)
    cache, ys = m.init_cache(2), []
    for a, b in [(0, 4), (4, 5), (5, 11)]:
        yi, cache = m(x[:, a:b], pos[:, a:b], cache, update="copy")
        ys.append(yi)
    torch.testing.assert_close(torch.cat(ys, 1), y, rtol=1e-4, atol=1e-5)


def test_update_none_leaves_cache_untouched():
    m = FrameLocalAttention(D, HEADS, N_TOK, window=4)
    cache = m.init_cache(2)
    x = torch.randn(2, 1, N_TOK, D)
    _, c2 = m(x, torch.zeros(2, 1, dtype=torch.long), cache, update="none")
    assert c2 is cache and (cache.pos == -1).all()


@pytest.mark.parametrize("window", [2, 5])
def test_window_respected(window):
    torch.manual_seed(0)
    m = FrameLocalAttention(D, HEADS, N_TOK, window=window)
    t = 12
    x = torch.randn(1, t, N_TOK, D)
    pos = torch.arange(t)[None]
    y, _ = m(x, pos)
    last = t - 1
    old = x.clone()
    old[:, : last - window + 1] = torch.randn_like(old[:, : last - window + 1])  # older than the window
    assert torch.equal(m(old, pos)[0][:, last], y[:, last])
    inside = x.clone()
    inside[:, last - window + 1] += 1.0  # oldest frame inside the window
    assert not torch.allclose(m(inside, pos)[0][:, last], y[:, last])
    future = x.clone()
    future[:, last] += 1.0
    assert torch.equal(m(future, pos)[0][:, : last], y[:, : last])  # causal over frames


def test_full_attention_sees_everything_and_cache_grows():
    torch.manual_seed(0)
    m = FrameLocalAttention(D, HEADS, N_TOK, window=None)
    t = 40
    x = torch.randn(1, t, N_TOK, D)
    pos = torch.arange(t)[None]
    y, _ = m(x, pos)
    x2 = x.clone()
    x2[:, 0] += 1.0
    assert not torch.allclose(m(x2, pos)[0][:, -1], y[:, -1])
    cache = m.init_cache(1, capacity=4)
    for i in range(t):
        _, cache = m(x[:, i:i + 1], pos[:, i:i + 1], cache, update="inplace")
    assert cache.k.shape[1] >= t and int(cache.pos.max()) == t - 1


def test_rope_is_relative_in_time():
    hd = 8
    q, k = torch.randn(1, 1, 1, 1, hd), torch.randn(1, 1, 1, 1, hd)
    def score(pq, pk):
        cq, sq = rope_tables(torch.tensor([[pq]]), hd, 1e4, q.dtype)
        ck, sk = rope_tables(torch.tensor([[pk]]), hd, 1e4, k.dtype)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()
    torch.testing.assert_close(score(5, 2), score(1_000_005, 1_000_002), rtol=1e-4, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(window=st.integers(1, 6), keep_p=st.sampled_from([0.0, 0.3, 0.7, 1.0]), t=st.integers(1, 14),
       offsets=st.lists(st.integers(0, 20), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_step_path_with_dropped_tokens_equals_parallel(window, keep_p, t, offsets, seed):
    """The in-place step (ring in place, visible tokens gathered when many are dropped) == the
    parallel form with the same keep flags, for envs at different episode positions."""
    m, x, pos, keep = clip_with_keep_flags(window, keep_p, t, offsets, seed)
    with torch.no_grad():
        y, _ = m(x, pos, keep=keep)
        ys, _ = frame_by_frame(m, x, pos, keep)
    torch.testing.assert_close(ys, y, rtol=1e-4, atol=1e-5)


def test_step_refuses_a_ring_out_of_step():
    m = FrameLocalAttention(D, HEADS, N_TOK, window=4)
    cache = m.init_cache(1)
    x = torch.randn(1, 1, N_TOK, D)
    with torch.no_grad():
        m(x, torch.tensor([[5]]), cache, update="inplace")
        with pytest.raises(RuntimeError, match="window"):
            m(x, torch.tensor([[1]]), cache, update="inplace")  # frame 1 (same slot) after frame 5


@settings(max_examples=30, deadline=None)
@given(window=st.sampled_from([1, 2, 3, 6, None]), keep_p=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
       t=st.integers(1, 14), offsets=st.lists(st.integers(0, 20), min_size=1, max_size=3),
       switch=st.integers(0, 14), slack=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_token_pool_steps_equal_parallel(window, keep_p, t, offsets, switch, slack, seed):
    """Frame by frame on a token pool (a denoising pass before each frame, the pool starting from
    the ring at frame ``switch``, growing on demand and compacted between frames) == the parallel
    form with the same keep flags; the pool turned back into a ring holds what the ring holds."""
    m, x, pos, keep = clip_with_keep_flags(window, keep_p, t, offsets, seed)
    cache = m.init_cache(len(offsets))
    with torch.no_grad():
        y, _ = m(x, pos, keep=keep)
        ys = []
        for i in range(t):
            if i == min(switch, t - 1):  # (a full-attention ring may have grown: the one returned)
                cache = TokenPool.from_ring(cache, slack if i > 0 else 0)  # (from empty: grows at once)
            m(torch.randn_like(x[:, i:i + 1]), pos[:, i:i + 1], cache, update="none")
            yi, cache = m(x[:, i:i + 1], pos[:, i:i + 1], cache, update="inplace", keep=keep[:, i:i + 1])
            if isinstance(cache, TokenPool):
                cache.compact_(slack)
                assert int(cache.used().max()) <= ((window or t + 1) - 1) * N_TOK  # only frames still in view
            ys.append(yi)
        _, ring_ref = frame_by_frame(m, x, pos, keep)
    torch.testing.assert_close(torch.cat(ys, 1), y, rtol=1e-4, atol=1e-5)
    if isinstance(cache, TokenPool) and window is not None:
        back = cache.to_ring(ring_ref.pos.shape[1], window)
        stored = ring_ref.keep & (ring_ref.pos >= 0)[..., None]
        assert torch.equal(back.keep, stored)
        torch.testing.assert_close(back.k[stored], ring_ref.k[stored])


def test_token_pool_refuses_clips_autograd_and_lossy_shrinks():
    m = FrameLocalAttention(D, HEADS, N_TOK, window=4)
    pool = TokenPool.from_ring(m.init_cache(1), 2)
    with torch.no_grad():
        m(torch.randn(1, 1, N_TOK, D), torch.tensor([[0]]), pool, update="inplace")  # stores N_TOK tokens
    with pytest.raises(ValueError, match="cannot shrink"):
        pool.resize_(N_TOK - 1)
    with pytest.raises(ValueError, match="one frame per call"):
        m(torch.randn(1, 2, N_TOK, D), torch.tensor([[0, 1]]), pool, update="inplace")
    with pytest.raises(ValueError, match="autograd"):
        m(torch.randn(1, 1, N_TOK, D), torch.tensor([[0]]), pool, update="inplace")


# -- the fused CPU kernel for bf16 training (csrc/attention_cpu.cpp) --------------------------
needs_attention_kernel = pytest.mark.skipif(attention_module.attention_kernel() is None,
                                            reason="no AVX-512 BF16 attention kernel on this machine")


def window_reference(q, k, v, window, kx=None, vx=None):
    """fp32 attention of (BH, T, N, hd) sequences over an explicit frame-window mask; with kx, vx
    (noised copies) the clean frames strictly before and the copy's own frame of kx/vx."""
    bh, t, n, hd = q.shape
    flat = lambda z: z.float().reshape(bh, t * n, hd)
    fi = torch.arange(t).repeat_interleave(n)
    qi, ki = fi[:, None], fi[None, :]
    allowed = (ki > qi - window) & ((ki < qi) if kx is not None else (ki <= qi))
    keys, vals, mask = flat(k), flat(v), allowed
    if kx is not None:
        keys, vals = torch.cat([keys, flat(kx)], 1), torch.cat([vals, flat(vx)], 1)
        mask = torch.cat([allowed, qi == ki], 1)
    y = F.scaled_dot_product_attention(flat(q), keys, vals, attn_mask=mask)
    return y.reshape(bh, t, n, hd)


def rel_err(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@needs_attention_kernel
@settings(max_examples=30, deadline=None)
@given(bh=st.integers(1, 3), t=st.integers(1, 14), n=st.sampled_from([16, 32, 64]), hd=st.sampled_from([16, 32, 64]),
       window=st.integers(1, 12), copies=st.booleans(), seed=st.integers(0, 2**16))
def test_fused_kernel_equals_reference(bh, t, n, hd, window, copies, seed):
    """Output and every input's gradient of the kernel == fp32 attention on the same bf16 inputs,
    to bf16's rounding (the kernel multiplies bf16 pairs, accumulates in fp32, rounds P to bf16)."""
    g = torch.Generator().manual_seed(seed)
    ins = [torch.randn(bh, t, n, hd, generator=g).bfloat16() for _ in range(5 if copies else 3)]
    dout = torch.randn(bh, t, n, hd, generator=g).bfloat16()
    fused = [x.clone().requires_grad_(True) for x in ins]
    y = attention_module.window_attention_cpu(*fused[:3], window, *fused[3:])
    (y.float() * dout.float()).sum().backward()
    ref = [x.float().requires_grad_(True) for x in ins]
    yr = window_reference(*ref[:3], window, *ref[3:])
    (yr * dout.float()).sum().backward()
    assert y.dtype == torch.bfloat16 and y.shape == yr.shape
    assert rel_err(y, yr) < 1e-2
    for a, r in zip(fused, ref):
        if r.grad.abs().max() == 0:  # (keys no query sees: copies with window 1 see only their own frame)
            assert a.grad.abs().max() == 0
        else:
            assert rel_err(a.grad, r.grad) < 1e-2


@needs_attention_kernel
@pytest.mark.parametrize("window", [1, 3, 10])
def test_module_fused_path_is_as_accurate_as_torch_bf16(window, monkeypatch):
    """FrameLocalAttention under bf16 autocast on a CPU takes the kernel for a clip (forward and
    forward_paired, with gradients); against the fp32 module it errs no more than torch's own bf16
    attention does. In fp32, with past frames or with compression it never takes the kernel."""
    torch.manual_seed(window)
    m = FrameLocalAttention(64, 2, 16, window=window)
    x, xn = torch.randn(2, 12, 16, 64), torch.randn(2, 12, 16, 64)
    pos = torch.arange(12)[None].expand(2, 12)

    def run(dtype):
        xs = [x.clone().requires_grad_(True), xn.clone().requires_grad_(True)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y, _ = m(xs[0], pos)
            yc, yn, _ = m.forward_paired(xs[0], xs[1], pos)
        (y.float().square().sum() + yn.float().square().sum() + yc.float().sum()).backward()
        return [y, yn] + [z.grad for z in xs]

    calls = []
    real = attention_module.window_attention_cpu
    monkeypatch.setattr(attention_module, "window_attention_cpu", lambda *a, **k: calls.append(1) or real(*a, **k))
    exact = run(torch.float32)
    assert not calls  # fp32: torch's attention
    fused = run(torch.bfloat16)
    assert len(calls) == 3  # the clip, then the clean frames and their copies of forward_paired
    monkeypatch.setattr(attention_module, "_attention_kernel_usable", False)
    torch_bf16 = run(torch.bfloat16)
    assert len(calls) == 3
    for f, tb, e in zip(fused, torch_bf16, exact):
        assert rel_err(f, e) < max(2 * rel_err(tb, e), 1e-2)
    monkeypatch.setattr(attention_module, "_attention_kernel_usable", True)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        _, cache = m(x[:, :4], pos[:, :4], m.init_cache(2), update="copy")  # a first piece (empty ring): the kernel
        assert len(calls) == 4
        m(x[:, 4:], pos[:, 4:], cache)  # a piece after cached frames: torch's attention (window 1 caches none)
        assert len(calls) == (5 if window == 1 else 4)
        m(x, pos, keep=torch.rand(2, 12, 16) < 0.5)  # compression: torch's attention
    assert len(calls) == (5 if window == 1 else 4)


@needs_attention_kernel
@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), slots=st.integers(1, 10), n=st.sampled_from([16, 32, 64]), h=st.integers(1, 3),
       hd=st.sampled_from([16, 32, 64]), seed=st.integers(0, 2**16))
def test_fused_step_kernel_equals_reference(b, slots, n, h, hd, seed):
    """One frame against a bf16 ring (inference): == fp32 attention over the visible slots' tokens."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, h, hd, generator=g).bfloat16()
    k, v = (torch.randn(b, slots, n, h, hd, generator=g).bfloat16() for _ in range(2))
    visible = torch.rand(b, slots, generator=g) < 0.6
    visible[torch.arange(b), torch.randint(0, slots, (b,), generator=g)] = True  # (its own slot, at least)
    y = attention_module.attention_kernel().step_forward(q, k, v, visible)
    for i in range(b):
        keys, vals = (z[i][visible[i]].reshape(-1, h, hd).transpose(0, 1).float() for z in (k, v))
        ref = F.scaled_dot_product_attention(q[i].transpose(0, 1).float(), keys, vals).transpose(0, 1)
        assert rel_err(y[i], ref) < 1e-2


@needs_attention_kernel
def test_step_takes_the_fused_kernel_in_bf16_as_accurately_as_torch(monkeypatch):
    """Frame-by-frame inference under bf16 autocast over a bf16 ring takes the kernel (not with
    an fp32 ring, nor with dropped tokens); against fp32 it errs no more than torch's bf16 path."""
    torch.manual_seed(0)
    m = FrameLocalAttention(64, 2, 16, window=4)
    x = torch.randn(2, 9, 16, 64)
    pos = torch.arange(9)[None].expand(2, 9)
    calls = []
    real = attention_module.attention_kernel()

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def step_forward(self, *a):
            calls.append(1)
            return real.step_forward(*a)

    monkeypatch.setattr(attention_module.ATTENTION_KERNEL, "module", Spy())

    def steps(fused, dtype=torch.bfloat16, keep=None):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), attention_module.fused_attention(fused):
            y, _ = frame_by_frame_cache(m, x, pos, m.init_cache(2, dtype=dtype), keep)
        return y

    with torch.no_grad():
        exact, _ = m(x, pos)
    fused = steps(True)
    assert len(calls) == 9
    torch_bf16 = steps(False)
    assert len(calls) == 9
    assert rel_err(fused, exact) < max(2 * rel_err(torch_bf16, exact), 1e-2)
    steps(True, dtype=torch.float32)
    steps(True, keep=torch.rand(2, 9, 16) < 0.5)
    assert len(calls) == 9


def frame_by_frame_cache(m, x, pos, cache, keep=None):
    ys = []
    for i in range(x.shape[1]):
        yi, cache = m(x[:, i:i + 1], pos[:, i:i + 1], cache, update="inplace",
                      keep=None if keep is None else keep[:, i:i + 1])
        ys.append(yi)
    return torch.cat(ys, 1), cache


@needs_attention_kernel
def test_fused_backward_runs_whatever_the_switch_says_at_backward_time():
    """A forward that took the kernel gets the kernel's gradient even where the backward runs
    inside ``fused_attention(False)`` (a benchmark or a comparison switching between the two)."""
    q, k, v = (torch.randn(2, 3, 16, 16).bfloat16().requires_grad_() for _ in range(3))
    y = attention_module.window_attention_cpu(q, k, v, 2)
    with attention_module.fused_attention(False):
        y.float().square().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad.float()).all()


@needs_attention_kernel
def test_fused_window_past_the_clip_equals_the_clip_length():
    """A window longer than the clip (up to 'all frames') sees what a window of the clip's length
    sees; the kernel sizes its buffers by the window, so an enormous one must not reach it."""
    q, k, v = (torch.randn(2, 3, 16, 16).bfloat16() for _ in range(3))
    y = attention_module.window_attention_cpu(q, k, v, 10**9)
    assert torch.equal(y, attention_module.window_attention_cpu(q, k, v, 3))


@needs_attention_kernel
def test_step_with_a_mixed_dtype_ring_falls_back_to_torch():
    """A bf16 key ring with an fp32 value ring is not the kernel's to take: torch's attention runs."""
    torch.manual_seed(0)
    m = FrameLocalAttention(64, 2, 16, window=4)
    x = torch.randn(1, 3, 16, 64)
    pos = torch.arange(3)[None]
    cache = m.init_cache(1, dtype=torch.bfloat16)
    cache.v = cache.v.float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = frame_by_frame_cache(m, x, pos, cache)
    with torch.no_grad():
        exact, _ = m(x, pos)
    assert rel_err(y, exact) < 5e-2
