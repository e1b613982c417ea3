"""Mamba-2 (SSD) state-space layer with the block-wise spatial scan.

Read top to bottom:

1. ``ssd_sequential``: the plain recurrence, one token at a time. The reference.
2. ``ssd_chunked``: the same map computed in chunks (the "state-space dual" form of Mamba-2):
   quadratic attention-like products inside a chunk, a short recurrence between chunks.
   Pure PyTorch, runs anywhere; the default backend.
3. ``ssd_fused_cpu``: the recurrence as one fused C++ loop (``csrc/ssd_cpu.cpp``, compiled on
   first use), forward and backward; the fastest path on a CPU.
4. ``ssd``: dispatch between the torch path, the fused CPU kernel and mamba-ssm's fused CUDA
   kernel (``mamba_chunk_scan_combined``) when it is importable and the tensors live on a GPU.
   All backends use the same state layout ``(batch, nheads, headdim, d_state)``.
5. ``BlockwiseSSM``: a Mamba-2 mixer (in-projection, short causal conv, SSD, gated RMSNorm,
   out-projection) applied to video tokens ``(B, T, H, W, D)`` with the block-wise scan of
   Po et al. 2025: the H x W token grid is cut into (b_h, b_w) blocks, each block is one
   sequence over all frames (frame-major, raster order inside the block) with its own state.

The recurrence, per head (x: headdim vector, h: headdim x d_state state)::

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T        y_t = h_t C_t + D * x_t

with ``A < 0`` a scalar per head and ``dt_t > 0`` a per-token, per-head step size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssm_gym.model import native
from ssm_gym.model.pointwise import cpu_autocast_bf16, kernel_dtypes

try:  # optional CUDA kernels (pip install ssm-gym[cuda])
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    HAS_MAMBA_SSM = True
except Exception:  # noqa: BLE001 (ImportError, or a broken triton/CUDA install)
    mamba_chunk_scan_combined = None
    HAS_MAMBA_SSM = False


# mamba-ssm's SSD kernels multiply chunk x chunk tiles with Triton's tl.dot, which needs tiles of
# at least 16; smaller chunks (the tiny test models use 8) stay on the torch path.
MAMBA_MIN_CHUNK = 16


def _expand_groups(t: Tensor, nheads: int) -> Tensor:
    """(..., ngroups, n) -> (..., nheads, n): heads of one group share B and C."""
    g = t.shape[-2]
    if g == nheads:
        return t
    shape = t.shape[:-2]
    return t.unsqueeze(-2).expand(*shape, g, nheads // g, t.shape[-1]).reshape(*shape, nheads, t.shape[-1])


# ---------------------------------------------------------------------------------------------
# 1. reference: the sequential recurrence
# ---------------------------------------------------------------------------------------------
def ssd_sequential(x, dt, A, B, C, D=None, initial_state=None):
    """Plain recurrence. Shapes as in mamba-ssm:

    x (b, l, h, p), dt (b, l, h) (already positive), A (h,) (negative), B, C (b, l, g, n),
    D (h,) or None, initial_state (b, h, p, n) or None.
    Returns ``(y (b, l, h, p), final_state (b, h, p, n))``.
    """
    b, l, h, p = x.shape
    n = B.shape[-1]
    Bh, Ch = _expand_groups(B, h), _expand_groups(C, h)
    state = x.new_zeros(b, h, p, n) if initial_state is None else initial_state.to(x.dtype)
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * A)  # (b, h)
        state = decay[:, :, None, None] * state + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p)
    return _add_skip(y, x, D), state


def _sequential_with_states(x, dt, A, B, C, D, initial_state, every: int):
    """The reference for ``ssd(..., state_every=every)``: the recurrence piece by piece."""
    state, ys, states = initial_state, [], []
    for s0 in range(0, x.shape[1], every):
        s1 = s0 + every
        states.append(x.new_zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[-1]) if state is None else state)
        y, state = ssd_sequential(x[:, s0:s1], dt[:, s0:s1], A, B[:, s0:s1], C[:, s0:s1], D, state)
        ys.append(y)
    if not ys:
        y, state = ssd_sequential(x, dt, A, B, C, D, initial_state)
        return y, state, x.new_zeros(x.shape[0], 0, x.shape[2], x.shape[3], B.shape[-1])
    return torch.cat(ys, 1), state, torch.stack(states, 1)


def _add_skip(y: Tensor, x: Tensor, D: Tensor | None) -> Tensor:
    """y + D * x, with D per head (h,) or per (head, headdim) (h, p); None adds nothing."""
    if D is None:
        return y
    return torch.addcmul(y, D[:, None] if D.dim() == 1 else D, x)  # one pass (x is often a strided view)


# ---------------------------------------------------------------------------------------------
# 2. chunked SSD (pure PyTorch)
# ---------------------------------------------------------------------------------------------
def segsum_exp(a: Tensor, col_scale: Tensor | None = None) -> Tensor:
    """out[..., i, j] = exp(a[..., j+1] + ... + a[..., i]) * col_scale[..., j] for i >= j, else 0.

    The exponent is a masked cumulative sum (not a difference of two cumsums), so the decay
    factors keep full relative precision even when the total decay over a chunk is large.
    """
    q = a.shape[-1]
    strict = torch.ones(q, q, dtype=torch.bool, device=a.device).tril_(-1)
    out = a[..., :, None].expand(*a.shape, q).masked_fill(~strict, 0).cumsum_(dim=-2)  # [i, j]: a_{j+1..i}
    lower = torch.ones(q, q, dtype=a.dtype, device=a.device).tril_()
    scale = lower if col_scale is None else lower * col_scale[..., None, :]
    return out.exp_() * scale


def _ssd_chunked_segment(x, dt, A, B, C, D, q: int, state: Tensor):
    """Chunked SSD over one segment whose length is a multiple of ``q``; state (b, g, hg, p, n).
    Returns y in layout (b, c, g, hg, q, p), the final state and the states entering each chunk
    (b, c, g, hg, p, n)."""
    b, l, g, hg, p = x.shape
    n = B.shape[-1]
    c = l // q
    xh = x.reshape(b, c, q, g, hg, p).permute(0, 1, 3, 4, 2, 5).contiguous()  # (b, c, g, hg, q, p)
    dth = dt.reshape(b, c, q, g, hg).permute(0, 1, 3, 4, 2).contiguous()  # (b, c, g, hg, q)
    Bg = B.reshape(b, c, q, g, n).transpose(2, 3)[:, :, :, None]  # (b, c, g, 1, q, n)
    Cg = C.reshape(b, c, q, g, n).transpose(2, 3)[:, :, :, None]
    ah = dth * A.reshape(g, hg, 1)  # log-decay per token
    acum = ah.cumsum(-1)

    # 1. intra-chunk: y_i = sum_{j<=i} (C_i . B_j) exp(a_{j+1} + ... + a_i) dt_j x_j
    scores = (Cg @ Bg.transpose(-1, -2)) * segsum_exp(ah, dth)  # (b, c, g, hg, q, q)
    if D is not None:  # skip connection D * x folded into the diagonal
        scores.diagonal(dim1=-2, dim2=-1).add_(D.reshape(g, hg, 1))
    y_t = xh.transpose(-1, -2) @ scores.transpose(-1, -2)  # y^T, (b, c, g, hg, p, q): faster BLAS path on CPU
    # 2. state each chunk leaves from a zero start: sum_j exp(a_{j+1..end}) dt_j x_j B_j^T
    # (the decay to the chunk's end summed directly, from the end: a difference of two cumsums
    # loses relative precision when the chunk's total decay is large)
    to_end = F.pad(ah[..., 1:], (0, 1)).flip(-1).cumsum(-1).flip(-1)  # a_{j+1} + ... + a_end
    Bw = Bg * (torch.exp(to_end) * dth)[..., None]  # (b, c, g, hg, q, n)
    chunk_states = xh.transpose(-1, -2) @ Bw  # (b, c, g, hg, p, n)
    # 3. recurrence over chunks: S_0 = state, S_{m+1} = exp(sum of a over chunk m) S_m + chunk_states_m
    chunk_decay = torch.exp(acum[..., -1])[..., None, None]  # (b, c, g, hg, 1, 1)
    s, starts = state, []
    for m in range(c):
        starts.append(s)
        s = torch.addcmul(chunk_states[:, m], chunk_decay[:, m], s)
    prev = torch.stack(starts, dim=1)  # (b, c, g, hg, p, n): state entering each chunk
    # 4. carried-in state seen by token i: exp(a_0 + ... + a_i) C_i . S_chunk
    Cw = Cg * torch.exp(acum)[..., None]  # (b, c, g, hg, q, n)
    y = (Cw @ prev.transpose(-1, -2)) + y_t.transpose(-1, -2)  # (b, c, g, hg, q, p)
    return y, s, prev


def ssd_chunked(x, dt, A, B, C, chunk_size: int = 64, D=None, initial_state=None, segment: int = 256,
                chunk_states: bool = False):
    """Chunked SSD: same inputs and outputs as :func:`ssd_sequential`.

    The sequence is cut into chunks of ``chunk_size`` tokens. Inside a chunk the output is a
    masked, decay-weighted ``C B^T`` product applied to ``dt * x`` (batched matmuls); each chunk
    also emits the state it would leave behind from a zero start; a short recurrence over chunks
    carries the state in, and its contribution ``exp(cumsum a) C . S`` is added to every token.
    Work O(L * chunk_size) per head. Long sequences are processed ``segment`` tokens at a time
    (state carried), which keeps the working set in cache on CPUs. chunk_states: also return the
    state entering each chunk, (b, chunks, h, p, n).
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    hg = h // g
    q = max(1, min(chunk_size, l))
    pad = (-l) % q
    if pad:  # dt = 0 on padding: no decay and no input, so the final state is unchanged
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    lp = l + pad
    xg = x.reshape(b, lp, g, hg, p)
    dtg = dt.reshape(b, lp, g, hg)
    state = x.new_zeros(b, g, hg, p, n) if initial_state is None else initial_state.to(x.dtype).reshape(b, g, hg, p, n)
    seg = max(q, (segment // q) * q)
    Dd = None if D is None or D.dim() != 1 else D.to(x.dtype)
    starts = []
    if lp <= seg:
        y, state, prev = _ssd_chunked_segment(xg, dtg, A, B, C, Dd, q, state)
        y = y.permute(0, 1, 4, 2, 3, 5).reshape(b, lp, h, p)
        starts.append(prev)
    else:  # segments written straight into the output (one copy instead of permute + cat)
        y = x.new_empty(b, lp // q, q, g, hg, p)
        for s0 in range(0, lp, seg):
            s1 = min(lp, s0 + seg)
            ys, state, prev = _ssd_chunked_segment(xg[:, s0:s1], dtg[:, s0:s1], A, B[:, s0:s1], C[:, s0:s1], Dd, q,
                                                   state)
            y[:, s0 // q:s1 // q] = ys.permute(0, 1, 4, 2, 3, 5)
            starts.append(prev)
        y = y.reshape(b, lp, h, p)
    y = y[:, :l]
    if Dd is None:  # D given per (head, headdim), or none
        y = _add_skip(y, x[:, :l], D)
    if chunk_states:
        return y, state.reshape(b, h, p, n), torch.cat(starts, 1).reshape(b, lp // q, h, p, n)
    return y, state.reshape(b, h, p, n)


# ---------------------------------------------------------------------------------------------
# 3. the fused CPU kernel (C++, compiled on first use)
# ---------------------------------------------------------------------------------------------
SSD_KERNEL = native.Kernel("ssm_gym_ssd_cpu", "ssd_cpu.cpp", "fused CPU SSD kernel", "using the pure-PyTorch scan",
                           switch="SSM_GYM_CPU_KERNEL")
CPU_KERNEL_CKPT = 16  # the forward keeps the state every this many tokens for the backward


def cpu_kernel():
    """The compiled fused CPU scan, or None where it cannot be built (no C++ compiler) or
    ``SSM_GYM_CPU_KERNEL=0`` switches it off (see ``native``: built once per machine)."""
    return SSD_KERNEL.get()


def cpu_kernel_ready() -> bool:
    """Whether the fused kernel can be used; loads it on first use. Once loaded, a plain read of
    an attribute (which torch.compile can trace; the lock in ``cpu_kernel`` it cannot)."""
    if SSD_KERNEL.module is not None:
        return bool(SSD_KERNEL.module)
    return cpu_kernel() is not None


# The kernel as torch custom ops (with shapes for tracing and an autograd formula), so that
# torch.compile traces through the scan instead of breaking its graph there.
@torch.library.custom_op("ssm_gym::ssd_cpu_forward", mutates_args=())
def _ssd_cpu_forward(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, initial_state: Tensor | None,
                     ckpt_every: int, init_frames: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    y, final, ckpt = cpu_kernel().forward(x, dt, A, B, C, initial_state, ckpt_every, init_frames)
    return y, final, ckpt


@_ssd_cpu_forward.register_fake
def _(x, dt, A, B, C, initial_state, ckpt_every, init_frames=0):
    b, l, h, p = x.shape
    n = B.shape[-1]
    nck = -(-l // ckpt_every) if ckpt_every > 0 else 0
    return x.new_empty(x.shape), x.new_empty(b, h, p, n), x.new_empty(b * h * nck * n * p if ckpt_every > 0 else 0)


@torch.library.custom_op("ssm_gym::ssd_cpu_backward", mutates_args=())
def _ssd_cpu_backward(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, ckpt: Tensor, gy: Tensor,
                      gfinal: Tensor | None, gckpt: Tensor | None,
                      ckpt_every: int, init_frames: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    gx, gdt, gA, gB, gC, ginit = cpu_kernel().backward(x, dt, A, B, C, ckpt, gy, gfinal, gckpt, ckpt_every,
                                                       init_frames)
    return gx, gdt, gA, gB, gC, ginit


@_ssd_cpu_backward.register_fake
def _(x, dt, A, B, C, ckpt, gy, gfinal, gckpt, ckpt_every, init_frames=0):
    b, l, h, p = x.shape
    n = B.shape[-1]
    f = init_frames
    return (x.new_empty(x.shape), dt.new_empty(dt.shape), x.new_empty(b, h), x.new_empty(b, l, h, n),
            x.new_empty(b, l, h, n), x.new_empty((b // f, h, f, n, p) if f > 0 else (b, h, p, n)))


def _ssd_cpu_setup_context(ctx, inputs, output):
    x, dt, A, B, C, initial_state, ckpt_every, init_frames = inputs
    ctx.save_for_backward(x, dt, A, B, C, output[2])
    ctx.has_initial_state, ctx.ckpt_every, ctx.init_frames = initial_state is not None, ckpt_every, init_frames
    ctx.set_materialize_grads(False)  # (an unused output's gradient comes as None, not a tensor of zeros)


def _ssd_cpu_autograd(ctx, gy, gfinal, gckpt):
    x, dt, A, B, C, ckpt = ctx.saved_tensors
    if gy is None:  # (only the final state or the checkpoints are used)
        gy = torch.zeros_like(x)
    gx, gdt, gA, gB, gC, ginit = _ssd_cpu_backward(x, dt, A, B, C, ckpt, gy.contiguous(),
                                                   None if gfinal is None else gfinal.contiguous(),
                                                   None if gckpt is None else gckpt.contiguous(), ctx.ckpt_every,
                                                   ctx.init_frames)
    b, l, h, n = gB.shape
    g = B.shape[2]  # heads of one group share B and C: their gradients add up
    gB, gC = gB.view(b, l, g, h // g, n).sum(3), gC.view(b, l, g, h // g, n).sum(3)
    return gx, gdt, gA.sum(0), gB, gC, ginit if ctx.has_initial_state else None, None, None


torch.library.register_autograd("ssm_gym::ssd_cpu_forward", _ssd_cpu_autograd, setup_context=_ssd_cpu_setup_context)


def ssd_fused_cpu(x, dt, A, B, C, D=None, initial_state=None, state_every: int | None = None):
    """The recurrence of :func:`ssd_sequential` as one fused C++ loop per (batch, head), with its
    backward; same inputs and outputs. CPU tensors of one floating dtype (fp32 or fp64).
    state_every: also return the state entering every ``state_every``-th token (see :func:`ssd`):
    the kernel's checkpoints, taken at that spacing, with their gradient."""
    if not cpu_kernel_ready():
        raise RuntimeError("the fused CPU SSD kernel is not available (it needs a C++ compiler; "
                           "SSM_GYM_CPU_KERNEL=0 switches it off): use backend='torch'")
    dtype = x.dtype
    init = None if initial_state is None else initial_state.to(dtype).contiguous()
    args = (x.contiguous(), dt.to(dtype).contiguous(), A.to(dtype).contiguous(), B.to(dtype).contiguous(),
            C.to(dtype).contiguous(), init)
    if state_every is not None:
        b, l, h, p = x.shape
        y, final, ckpt = _ssd_cpu_forward(*args, state_every)
        # the kernel keeps a state as d_state rows of headdim values: (b, h, k, n, p) -> (b, k, h, p, n)
        states = ckpt.view(b, h, l // state_every, B.shape[-1], p).permute(0, 2, 1, 4, 3)
        return _add_skip(y, x, D), final, states
    grad = torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in args)
    # (checkpoints for the backward only where there will be one)
    y, final, _ = _ssd_cpu_forward(*args, CPU_KERNEL_CKPT if grad else 0)
    return _add_skip(y, x, D), final


# ---------------------------------------------------------------------------------------------
# 4. backend dispatch
# ---------------------------------------------------------------------------------------------
def ssd(x, dt, A, B, C, D=None, initial_state=None, chunk_size: int = 64, backend: str = "auto",
        state_every: int | None = None):
    """SSD scan with one state layout for every backend.

    backend: "torch" (chunked, pure PyTorch), "cpu" (the fused C++ kernel, error if it cannot be
    built), "mamba" (mamba-ssm CUDA kernel, error if missing), "sequential" (the reference), or
    "auto": on CPU tensors the fused kernel when it builds, else torch; on CUDA tensors mamba when
    importable and the chunk is at least MAMBA_MIN_CHUNK, else torch.

    state_every: also return ``states`` (b, l // state_every, h, p, n), the state entering every
    ``state_every``-th token (``states[:, 0]`` is the initial state), differentiable; the length
    must be a multiple. Training with noised copies reads it (``BlockwiseSSM.forward_paired``).
    mamba-ssm's kernel does not hand out these states: on CUDA the torch path computes them.
    """
    if state_every is not None:
        if state_every < 1 or x.shape[1] % state_every:
            raise ValueError(f"state_every must be >= 1 and divide the length {x.shape[1]}, got {state_every}")
        if backend == "sequential":
            return _sequential_with_states(x, dt, A, B, C, D, initial_state, state_every)
        if backend == "mamba" or (backend == "auto" and x.is_cuda):
            backend = "torch"
    if backend == "auto":
        if x.is_cuda:
            backend = "mamba" if (HAS_MAMBA_SSM and chunk_size >= MAMBA_MIN_CHUNK) else "torch"
        else:
            backend = "cpu" if x.device.type == "cpu" and cpu_kernel_ready() else "torch"
    if backend in ("torch", "cpu"):
        # the scan runs in fp32 (or fp64) even under bf16 autocast: decays and states need the range
        dtype = torch.promote_types(x.dtype, torch.float32)
        args = (x.to(dtype), dt.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype))
        Dd = None if D is None else D.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            if state_every is not None:  # (chunks of one state spacing: the chunk starts are the states)
                out = (ssd_chunked(*args, chunk_size=state_every, D=Dd, initial_state=initial_state, chunk_states=True)
                       if backend == "torch" else
                       ssd_fused_cpu(*args, D=Dd, initial_state=initial_state, state_every=state_every))
                return (out[0].to(x.dtype),) + tuple(out[1:])
            if backend == "torch":
                y, final = ssd_chunked(*args, chunk_size=chunk_size, D=Dd, initial_state=initial_state)
            else:
                y, final = ssd_fused_cpu(*args, D=Dd, initial_state=initial_state)
        return y.to(x.dtype), final
    if backend == "sequential":
        return ssd_sequential(x, dt, A, B, C, D=D, initial_state=initial_state)
    if backend == "mamba":
        if chunk_size < MAMBA_MIN_CHUNK:
            raise ValueError(f"backend='mamba' needs chunk_size >= {MAMBA_MIN_CHUNK} (its Triton kernels' "
                             f"tile size), got {chunk_size}")
        if not HAS_MAMBA_SSM:
            raise RuntimeError("backend='mamba' needs mamba-ssm (pip install ssm-gym[cuda])")
        init = None if initial_state is None else initial_state.float().contiguous()  # states stay fp32
        y, final = mamba_chunk_scan_combined(
            x.contiguous(), dt.contiguous(), A.float(), B.contiguous(), C.contiguous(), chunk_size,
            D=None if D is None else D.float(), initial_states=init, dt_softplus=False,
            return_final_states=True,
        )
        return y, final
    raise ValueError(f"unknown SSD backend {backend!r}")


def ssd_paired(x, dt, A, B, C, xn, dtn, Bn, Cn, D=None, initial_state=None, chunk_size: int = 64,
               backend: str = "auto"):
    """The scan of a sequence of frames and of a one-frame copy of each frame that starts from the
    state the sequence enters that frame with: what training with noised copies computes
    (:meth:`BlockwiseSSM.forward_paired`). x, dt, B, C as for :func:`ssd`, their length T frames of
    f tokens; xn, dtn, Bn, Cn the copies, (b * T, f, ...), copy ``i * T + t`` = frame t of
    sequence i. Returns ``(y, final_state, yn)``.

    Equal to ``ssd(..., state_every=f)`` followed by :func:`ssd` over the copies from those
    states (the reference, and every backend but the fused CPU kernel). On that kernel the
    states stay in its own layout between the two scans: the copies' scan reads its initial
    states in place from the first scan's checkpoints and writes their gradient the same way, where going through the
    public (headdim, d_state) layout costs transposing copies of every state each way (the
    states of every frame: 17 MB per layer of the default model's training step)."""
    f = xn.shape[1]
    if f < 1 or x.shape[1] % f or xn.shape[0] != x.shape[0] * (x.shape[1] // f):
        raise ValueError(f"copies {tuple(xn.shape)} are not one per frame of f tokens of x {tuple(x.shape)}")
    fused = backend == "cpu" or (backend == "auto" and x.device.type == "cpu" and cpu_kernel_ready())
    if not fused:
        y, final, states = ssd(x, dt, A, B, C, D=D, initial_state=initial_state, chunk_size=chunk_size,
                               backend=backend, state_every=f)
        yn, _ = ssd(xn, dtn, A, Bn, Cn, D=D, initial_state=states.reshape(-1, *states.shape[2:]),
                    chunk_size=chunk_size, backend=backend)
        return y, final, yn
    if not cpu_kernel_ready():
        raise RuntimeError("the fused CPU SSD kernel is not available (it needs a C++ compiler; "
                           "SSM_GYM_CPU_KERNEL=0 switches it off): use backend='torch'")
    dtype = torch.promote_types(x.dtype, torch.float32)  # (the scan runs in fp32 under autocast, as in ssd)

    def prep(*ts):
        return [t.to(dtype).contiguous() for t in ts]

    b, l, h, p = x.shape
    n, frames = B.shape[-1], l // f
    with torch.autocast(x.device.type, enabled=False):
        init = None if initial_state is None else initial_state.to(dtype).contiguous()
        y, final, ckpt = _ssd_cpu_forward(*prep(x, dt, A, B, C), init, f)
        starts = ckpt.view(b, h, frames, n, p)  # (read in place: copy i * frames + t starts from [i, :, t])
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (xn, dtn, A, Bn, Cn, starts))
        yn, _, _ = _ssd_cpu_forward(*prep(xn, dtn, A, Bn, Cn), starts, CPU_KERNEL_CKPT if grad else 0, frames)
        Dd = None if D is None else D.to(dtype)
        y, yn = _add_skip(y, x.to(dtype), Dd), _add_skip(yn, xn.to(dtype), Dd)
    return y.to(x.dtype), final, yn.to(xn.dtype)


# ---------------------------------------------------------------------------------------------
# 5. the Mamba-2 layer with the block-wise scan
# ---------------------------------------------------------------------------------------------
def same_dtype(*xs: Tensor) -> list[Tensor]:
    """The tensors in their promoted dtype. Under bf16 autocast the projections give bf16 while the
    scan and parameters stay fp32; an elementwise op on mixed dtypes takes torch's unvectorised
    casting loop on a CPU (5-10x slower than on one dtype), so they are made one first."""
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return [x.to(dtype) for x in xs]


def causal_depthwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The reference short convolution, channels last and without padding: x (n, L + k - 1, c),
    weight (c, k) -> (n, L, c), in the promoted dtype of x and weight (fp32 under bf16 autocast,
    as the scan it feeds). Written as k shifted multiply-adds: with torch 2.13 on this CPU that is
    2.4x faster than ``F.conv1d(groups=c)`` on the noised copies' many short sequences (L = 4)."""
    x, weight = same_dtype(x, weight)
    k = weight.shape[-1]
    length = x.shape[1] - k + 1
    y = x[:, :length] * weight[:, 0]
    for i in range(1, k):
        y = y + x[:, i:i + length] * weight[:, i]
    return y if bias is None else y + bias


@torch.library.custom_op("ssm_gym::conv_silu_cpu_forward", mutates_args=())
def _conv_silu_cpu_forward(xp: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    return cpu_kernel().conv_forward(xp, w, bias)


@_conv_silu_cpu_forward.register_fake
def _(xp, w, bias):
    return w.new_empty(xp.shape[0], xp.shape[1] - w.shape[0] + 1, xp.shape[2])


@torch.library.custom_op("ssm_gym::conv_silu_cpu_backward", mutates_args=())
def _conv_silu_cpu_backward(xp: Tensor, w: Tensor, bias: Tensor | None, gy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    gxp, gw, gb = cpu_kernel().conv_backward(xp, w, bias, gy)
    return gxp, gw, gb


@_conv_silu_cpu_backward.register_fake
def _(xp, w, bias, gy):
    return xp.new_empty(xp.shape), w.new_empty(w.shape), w.new_empty(w.shape[1])


def _conv_silu_setup_context(ctx, inputs, output):
    xp, w, bias = inputs
    ctx.save_for_backward(xp, w, bias)
    ctx.has_bias = bias is not None


def _conv_silu_autograd(ctx, gy):
    xp, w, bias = ctx.saved_tensors
    gxp, gw, gb = _conv_silu_cpu_backward(xp, w, bias if ctx.has_bias else None, gy.contiguous())
    return gxp, gw, gb if ctx.has_bias else None


torch.library.register_autograd("ssm_gym::conv_silu_cpu_forward", _conv_silu_autograd,
                                setup_context=_conv_silu_setup_context)


def conv_silu(x: Tensor, weight: Tensor, bias: Tensor | None, fused: bool = True) -> Tensor:
    """silu(causal_depthwise_conv(x, weight, bias)), the mixer's convolution and the activation
    after it: x (n, L + k - 1, c) -> (n, L, c) in the promoted dtype of x and weight (at least
    fp32). ``fused``: on CPU tensors, one pass of the compiled kernel forward and one backward
    (``csrc/ssd_cpu.cpp``; 1 + k + 2 passes over memory each way in torch), where it builds;
    :func:`causal_depthwise_conv` with ``F.silu`` is the reference it is tested against."""
    if not (fused and x.device.type == "cpu" and cpu_kernel_ready()):
        return F.silu(causal_depthwise_conv(x, weight, bias))
    x, acc = kernel_dtypes(x, weight)
    with torch.autocast("cpu", enabled=False):
        return _conv_silu_cpu_forward(x.contiguous(), weight.to(acc).t().contiguous(),
                                      None if bias is None else bias.to(acc).contiguous())


@torch.library.custom_op("ssm_gym::gated_norm_cpu_forward", mutates_args=())
def _gated_norm_cpu_forward(y: Tensor, z: Tensor, w: Tensor, eps: float, out_bf16: bool) -> tuple[Tensor, Tensor]:
    out, rstd = cpu_kernel().gated_norm_forward(y, z, w, eps, out_bf16)
    return out, rstd


@_gated_norm_cpu_forward.register_fake
def _(y, z, w, eps, out_bf16):
    return y.new_empty(y.shape, dtype=torch.bfloat16 if out_bf16 else y.dtype), y.new_empty(y.shape[0])


@torch.library.custom_op("ssm_gym::gated_norm_cpu_backward", mutates_args=())
def _gated_norm_cpu_backward(go: Tensor, y: Tensor, z: Tensor, w: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    gy, gz, gw = cpu_kernel().gated_norm_backward(go, y, z, w, rstd)
    return gy, gz, gw


@_gated_norm_cpu_backward.register_fake
def _(go, y, z, w, rstd):
    return y.new_empty(y.shape), z.new_empty(z.shape), w.new_empty(w.shape)


def _gated_norm_setup_context(ctx, inputs, output):
    y, z, w, _, _ = inputs
    ctx.save_for_backward(y, z, w, output[1])
    ctx.set_materialize_grads(False)


def _gated_norm_autograd(ctx, gout, grstd):
    y, z, w, rstd = ctx.saved_tensors
    if gout is None:  # (only rstd used: it carries no gradient of its own)
        return None, None, None, None, None
    gy, gz, gw = _gated_norm_cpu_backward(gout.contiguous(), y, z, w, rstd)
    return gy, gz, gw, None, None


torch.library.register_autograd("ssm_gym::gated_norm_cpu_forward", _gated_norm_autograd,
                                setup_context=_gated_norm_setup_context)


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) * weight, as in Mamba-2's output norm. ``fused``: on CPU tensors the
    compiled kernel (``csrc/ssd_cpu.cpp``: one pass forward and one backward, where torch makes
    eleven), where it builds; under CPU bf16 autocast it then returns bf16 at once (the
    out-projection after it would cast to that). The torch expression is the reference."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: Tensor, z: Tensor, fused: bool = False) -> Tensor:
        if fused and y.device.type == "cpu" and cpu_kernel_ready():
            return self._fused(y, z)
        y, z = same_dtype(y, z)
        y = y * F.silu(z)
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def _fused(self, y: Tensor, z: Tensor) -> Tensor:
        z, acc = kernel_dtypes(z, y, self.weight)
        out_bf16 = acc == torch.float32 and cpu_autocast_bf16()
        shape = y.shape
        with torch.autocast("cpu", enabled=False):
            out, _ = _gated_norm_cpu_forward(y.to(acc).reshape(-1, shape[-1]).contiguous(),
                                             z.reshape(-1, shape[-1]).contiguous(), self.weight.to(acc).contiguous(),
                                             self.eps, out_bf16)
        return out.reshape(shape)


def to_blocks(x: Tensor, block: tuple[int, int]) -> Tensor:
    """(B, T, H, W, D) -> (B, nblocks, T*bh*bw, D): each block is a sequence over all frames,
    frame-major, raster order inside the block; blocks in raster order over the grid."""
    b, t, hh, ww, d = x.shape
    bh, bw = block
    x = x.reshape(b, t, hh // bh, bh, ww // bw, bw, d)
    x = x.permute(0, 2, 4, 1, 3, 5, 6)  # (B, nbh, nbw, T, bh, bw, D)
    return x.reshape(b, (hh // bh) * (ww // bw), t * bh * bw, d)


def from_blocks(x: Tensor, grid: tuple[int, int], block: tuple[int, int]) -> Tensor:
    """Inverse of :func:`to_blocks`."""
    b, _, length, d = x.shape
    hh, ww = grid
    bh, bw = block
    t = length // (bh * bw)
    x = x.reshape(b, hh // bh, ww // bw, t, bh, bw, d).permute(0, 3, 1, 4, 2, 5, 6)
    return x.reshape(b, t, hh, ww, d)


class BlockwiseSSM(nn.Module):
    """Mamba-2 mixer over video tokens with the block-wise spatial scan.

    Input ``x (B, T, H, W, d_model)`` = T frames of an H x W token grid. ``block_size`` (b_h, b_w)
    must divide the grid; ``None`` or the full grid = one scan over the flattened frames (the
    "no block-wise scan" baseline). ``forward(x, state) -> (y, new_state)``: feeding a long
    video in pieces with the returned state gives the same outputs as feeding it whole; a
    piece of one frame is the inference step. State = ``(conv_state, ssm_state)`` with shapes
    ``(B, nblocks, conv_dim, d_conv-1)`` and ``(B, nblocks, nheads, headdim, d_state)``.
    """

    def __init__(
        self,
        d_model: int,
        grid: tuple[int, int],
        block_size: tuple[int, int] | None = None,
        d_state: int = 16,
        expand: int = 2,
        headdim: int = 32,
        ngroups: int = 1,
        d_conv: int = 4,
        chunk_size: int = 64,
        backend: str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        A_init_range: tuple[float, float] = (1.0, 16.0),
    ):
        super().__init__()
        self.grid = tuple(grid)
        self.block = tuple(block_size) if block_size is not None else self.grid
        assert self.grid[0] % self.block[0] == 0 and self.grid[1] % self.block[1] == 0, "block must divide grid"
        self.nblocks = (self.grid[0] // self.block[0]) * (self.grid[1] // self.block[1])
        self.d_model, self.d_state, self.ngroups, self.headdim = d_model, d_state, ngroups, headdim
        self.d_inner = expand * d_model
        assert self.d_inner % headdim == 0
        self.nheads = self.d_inner // headdim
        assert self.nheads % ngroups == 0
        self.d_conv, self.chunk_size, self.backend = d_conv, chunk_size, backend
        self.conv_dim = self.d_inner + 2 * ngroups * d_state

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=False)
        if d_conv > 0:
            self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, bias=True)
        # dt initialised log-uniform in [dt_min, dt_max]; dt_bias = softplus^-1(dt)
        dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = GatedRMSNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    # -- state ---------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None, dtype=torch.float32):
        conv = torch.zeros(batch_size, self.nblocks, self.conv_dim, max(self.d_conv - 1, 0), device=device, dtype=dtype)
        ssm = torch.zeros(batch_size, self.nblocks, self.nheads, self.headdim, self.d_state, device=device, dtype=dtype)
        return conv, ssm

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: Tensor, state=None, sizes: Tensor | None = None):
        """sizes (B, T, nblocks) int: state compression, each block's state uses only its first
        ``sizes`` d_state dimensions at that frame (B and C zero past it); None = all."""
        b, t = x.shape[:2]
        z, xBC, dt = self._project(x)
        conv_state, ssm_state = state if state is not None else (None, None)
        xBC, new_conv, _ = self._conv(xBC, conv_state, b)
        xs, Bm, Cm, dt = self._scan_inputs(xBC, dt)
        if sizes is not None:  # (B, T, nb) -> per token of each block sequence (frame-major)
            L = xs.shape[1]
            per_tok = sizes.transpose(1, 2).reshape(-1, t).repeat_interleave(L // t, dim=1)
            dims = (torch.arange(self.d_state, device=x.device) < per_tok[..., None])[:, :, None, :].to(Bm.dtype)
            Bm, Cm = Bm * dims, Cm * dims
        init = None if ssm_state is None else ssm_state.reshape(-1, self.nheads, self.headdim, self.d_state)
        y, final = ssd(xs, dt, self._A(), Bm, Cm, D=self.D, initial_state=init,
                       chunk_size=self.chunk_size, backend=self.backend)
        new_ssm = final.reshape(b, self.nblocks, self.nheads, self.headdim, self.d_state)
        return self._output(y, z, b, t), (new_conv, new_ssm)

    def forward_paired(self, x: Tensor, x_noisy: Tensor, state=None):
        """Clean frames and a noised copy of each: ``x``, ``x_noisy`` (B, T, H, W, d_model).

        The clean frames run as in :meth:`forward`. The copy of frame t continues from the clean
        history: its scan starts from the state the clean frames leave before frame t, its
        convolution reads the clean tokens before it, and it changes no state. So its output equals
        a one-frame :meth:`forward` of the noised frame from the state after clean frames < t, for
        every t at once. Returns ``(y, y_noisy, new_state)``, the state after the clean frames."""
        b, t = x.shape[:2]
        f = self.block[0] * self.block[1]  # tokens of one frame in a block sequence
        z, xBC, dt = self._project(x)
        zn, xBCn, dtn = self._project(x_noisy)
        conv_state, ssm_state = state if state is not None else (None, None)
        xBC, new_conv, padded = self._conv(xBC, conv_state, b)
        if self.d_conv > 0:  # each copy's convolution window: the k clean tokens before its frame, then itself
            k, bnb = self.d_conv - 1, xBCn.shape[0]
            win = xBCn.reshape(bnb, t, f, self.conv_dim)
            if k > 0:
                before = padded.unfold(1, k, f)[:, :t].transpose(2, 3)  # (bnb, T, k, conv_dim)
                win = torch.cat([before, win], 2)
            xBCn = conv_silu(win.reshape(bnb * t, k + f, self.conv_dim), self.conv1d.weight[:, 0], self.conv1d.bias,
                             fused=self.backend in ("auto", "cpu"))
        else:
            xBCn = F.silu(xBCn)
        xs, Bm, Cm, dt = self._scan_inputs(xBC, dt)
        A = self._A()
        init = None if ssm_state is None else ssm_state.reshape(-1, self.nheads, self.headdim, self.d_state)
        # every copy is a sequence of one frame's tokens, starting from its clean state
        xsn, Bn, Cn, dtn = self._scan_inputs(xBCn.reshape(-1, f, self.conv_dim), dtn.reshape(-1, f, self.nheads))
        y, final, yn = ssd_paired(xs, dt, A, Bm, Cm, xsn, dtn, Bn, Cn, D=self.D, initial_state=init,
                                  chunk_size=self.chunk_size, backend=self.backend)
        new_ssm = final.reshape(b, self.nblocks, self.nheads, self.headdim, self.d_state)
        return (self._output(y, z, b, t), self._output(yn.reshape(y.shape), zn, b, t), (new_conv, new_ssm))

    def _A(self) -> Tensor:
        return -torch.exp(self.A_log.float())

    def _project(self, x: Tensor):
        """Tokens (B, T, H, W, D) -> block sequences (B*nb, L, .) of z, xBC (before the conv), dt."""
        assert tuple(x.shape[2:4]) == self.grid, f"expected a {self.grid} token grid, got {tuple(x.shape[2:4])}"
        seq = to_blocks(x, self.block)  # (B, nb, L, D)
        zxbcdt = self.in_proj(seq).reshape(seq.shape[0] * seq.shape[1], seq.shape[2], -1)
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _conv(self, xBC: Tensor, conv_state: Tensor | None, b: int):
        """Short causal convolution and SiLU over the block sequences (B*nb, L, conv_dim),
        continuing from ``conv_state``. Returns (the activated xBC, the new conv state, the padded
        input (B*nb, k + L, conv_dim))."""
        if self.d_conv == 0:
            return F.silu(xBC), conv_state, None
        k = self.d_conv - 1
        bnb = xBC.shape[0]
        prev = (xBC.new_zeros(bnb, k, self.conv_dim) if conv_state is None
                else conv_state.reshape(bnb, self.conv_dim, k).transpose(1, 2).to(xBC.dtype))
        padded = torch.cat([prev, xBC], dim=1)
        new_conv = padded[:, padded.shape[1] - k:].transpose(1, 2).reshape(b, self.nblocks, self.conv_dim, k)
        y = conv_silu(padded, self.conv1d.weight[:, 0], self.conv1d.bias, fused=self.backend in ("auto", "cpu"))
        return y, new_conv, padded

    def _scan_inputs(self, xBC: Tensor, dt: Tensor):
        """(x, B, C, dt) of the scan from the activated xBC (n, L, conv_dim) and raw dt (n, L, heads)."""
        n, L = xBC.shape[:2]
        xs, Bm, Cm = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        return (xs.reshape(n, L, self.nheads, self.headdim), Bm.reshape(n, L, self.ngroups, self.d_state),
                Cm.reshape(n, L, self.ngroups, self.d_state), F.softplus(dt + self.dt_bias))

    def _output(self, y: Tensor, z: Tensor, b: int, t: int) -> Tensor:
        """Scan output (B*nb, L, heads, headdim) -> gated norm, out-projection, back to (B, T, H, W, D)."""
        y = self.norm(y.reshape(*z.shape[:2], self.d_inner), z, fused=self.backend in ("auto", "cpu"))
        y = self.out_proj(y).reshape(b, self.nblocks, -1, self.d_model)
        return from_blocks(y, self.grid, self.block)
