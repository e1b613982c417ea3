"""Mamba-2 (SSD) state-space layer with the block-wise spatial scan.

Read top to bottom:

1. ``ssd_sequential``: the plain recurrence, one token at a time. The reference.
2. ``ssd_chunked``: the same map computed in chunks (the "state-space dual" form of Mamba-2):
   quadratic attention-like products inside a chunk, a short recurrence between chunks.
   Pure PyTorch, runs anywhere; the default backend.
3. ``ssd``: dispatch between the torch path and mamba-ssm's fused CUDA kernel
   (``mamba_chunk_scan_combined``) when it is importable and the tensors live on a GPU.
   Both backends use the same state layout ``(batch, nheads, headdim, d_state)``.
4. ``BlockwiseSSM``: a Mamba-2 mixer (in-projection, short causal conv, SSD, gated RMSNorm,
   out-projection) applied to video tokens ``(B, T, H, W, D)`` with the block-wise scan of
   Po et al. 2025: the H x W token grid is cut into (b_h, b_w) blocks, each block is one
   sequence over all frames (frame-major, raster order inside the block) with its own state.

The recurrence, per head (x: headdim vector, h: headdim x d_state state)::

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T        y_t = h_t C_t + D * x_t

with ``A < 0`` a scalar per head and ``dt_t > 0`` a per-token, per-head step size.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

try:  # optional CUDA kernels (pip install ssm-gym[cuda])
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    HAS_MAMBA_SSM = True
except Exception:  # ImportError, or a broken triton/CUDA install
    mamba_chunk_scan_combined = None
    HAS_MAMBA_SSM = False


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
    if D is not None:
        y = y + D[:, None] * x if D.dim() == 1 else y + D * x
    return y, state


# ---------------------------------------------------------------------------------------------
# 2. chunked SSD (pure PyTorch)
# ---------------------------------------------------------------------------------------------
def segsum(a: Tensor) -> Tensor:
    """out[..., i, j] = a[..., j+1] + ... + a[..., i] for i >= j, -inf above the diagonal.

    Computed as a masked cumulative sum (not as a difference of cumsums), so that exp(out)
    keeps full relative precision even when the total decay over a chunk is large.
    """
    q = a.shape[-1]
    rep = a[..., :, None].expand(*a.shape, q)  # rep[..., i, j] = a_i
    strict = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device), diagonal=-1)
    out = rep.masked_fill(~strict, 0).cumsum(dim=-2)
    lower = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device))
    return out.masked_fill(~lower, -math.inf)


def ssd_chunked(x, dt, A, B, C, chunk_size: int = 64, D=None, initial_state=None):
    """Chunked SSD: same inputs and outputs as :func:`ssd_sequential`.

    The sequence is cut into chunks of ``chunk_size`` tokens. Inside a chunk the output is a
    masked (decay-weighted) ``C B^T`` product applied to ``dt * x``; each chunk also emits the
    state it would leave behind from a zero start; a recurrence over chunks (done as one small
    matrix product over chunk indices) adds the state carried in from earlier chunks.
    """
    b, l, h, p = x.shape
    n = B.shape[-1]
    q = max(1, min(chunk_size, l))
    pad = (-l) % q
    if pad:  # dt = 0 on padding: no decay and no input, so the final state is unchanged
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    c = (l + pad) // q
    xdt = (x * dt[..., None]).reshape(b, c, q, h, p)
    Bh = _expand_groups(B, h).reshape(b, c, q, h, n)
    Ch = _expand_groups(C, h).reshape(b, c, q, h, n)
    a = (dt * A).reshape(b, c, q, h).permute(0, 3, 1, 2)  # (b, h, c, q)

    seg = segsum(a)  # (b, h, c, q, q)
    decay_in = torch.exp(seg)  # token j -> token i inside a chunk
    # 1. intra-chunk (diagonal blocks)
    scores = torch.einsum("bcihn,bcjhn->bhcij", Ch, Bh) * decay_in
    y = torch.einsum("bhcij,bcjhp->bcihp", scores, xdt)
    # 2. state each chunk produces from a zero start: decay from token j to the chunk's end
    decay_to_end = decay_in[..., -1, :]  # (b, h, c, q)
    chunk_states = torch.einsum("bcjhn,bhcj,bcjhp->bchpn", Bh, decay_to_end, xdt)
    # 3. recurrence over chunks: S_0 = initial, S_{m+1} = exp(sum a in chunk m) S_m + chunk_states_m
    init = x.new_zeros(b, h, p, n) if initial_state is None else initial_state.to(x.dtype)
    z = torch.cat([init[:, None], chunk_states], dim=1)  # (b, c+1, h, p, n)
    chunk_decay = seg[..., -1, 0] + a[..., 0]  # total log-decay of each chunk, (b, h, c)
    decay_chunks = torch.exp(segsum(F.pad(chunk_decay, (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhij,bjhpn->bihpn", decay_chunks, z)
    prev_states, final_state = states[:, :-1], states[:, -1]
    # 4. contribution of the carried-in state to each token: decay from chunk start to token i
    decay_from_start = torch.exp(seg[..., :, 0] + a[..., :1])  # (b, h, c, q)
    y = y + torch.einsum("bcihn,bchpn,bhci->bcihp", Ch, prev_states, decay_from_start)

    y = y.reshape(b, c * q, h, p)[:, :l]
    if D is not None:
        y = y + (D[:, None] if D.dim() == 1 else D) * x[:, :l]
    return y, final_state


# ---------------------------------------------------------------------------------------------
# 3. backend dispatch
# ---------------------------------------------------------------------------------------------
def ssd(x, dt, A, B, C, D=None, initial_state=None, chunk_size: int = 64, backend: str = "auto"):
    """SSD scan with one state layout for every backend.

    backend: "torch" (chunked, pure PyTorch), "mamba" (mamba-ssm CUDA kernel, error if missing),
    "sequential" (the reference), or "auto" (mamba on CUDA tensors when importable, else torch).
    """
    if backend == "auto":
        backend = "mamba" if (HAS_MAMBA_SSM and x.is_cuda) else "torch"
    if backend == "torch":
        return ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, D=D, initial_state=initial_state)
    if backend == "sequential":
        return ssd_sequential(x, dt, A, B, C, D=D, initial_state=initial_state)
    if backend == "mamba":
        if not HAS_MAMBA_SSM:
            raise RuntimeError("backend='mamba' needs mamba-ssm (pip install ssm-gym[cuda])")
        init = None if initial_state is None else initial_state.to(x.dtype).contiguous()
        y, final = mamba_chunk_scan_combined(
            x.contiguous(), dt.contiguous(), A.float(), B.contiguous(), C.contiguous(), chunk_size,
            D=None if D is None else D.float(), initial_states=init, dt_softplus=False,
            return_final_states=True,
        )
        return y, final
    raise ValueError(f"unknown SSD backend {backend!r}")


# ---------------------------------------------------------------------------------------------
# 4. the Mamba-2 layer with the block-wise scan
# ---------------------------------------------------------------------------------------------
class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) * weight, as in Mamba-2's output norm."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        y = y * F.silu(z)
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


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
        block_size: Optional[tuple[int, int]] = None,
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
    def forward(self, x: Tensor, state=None):
        b, t, hh, ww, _ = x.shape
        assert (hh, ww) == self.grid, f"expected a {self.grid} token grid, got {(hh, ww)}"
        seq = to_blocks(x, self.block)  # (B, nb, L, D)
        nb, L = seq.shape[1], seq.shape[2]
        zxbcdt = self.in_proj(seq).reshape(b * nb, L, -1)
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

        conv_state, ssm_state = state if state is not None else (None, None)
        new_conv = None
        if self.d_conv > 0:
            k = self.d_conv - 1
            xBC = xBC.transpose(1, 2)  # (b*nb, conv_dim, L)
            prev = (xBC.new_zeros(b * nb, self.conv_dim, k) if conv_state is None
                    else conv_state.reshape(b * nb, self.conv_dim, k).to(xBC.dtype))
            xBC = torch.cat([prev, xBC], dim=-1)
            new_conv = xBC[..., -k:].reshape(b, nb, self.conv_dim, k) if k > 0 else xBC[..., :0].reshape(b, nb, self.conv_dim, 0)
            xBC = F.conv1d(xBC, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim).transpose(1, 2)
        elif conv_state is not None:
            new_conv = conv_state
        xBC = F.silu(xBC)
        xs, Bm, Cm = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        xs = xs.reshape(b * nb, L, self.nheads, self.headdim)
        Bm = Bm.reshape(b * nb, L, self.ngroups, self.d_state)
        Cm = Cm.reshape(b * nb, L, self.ngroups, self.d_state)
        dt = F.softplus(dt + self.dt_bias)
        A = -torch.exp(self.A_log.float())
        init = None if ssm_state is None else ssm_state.reshape(b * nb, self.nheads, self.headdim, self.d_state)
        y, final = ssd(xs, dt, A.to(xs.dtype), Bm, Cm, D=self.D.to(xs.dtype), initial_state=init,
                       chunk_size=self.chunk_size, backend=self.backend)
        y = self.norm(y.reshape(b * nb, L, self.d_inner), z)
        y = self.out_proj(y).reshape(b, nb, L, self.d_model)
        new_ssm = final.reshape(b, nb, self.nheads, self.headdim, self.d_state)
        return from_blocks(y, self.grid, self.block), (new_conv, new_ssm)
