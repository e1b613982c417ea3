"""SSD (Mamba-2) scan: chunked == sequential reference; state carry; block-wise layer."""

import itertools
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import ssm_gym.model.ssm as ssm_module
from ssm_gym.model import native
from ssm_gym.model.ssm import (
    HAS_MAMBA_SSM,
    BlockwiseSSM,
    cpu_kernel,
    from_blocks,
    ssd,
    ssd_chunked,
    ssd_fused_cpu,
    ssd_sequential,
    to_blocks,
)

needs_cpu_kernel = pytest.mark.skipif(cpu_kernel() is None, reason="the fused CPU kernel could not be built")




def rel_err(a, b):
    """Normwise relative error max|a-b| / max|b|."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-300)).item()


def make_inputs(seed, b, l, h, g, p, n, dtype, with_init=True, with_D=True, dt_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen, dtype=dtype)
    dt = torch.rand(b, l, h, generator=gen, dtype=dtype) * dt_scale + 1e-3
    A = -(torch.rand(h, generator=gen, dtype=dtype) * 4 + 0.05)
    B = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    C = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    D = torch.randn(h, generator=gen, dtype=dtype) if with_D else None
    s0 = torch.randn(b, h, p, n, generator=gen, dtype=dtype) if with_init else None
    return x, dt, A, B, C, D, s0


def inputs_for(s: dict, dtype=torch.float64):
    """make_inputs for one hypothesis draw of ``shapes`` / ``fused_shapes``."""
    h, g = s["hg"]
    return make_inputs(s["seed"], s["b"], s["l"], h, g, s["p"], s["n"], dtype, s["with_init"], s["with_D"], s["dt_scale"])


shapes = st.fixed_dictionaries({
    "seed": st.integers(0, 2**31 - 1),
    "b": st.integers(1, 2),
    "l": st.integers(1, 80),
    "hg": st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 1), (4, 2)]),
    "p": st.integers(1, 5),
    "n": st.integers(1, 6),
    "chunk": st.integers(1, 40),
    "with_init": st.booleans(),
    "with_D": st.booleans(),
    "dt_scale": st.sampled_from([0.01, 1.0, 3.0]),
})


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_chunked_equals_sequential_float64(s):
    x, dt, A, B, C, D, s0 = inputs_for(s)
    y_ref, f_ref = ssd_sequential(x, dt, A, B, C, D, s0)
    y, f = ssd_chunked(x, dt, A, B, C, chunk_size=s["chunk"], D=D, initial_state=s0)
    assert y.shape == y_ref.shape and f.shape == f_ref.shape
    assert rel_err(y, y_ref) < 1e-10
    assert rel_err(f, f_ref) < 1e-10


@settings(max_examples=40, deadline=None)
@given(shapes)
# found by hypothesis (session 18): a chunk whose total decay is large; the state leaving the chunk
# was 1.4e-5 off while its decay was a difference of two cumulative sums (now summed from the end)
@example({"seed": 1027712, "b": 2, "l": 29, "hg": (1, 1), "p": 4, "n": 1, "chunk": 29, "with_init": False,
          "with_D": False, "dt_scale": 3.0})
# found by hypothesis (session 20): a final state of 1.6e-4 left by terms of 0.06 that cancel; the
# fp32 recurrence itself is 1.9e-5 off there, so the bound is the recurrence's own fp32 error
@example({"seed": 6, "b": 1, "l": 6, "hg": (1, 1), "p": 1, "n": 1, "chunk": 3, "with_init": False,
          "with_D": False, "dt_scale": 3.0})
def test_chunked_float32_matches_float64_reference(s):
    """fp32 chunked scan within 1e-5 of the fp64 reference, or, where the outputs are sums that
    cancel (ill-conditioned), within 3x the fp32 recurrence's own error: chunking loses no
    accuracy that fp32 arithmetic does not lose anyway."""
    args64 = inputs_for(s)
    y_ref, f_ref = ssd_sequential(*args64)
    args32 = [None if a is None else a.float() for a in args64]
    x, dt, A, B, C, D, s0 = args32
    y, f = ssd_chunked(x, dt, A, B, C, chunk_size=s["chunk"], D=D, initial_state=s0)
    y32, f32 = ssd_sequential(*args32)
    assert rel_err(y.double(), y_ref) < max(1e-5, 3 * rel_err(y32.double(), y_ref))
    assert rel_err(f.double(), f_ref) < max(1e-5, 3 * rel_err(f32.double(), f_ref))


@pytest.mark.parametrize("cuts", [[0, 64], [0, 1, 64], [0, 17, 40, 41, 64], list(range(0, 65, 8))])
def test_pieces_with_state_equal_whole(cuts):
    x, dt, A, B, C, D, s0 = make_inputs(0, 2, 64, 4, 2, 3, 5, torch.float64)
    y_whole, f_whole = ssd_chunked(x, dt, A, B, C, chunk_size=16, D=D, initial_state=s0)
    state, ys = s0, []
    for a, b in itertools.pairwise(cuts):
        y, state = ssd_chunked(x[:, a:b], dt[:, a:b], A, B[:, a:b], C[:, a:b], chunk_size=16, D=D, initial_state=state)
        ys.append(y)
    assert rel_err(torch.cat(ys, 1), y_whole) < 1e-12
    assert rel_err(state, f_whole) < 1e-12


def test_dispatch_backends_agree():
    x, dt, A, B, C, D, s0 = make_inputs(1, 1, 33, 2, 1, 4, 3, torch.float64)
    y1, f1 = ssd(x, dt, A, B, C, D, s0, chunk_size=8, backend="torch")
    y2, f2 = ssd(x, dt, A, B, C, D, s0, backend="sequential")
    assert rel_err(y1, y2) < 1e-10 and rel_err(f1, f2) < 1e-10
    with pytest.raises(ValueError):
        ssd(x, dt, A, B, C, backend="nope")
    with pytest.raises(ValueError, match="chunk_size >= 16"):  # below the Triton kernels' tile size
        ssd(x, dt, A, B, C, chunk_size=8, backend="mamba")


def test_block_rearrangement_order():
    # token value = 1000*frame + 10*row + col
    t, hh, ww = 3, 4, 4
    f, r, c = torch.meshgrid(torch.arange(t), torch.arange(hh), torch.arange(ww), indexing="ij")
    x = (1000 * f + 10 * r + c).float()[None, ..., None]  # (1, T, H, W, 1)
    seq = to_blocks(x, (2, 2))
    assert seq.shape == (1, 4, t * 4, 1)
    # block 1 = rows 0-1, cols 2-3: frame-major, raster inside the block
    expect = [1000 * fr + v for fr in range(t) for v in (2, 3, 12, 13)]
    assert seq[0, 1, :, 0].tolist() == expect
    assert torch.equal(from_blocks(seq, (hh, ww), (2, 2)), x)
    flat = to_blocks(x, (hh, ww))
    assert flat.shape == (1, 1, t * hh * ww, 1)
    assert torch.equal(flat[0, 0, :, 0], x.flatten())


@pytest.mark.parametrize("block,d_conv", [((2, 2), 4), ((1, 2), 4), (None, 4), ((2, 4), 0)])
def test_blockwise_ssm_pieces_and_steps_equal_whole(block, d_conv):
    torch.manual_seed(0)
    m = BlockwiseSSM(16, (4, 4), block, d_state=8, headdim=8, d_conv=d_conv, chunk_size=8).double()
    x = torch.randn(2, 7, 4, 4, 16, dtype=torch.float64)
    y, (conv, ssm_state) = m(x)
    st_ = m.init_state(2, dtype=torch.float64)
    ys = []
    for a, b in [(0, 3), (3, 4), (4, 7)]:
        yp, st_ = m(x[:, a:b], st_)
        ys.append(yp)
    assert rel_err(torch.cat(ys, 1), y) < 1e-10
    assert rel_err(st_[1], ssm_state) < 1e-10
    if d_conv:
        assert torch.allclose(st_[0], conv)
    st_, ys = m.init_state(2, dtype=torch.float64), []
    for i in range(7):  # one-frame steps
        yp, st_ = m(x[:, i:i + 1], st_)
        ys.append(yp)
    assert rel_err(torch.cat(ys, 1), y) < 1e-10


# ---------------------------------------------------------------------------------------------
# states at a spacing (training with noised copies reads the state entering every frame)
# ---------------------------------------------------------------------------------------------
spaced_shapes = st.fixed_dictionaries({
    "seed": st.integers(0, 2**31 - 1),
    "b": st.integers(1, 2),
    "every": st.integers(1, 20),
    "pieces": st.integers(1, 6),
    "hg": st.sampled_from([(1, 1), (2, 1), (4, 2)]),
    "p": st.sampled_from([1, 3, 32]),
    "n": st.integers(1, 9),
    "with_init": st.booleans(),
    "with_D": st.booleans(),
    "dt_scale": st.sampled_from([0.01, 1.0, 3.0]),
})


@settings(max_examples=30, deadline=None)
@given(spaced_shapes)
def test_states_at_spacing_equal_reference_values_and_gradients(s):
    """ssd(..., state_every=k) on the torch path and the fused kernel == the recurrence piece by
    piece: outputs, final state, the states entering every k-th token, and every gradient with a
    loss on all three (float64)."""
    h, g = s["hg"]
    k = s["every"]
    args = make_inputs(s["seed"], s["b"], k * s["pieces"], h, g, s["p"], s["n"], torch.float64, s["with_init"],
                       s["with_D"], s["dt_scale"])
    args = [None if a is None else a.clone().requires_grad_(True) for a in args]
    leaves = [a for a in args if a is not None]
    x, dt, A, B, C, D, s0 = args
    ref = ssd(x, dt, A, B, C, D, s0, backend="sequential", state_every=k)
    assert ref[2].shape == (s["b"], s["pieces"], h, s["p"], s["n"])
    gen = torch.Generator().manual_seed(s["seed"])
    w = [torch.randn(r.shape, generator=gen, dtype=r.dtype) for r in ref]
    g_ref = torch.autograd.grad(sum((r * wi).sum() for r, wi in zip(ref, w)), leaves)
    for backend in ["torch"] + (["cpu"] if cpu_kernel() is not None else []):
        out = ssd(x, dt, A, B, C, D, s0, backend=backend, state_every=k)
        for o, r in zip(out, ref):
            assert o.shape == r.shape and rel_err(o, r) < 1e-10, backend
        grads = torch.autograd.grad(sum((o * wi).sum() for o, wi in zip(out, w)), leaves)
        for a, b in zip(grads, g_ref):
            assert rel_err(a, b) < 1e-9, backend
        if s0 is not None:
            assert torch.equal(out[2][:, 0], s0.detach())


def test_states_at_spacing_reject_a_length_it_does_not_divide():
    x, dt, A, B, C, D, s0 = make_inputs(0, 1, 10, 2, 1, 3, 4, torch.float64)
    with pytest.raises(ValueError, match="state_every"):
        ssd(x, dt, A, B, C, D, s0, state_every=4)


@pytest.mark.parametrize("backend", ["torch", "cpu", "sequential"])
@pytest.mark.parametrize("block,d_conv", [((2, 2), 4), ((1, 2), 4), (None, 4), ((2, 4), 1), ((2, 2), 0)])
def test_blockwise_ssm_paired_copies_equal_one_frame_steps(block, d_conv, backend):
    """forward_paired: the copy of frame t == a one-frame forward of it from the state after clean
    frames < t (conv window and scan); the clean output and state == forward."""
    if backend == "cpu" and cpu_kernel() is None:
        pytest.skip("the fused CPU kernel could not be built")
    torch.manual_seed(0)
    m = BlockwiseSSM(16, (4, 4), block, d_state=8, headdim=8, d_conv=d_conv, chunk_size=8, backend=backend).double()
    x, xn = torch.randn(2, 5, 4, 4, 16, dtype=torch.float64), torch.randn(2, 5, 4, 4, 16, dtype=torch.float64)
    start = tuple(z + torch.randn_like(z) for z in m.init_state(2, dtype=torch.float64))
    y, yn, (conv, state) = m.forward_paired(x, xn, start)
    y_ref, (conv_ref, state_ref) = m(x, start)
    assert rel_err(y, y_ref) < 1e-12 and rel_err(state, state_ref) < 1e-12 and torch.equal(conv, conv_ref)
    st_ = start
    for t in range(5):
        yt, _ = m(xn[:, t:t + 1], st_)
        assert rel_err(yn[:, t], yt[:, 0]) < 1e-12
        _, st_ = m(x[:, t:t + 1], st_)


def test_blockwise_ssm_blocks_are_independent_and_causal():
    torch.manual_seed(0)
    m = BlockwiseSSM(8, (4, 4), (2, 2), d_state=4, headdim=8, chunk_size=4)
    x = torch.randn(1, 5, 4, 4, 8)
    y = m(x)[0]
    x2 = x.clone()
    x2[:, 1, 0, 0] += 1.0  # frame 1, block 0
    y2 = m(x2)[0]
    diff = (y2 - y).abs().amax(-1)[0]  # (T, H, W)
    assert diff[0].max() == 0  # causal: earlier frame untouched
    assert diff[1:, :2, :2].max() > 0  # same block, later: affected
    assert diff[:, :, 2:].max() == 0 and diff[:, 2:, :].max() == 0  # other blocks: untouched


def test_blockwise_ssm_full_grid_block_equals_none():
    torch.manual_seed(0)
    m1 = BlockwiseSSM(8, (2, 4), None, d_state=4, headdim=8)
    m2 = BlockwiseSSM(8, (2, 4), (2, 4), d_state=4, headdim=8)
    m2.load_state_dict(m1.state_dict())
    x = torch.randn(2, 3, 2, 4, 8)
    assert torch.equal(m1(x)[0], m2(x)[0])


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_MAMBA_SSM), reason="needs CUDA and mamba-ssm")
def test_mamba_ssm_backend_parity():
    x, dt, A, B, C, D, s0 = [None if a is None else a.float().cuda()
                             for a in make_inputs(0, 2, 300, 4, 1, 16, 16, torch.float64, dt_scale=0.1)]
    y_ref, f_ref = ssd(x, dt, A, B, C, D, s0, chunk_size=64, backend="torch")
    y, f = ssd(x, dt, A, B, C, D, s0, chunk_size=64, backend="mamba")
    assert rel_err(y, y_ref) < 1e-3 and rel_err(f, f_ref) < 1e-3
    torch.manual_seed(0)
    m = BlockwiseSSM(64, (4, 4), (2, 2), backend="torch").cuda()
    xx = torch.randn(2, 5, 4, 4, 64, device="cuda")
    y1, s1 = m(xx)
    m.backend = "mamba"
    y2, s2 = m(xx)
    assert rel_err(y2, y1) < 1e-3 and rel_err(s2[1], s1[1]) < 1e-3


@pytest.mark.parametrize("segment", [8, 24, 1000])
def test_segmented_chunked_scan_values_and_gradients(segment):
    """Long sequences are processed in cache-sized segments: same values and gradients."""
    args = make_inputs(3, 2, 50, 4, 2, 3, 4, torch.float64)
    args = [None if a is None else a.clone().requires_grad_(True) for a in args]
    x, dt, A, B, C, D, s0 = args
    y_ref, f_ref = ssd_sequential(x, dt, A, B, C, D, s0)
    g_ref = torch.autograd.grad((y_ref.sin().sum() + f_ref.cos().sum()), args)
    y, f = ssd_chunked(x, dt, A, B, C, chunk_size=8, D=D, initial_state=s0, segment=segment)
    g = torch.autograd.grad((y.sin().sum() + f.cos().sum()), args)
    assert rel_err(y, y_ref) < 1e-10 and rel_err(f, f_ref) < 1e-10
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) < 1e-9


# ---------------------------------------------------------------------------------------------
# the fused CPU kernel (csrc/ssd_cpu.cpp): the same map as the reference, forward and backward
# ---------------------------------------------------------------------------------------------
fused_shapes = st.fixed_dictionaries({
    "seed": st.integers(0, 2**31 - 1),
    "b": st.integers(1, 3),
    "l": st.integers(1, 70),  # across the backward's 16-token checkpoint segments
    "hg": st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 1), (4, 2)]),
    "p": st.sampled_from([1, 3, 5, 32, 64]),  # 32 and 64 take the kernel's fixed-headdim path
    "n": st.integers(1, 17),
    "with_init": st.booleans(),
    "with_D": st.booleans(),
    "dt_scale": st.sampled_from([0.01, 1.0, 3.0]),
})


@needs_cpu_kernel
@settings(max_examples=50, deadline=None)
@given(fused_shapes)
def test_fused_cpu_equals_sequential_values_and_gradients_float64(s):
    args = inputs_for(s)
    args = [None if a is None else a.clone().requires_grad_(True) for a in args]
    leaves = [a for a in args if a is not None]
    y_ref, f_ref = ssd_sequential(*args)
    y, f = ssd_fused_cpu(*args)
    assert y.shape == y_ref.shape and f.shape == f_ref.shape
    assert rel_err(y, y_ref) < 1e-10 and rel_err(f, f_ref) < 1e-10
    # a loss on both outputs, so the final state's gradient flows back through the kernel too
    gen = torch.Generator().manual_seed(s["seed"])
    wy, wf = torch.randn(y.shape, generator=gen, dtype=y.dtype), torch.randn(f.shape, generator=gen, dtype=f.dtype)
    g_ref = torch.autograd.grad((y_ref * wy).sum() + (f_ref * wf).sum(), leaves)
    g_fused = torch.autograd.grad((y * wy).sum() + (f * wf).sum(), leaves)
    for a, b in zip(g_fused, g_ref):
        assert rel_err(a, b) < 1e-9


@needs_cpu_kernel
@settings(max_examples=25, deadline=None)
@given(fused_shapes)
def test_fused_cpu_float32_matches_float64_reference(s):
    args64 = inputs_for(s)
    y_ref, f_ref = ssd_sequential(*args64)
    args32 = [None if a is None else a.float() for a in args64]
    y, f = ssd_fused_cpu(*args32)
    assert y.dtype == torch.float32
    y32, f32 = ssd_sequential(*args32)  # (the bound where outputs cancel: see the chunked test)
    assert rel_err(y.double(), y_ref) < max(1e-5, 3 * rel_err(y32.double(), y_ref))
    assert rel_err(f.double(), f_ref) < max(1e-5, 3 * rel_err(f32.double(), f_ref))


@needs_cpu_kernel
def test_fused_cpu_pieces_equal_whole_and_output_only_gradients():
    x, dt, A, B, C, D, s0 = make_inputs(0, 2, 64, 4, 2, 32, 16, torch.float64)
    y_whole, f_whole = ssd_fused_cpu(x, dt, A, B, C, D, s0)
    state, ys = s0, []
    for a, b in itertools.pairwise([0, 1, 17, 40, 64]):
        y, state = ssd_fused_cpu(x[:, a:b], dt[:, a:b], A, B[:, a:b], C[:, a:b], D, state)
        ys.append(y)
    assert rel_err(torch.cat(ys, 1), y_whole) < 1e-12 and rel_err(state, f_whole) < 1e-12
    # only y used (the final state's gradient is None in backward), and no initial state
    xg = x.clone().requires_grad_(True)
    g_ref, = torch.autograd.grad(ssd_sequential(xg, dt, A, B, C, D)[0].square().sum(), xg)
    g, = torch.autograd.grad(ssd_fused_cpu(xg, dt, A, B, C, D)[0].square().sum(), xg)
    assert rel_err(g, g_ref) < 1e-10


@needs_cpu_kernel
def test_fused_cpu_edge_cases():
    """An empty piece keeps the state; strided inputs; D per (head, headdim)."""
    x, dt, A, B, C, D, s0 = make_inputs(2, 2, 9, 4, 1, 8, 5, torch.float64)
    y, f = ssd_fused_cpu(x[:, :0], dt[:, :0], A, B[:, :0], C[:, :0], D, s0)
    assert y.shape == (2, 0, 4, 8) and torch.equal(f, s0)
    x_strided = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other memory order
    D_hp = torch.randn(4, 8, dtype=torch.float64)
    y_ref, f_ref = ssd_sequential(x, dt, A, B, C, D_hp, s0)
    y, f = ssd_fused_cpu(x_strided, dt, A, B, C, D_hp, s0)
    assert rel_err(y, y_ref) < 1e-12 and rel_err(f, f_ref) < 1e-12


@needs_cpu_kernel
def test_fused_cpu_dispatch_bf16_autocast_and_errors(monkeypatch):
    x, dt, A, B, C, D, s0 = make_inputs(1, 1, 33, 2, 1, 4, 3, torch.float32)
    y1, f1 = ssd(x, dt, A, B, C, D, s0, backend="cpu")
    y2, f2 = ssd(x, dt, A, B, C, D, s0, chunk_size=8, backend="torch")
    assert rel_err(y1, y2) < 1e-5 and rel_err(f1, f2) < 1e-5
    y3, _ = ssd(x, dt, A, B, C, D, s0, backend="auto")  # auto takes the kernel on the CPU
    assert torch.equal(y3, y1)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the scan itself stays fp32 under autocast
        y4, f4 = ssd(x.bfloat16(), dt, A, B, C, D, s0, backend="cpu")
    assert y4.dtype == torch.bfloat16 and f4.dtype == torch.float32
    with pytest.raises(RuntimeError, match="dt must be"):
        ssd_fused_cpu(x, dt[:, :-1], A, B, C)
    with pytest.raises(RuntimeError, match="initial_state"):
        ssd_fused_cpu(x, dt, A, B, C, initial_state=s0[..., :-1])
    # without the kernel (no compiler, or SSM_GYM_CPU_KERNEL=0): auto falls back, "cpu" says why
    monkeypatch.setattr(ssm_module.SSD_KERNEL, "module", False)
    assert torch.allclose(ssd(x, dt, A, B, C, D, s0, chunk_size=8, backend="auto")[0], y2)
    with pytest.raises(RuntimeError, match="fused CPU SSD kernel is not available"):
        ssd(x, dt, A, B, C, D, s0, backend="cpu")


@needs_cpu_kernel
def test_cpu_kernel_load_survives_a_stale_build_lock(monkeypatch):
    """A build killed half-way leaves torch's lock file behind; the next load must not wait on it."""
    from torch.utils import cpp_extension

    build_dir = Path(cpp_extension._get_build_directory(native.extension_name("ssm_gym_ssd_cpu"), False))
    (build_dir / "lock").touch()
    monkeypatch.setattr(ssm_module.SSD_KERNEL, "module", None)
    assert ssm_module.cpu_kernel() is not None
    assert not (build_dir / "lock").exists()


@needs_cpu_kernel
def test_fused_cpu_traces_whole_under_torch_compile():
    """The kernel is a torch custom op: torch.compile traces through it (no graph break), values
    and gradients as in eager mode."""
    args = [a.float().requires_grad_(True) for a in make_inputs(4, 2, 20, 4, 2, 8, 5, torch.float64)]
    x, dt, A, B, C, D, s0 = args

    def loss(*a):
        y, final = ssd_fused_cpu(*a)
        return y.sin().sum() + final.square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    lc, le = compiled(*args), loss(*args)
    assert torch.equal(lc, le)
    for gc, ge in zip(torch.autograd.grad(lc, args), torch.autograd.grad(le, args)):
        assert torch.equal(gc, ge)


conv_shapes = st.fixed_dictionaries({
    "seed": st.integers(0, 2**20), "n": st.integers(1, 5), "l": st.integers(1, 40), "k": st.integers(1, 5),
    "c": st.integers(1, 70), "bias": st.booleans()})


def conv_inputs(s, dtype):
    gen = torch.Generator().manual_seed(s["seed"])
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = (3 * torch.randn(s["n"], s["l"] + s["k"] - 1, s["c"], generator=gen, dtype=torch.float64)).to(dtype)
    w = torch.randn(s["c"], s["k"], generator=gen, dtype=wdtype)
    b = torch.randn(s["c"], generator=gen, dtype=wdtype) if s["bias"] else None
    return [t.requires_grad_() for t in (x, w, b) if t is not None]


@needs_cpu_kernel
@settings(max_examples=40, deadline=None)
@given(conv_shapes, st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
@example({"seed": 0, "n": 2, "l": 1024, "k": 4, "c": 288, "bias": True}, torch.bfloat16)  # the default layer's
def test_fused_conv_silu_equals_reference_values_and_gradients(s, dtype):
    """The compiled convolution + SiLU == silu(causal_depthwise_conv) in fp64 on the same inputs:
    to 1e-12 in fp64, fp32 rounding in fp32 and for bf16 tokens (fp32 arithmetic), bf16 rounding
    for the gradient of bf16 tokens (it is returned in their dtype)."""
    args = conv_inputs(s, dtype)
    ref_args = [a.detach().double().requires_grad_() for a in args]
    y = ssm_module.conv_silu(*args, fused=True) if s["bias"] else ssm_module.conv_silu(*args, None, fused=True)
    y_ref = (ssm_module.conv_silu(*ref_args, fused=False) if s["bias"] else
             ssm_module.conv_silu(*ref_args, None, fused=False))
    assert y.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(y, args, gy.to(y.dtype))
    grads_ref = torch.autograd.grad(y_ref, ref_args, gy)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(y.double(), y_ref) < tol
    assert grads[0].dtype == dtype
    assert rel_err(grads[0].double(), grads_ref[0]) < (1e-2 if dtype == torch.bfloat16 else tol)
    for g, r in zip(grads[1:], grads_ref[1:]):
        assert rel_err(g.double(), r) < tol


@needs_cpu_kernel
def test_fused_conv_silu_errors_and_dispatch(monkeypatch):
    x = torch.randn(2, 7, 5)
    w = torch.randn(5, 4)
    with pytest.raises(RuntimeError, match="w must be"):
        ssm_module.cpu_kernel().conv_forward(x, w.t().contiguous()[:, :3].contiguous(), None)
    with pytest.raises(RuntimeError, match="fp32"):
        ssm_module.cpu_kernel().conv_forward(x, w.t().double().contiguous(), None)
    with pytest.raises(RuntimeError, match="bias"):
        ssm_module.cpu_kernel().conv_forward(x, w.t().contiguous(), torch.zeros(4))
    with pytest.raises(RuntimeError, match="grad of y"):
        ssm_module.cpu_kernel().conv_backward(x, w.t().contiguous(), None, torch.zeros(2, 3, 5))
    # fp16 tokens are promoted; without the kernel the reference runs
    y = ssm_module.conv_silu(x, w, None)
    assert torch.allclose(ssm_module.conv_silu(x.half(), w, None), ssm_module.conv_silu(x.half().float(), w, None))
    monkeypatch.setattr(ssm_module.SSD_KERNEL, "module", False)
    assert torch.allclose(ssm_module.conv_silu(x, w, None), y, atol=1e-6)


@needs_cpu_kernel
@pytest.mark.parametrize("block,d_conv", [((2, 2), 4), (None, 4), ((2, 4), 1)])
def test_blockwise_ssm_cpu_backend_equals_torch_backend_with_gradients(block, d_conv):
    """The layer on the compiled kernels (scan and convolution) == on torch's ops, forward and
    paired, values and every parameter's gradient (fp64)."""
    torch.manual_seed(0)
    m_cpu = BlockwiseSSM(16, (4, 4), block, d_state=8, headdim=8, d_conv=d_conv, chunk_size=8, backend="cpu").double()
    m_torch = BlockwiseSSM(16, (4, 4), block, d_state=8, headdim=8, d_conv=d_conv, chunk_size=8,
                           backend="torch").double()
    m_torch.load_state_dict(m_cpu.state_dict())
    x, xn = torch.randn(2, 3, 4, 4, 16, dtype=torch.float64), torch.randn(2, 3, 4, 4, 16, dtype=torch.float64)
    start = tuple(z + torch.randn_like(z) for z in m_cpu.init_state(2, dtype=torch.float64))
    for m in (m_cpu, m_torch):
        y, yn, (conv, state) = m.forward_paired(x, xn, start)
        y2, _ = m(x, start)
        (y.sin().sum() + yn.square().sum() + y2.cos().sum() + state.square().sum()).backward()
    for (name, p_cpu), p_torch in zip(m_cpu.named_parameters(), m_torch.parameters()):
        assert rel_err(p_cpu.grad, p_torch.grad) < 1e-10, name


@needs_cpu_kernel
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**20), st.integers(1, 40), st.integers(8, 300),  # (dim 1: the gradient cancels to ~0)
       st.sampled_from([(torch.float64, False), (torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)]))
@example(0, 64, 256, (torch.bfloat16, True))  # the default layer's rows under bf16 autocast
def test_fused_gated_norm_equals_reference_values_and_gradients(seed, rows, dim, case):
    """The compiled gated RMSNorm == the torch expression in fp64 on the same inputs (fp64 to 1e-12,
    fp32 rounding in fp32; bf16 rounding where z or, under bf16 autocast, the output is bf16)."""
    from ssm_gym.model.ssm import GatedRMSNorm

    zdtype, autocast = case
    gen = torch.Generator().manual_seed(seed)
    wide = torch.float64 if zdtype == torch.float64 else torch.float32
    norm = GatedRMSNorm(dim).to(wide)
    norm.weight.data = torch.randn(dim, generator=gen, dtype=wide)
    y = torch.randn(2, rows, dim, generator=gen, dtype=wide).requires_grad_()
    z = (2 * torch.randn(2, rows, dim, generator=gen, dtype=wide)).to(zdtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = norm(y, z, fused=True)
    assert out.dtype == (torch.bfloat16 if autocast else wide)
    ref = GatedRMSNorm(dim).double()
    ref.weight.data = norm.weight.data.double()
    yr, zr = y.detach().double().requires_grad_(), z.detach().double().requires_grad_()
    out_ref = ref(yr, zr)
    go = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)  # (bf16 where the output is)
    grads = torch.autograd.grad(out, [y, z, norm.weight], go)
    grads_ref = torch.autograd.grad(out_ref, [yr, zr, ref.weight], go.double())
    tol = 1e-12 if zdtype == torch.float64 else 1e-5
    assert rel_err(out.double(), out_ref) < (1e-2 if autocast else tol)
    assert [g.dtype for g in grads] == [wide, zdtype, wide]
    assert rel_err(grads[0].double(), grads_ref[0]) < tol
    assert rel_err(grads[1].double(), grads_ref[1]) < (1e-2 if zdtype == torch.bfloat16 else tol)
    assert rel_err(grads[2].double(), grads_ref[2]) < tol


@needs_cpu_kernel
def test_fused_gated_norm_errors():
    k = ssm_module.cpu_kernel()
    y, z, w = torch.randn(3, 8), torch.randn(3, 8), torch.randn(8)
    with pytest.raises(RuntimeError, match="must be \\(rows, channels\\)"):
        k.gated_norm_forward(y, z[:, :4].contiguous(), w, 1e-5, False)
    with pytest.raises(RuntimeError, match="w must have y's dtype"):
        k.gated_norm_forward(y, z, w.double(), 1e-5, False)
    with pytest.raises(RuntimeError, match="fp32"):
        k.gated_norm_forward(y.double(), z, w.double(), 1e-5, False)
    out, rstd = k.gated_norm_forward(y, z, w, 1e-5, False)
    with pytest.raises(RuntimeError, match="rstd"):
        k.gated_norm_backward(out, y, z, w, rstd[:2].contiguous())


@needs_cpu_kernel
@settings(max_examples=30, deadline=None)
@given(st.fixed_dictionaries({"seed": st.integers(0, 2**20), "b": st.integers(1, 3), "frames": st.integers(1, 5),
                              "f": st.integers(1, 20), "hg": st.sampled_from([(1, 1), (2, 1), (4, 2)]),
                              "p": st.integers(1, 9), "n": st.integers(1, 6), "with_init": st.booleans(),
                              "with_D": st.booleans()}))
def test_ssd_paired_fused_equals_reference_values_and_gradients(s):
    """ssd_paired on the fused kernel (states kept in its layout between the scans) == the
    reference composition (ssd with state_every, then the copies from those states), fp64."""
    h, g = s["hg"]
    b, frames, f = s["b"], s["frames"], s["f"]
    x, dt, A, B, C, D, s0 = make_inputs(s["seed"], b, frames * f, h, g, s["p"], s["n"], torch.float64,
                                        s["with_init"], s["with_D"])
    xn, dtn, _, Bn, Cn, _, _ = make_inputs(s["seed"] + 1, b * frames, f, h, g, s["p"], s["n"], torch.float64)
    args = [t for t in (x, dt, A, B, C, xn, dtn, Bn, Cn, D, s0)]
    leaves = [t.requires_grad_() for t in args if t is not None]
    outs = {}
    for backend in ("cpu", "sequential"):
        y, final, yn = ssm_module.ssd_paired(*args[:9], D=D, initial_state=s0, chunk_size=4, backend=backend)
        loss = y.sin().sum() + yn.cos().sum() + final.square().sum()
        outs[backend] = (y, final, yn, torch.autograd.grad(loss, leaves))
    for a, r in zip(outs["cpu"][:3], outs["sequential"][:3]):
        assert rel_err(a, r) < 1e-10
    for a, r in zip(outs["cpu"][3], outs["sequential"][3]):
        assert rel_err(a, r) < 1e-10


def test_ssd_paired_rejects_copies_that_do_not_match_the_frames():
    x, dt, A, B, C, D, s0 = make_inputs(0, 2, 12, 2, 1, 3, 4, torch.float64)
    with pytest.raises(ValueError, match="one per frame"):
        ssm_module.ssd_paired(x, dt, A, B, C, x[:, :5], dt[:, :5], B[:, :5], C[:, :5], backend="torch")


@needs_cpu_kernel
@pytest.mark.parametrize("p,n", [(32, 16), (16, 16), (64, 16), (32, 32), (48, 16), (16, 48), (8, 16)])
def test_fused_cpu_state_layout_changes_in_tiles(p, n):
    """The states' layout change (transposed in 16 x 16 register tiles where both sizes are
    multiples of 16, in plain loops elsewhere): the initial state in, the final state out, and
    their gradients, fp32 against the fp64 recurrence, for one- and few-token sequences (the
    rollout step's) and a longer one."""
    for length in (1, 3, 40):
        args64 = list(make_inputs(7, 3, length, 2, 1, p, n, torch.float64))
        y_ref, f_ref = ssd_sequential(*args64)
        args32 = [a.float().requires_grad_() for a in args64]
        y, f = ssd_fused_cpu(*args32)
        assert rel_err(y.double(), y_ref) < 1e-5 and rel_err(f.double(), f_ref) < 1e-5
        x, dt, A, B, C, D, s0 = args32
        g_final = torch.autograd.grad(f.square().sum(), s0)[0]
        s0_ref = args64[-1].clone().requires_grad_()
        _, f_ref2 = ssd_sequential(*args64[:-1], s0_ref)
        g_ref = torch.autograd.grad(f_ref2.square().sum(), s0_ref)[0]
        assert rel_err(g_final.double(), g_ref) < 1e-5
