"""Dense frame-local attention (Po et al. 2025) and the full causal baseline.

Tokens come as ``(B, T, N, D)``: T frames of N tokens. A token of frame t attends to every token
of frames ``t-k+1 .. t`` (its own frame bidirectionally, across spatial block boundaries);
``window=None`` means every past frame (the full-context causal transformer baseline).
Frame order enters through a rotary embedding of the frame index (relative in time; the token
grid position is added to the tokens by the model), so a ring buffer of the last ``k`` frames
is all the step-by-step inference needs: constant memory per layer.

Three forms, one module:
- parallel (training): queries are processed in chunks of frames, each chunk against only the
  keys it can see, with a frame-level mask expanded to tokens (``F.scaled_dot_product_attention``);
- pieces: the same code with a :class:`KVCache` of past frames prepended to the keys;
- step (inference, one frame, local window): the ring has ``k`` slots, one more than the past
  frames it holds, so the frame being processed is written into its own slot (the one of frame
  t-k, which no frame from t on can see) and attends over the ring in place: no copy of the
  cache per call. With state compression the kept tokens are gathered first, so the work
  follows the number of tokens kept (:meth:`FrameLocalAttention._step`);
- pool step (inference with dynamic state compression): the past is a :class:`TokenPool`, a
  compact list of the *kept* tokens of the frames still in the window, read in place by the
  step; a stored frame's kept tokens move into free entries, a frame that leaves the window
  frees its entries (:meth:`FrameLocalAttention._pool_step`). No dense ring is rebuilt, so the
  state held between steps and the attention work both follow the number of kept tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssm_gym.model import native, pointwise


def tensor_bytes(*xs: Tensor) -> int:
    return sum(x.numel() * x.element_size() for x in xs)


@dataclass
class KVCache:
    """Keys/values of past frames. ``k, v``: (B, S, N, heads, head_dim) (keys already rotated);
    ``pos``: (B, S) frame index stored in each slot, -1 = empty; ``keep``: (B, S, N) bool, False
    for tokens dropped by state compression (invisible to later frames). Local attention: a ring
    of S = k slots (frame p lives in slot p % S); the slot of the next frame is empty (pos -1)
    and is its scratch space during a step. Full attention: slot = frame index, grown on demand."""

    k: Tensor
    v: Tensor
    pos: Tensor
    keep: Tensor

    def map(self, fn) -> KVCache:
        return KVCache(fn(self.k), fn(self.v), fn(self.pos), fn(self.keep))

    def reset_(self, mask: Tensor) -> None:
        self.pos[mask] = -1
        self.keep[mask] = True

    def nbytes(self) -> int:
        return tensor_bytes(self.k, self.v, self.pos, self.keep)


@dataclass
class TokenPool:
    """Kept keys/values of past frames, compact (dynamic state compression, step by step).

    ``k, v``: (B, P, heads, head_dim) (keys already rotated); ``pos`` (B, P) frame index of each
    entry, -1 = free; ``tok`` (B, P) its token index within that frame (to rebuild the ring).
    The last ``n_tok`` entries are the scratch space of the frame being processed (never stored:
    its kept tokens move from there into free entries of the rest). Entries are in no particular
    order; a frame that leaves the attention window frees its entries. All envs of a batch share
    the capacity P (the largest env's count plus some slack): grown on demand by the step,
    shrunk by :meth:`compact_`."""

    k: Tensor
    v: Tensor
    pos: Tensor
    tok: Tensor
    n_tok: int

    @property
    def main(self) -> int:
        """Entries that hold stored tokens (the rest is the scratch space)."""
        return self.pos.shape[1] - self.n_tok

    def map(self, fn) -> TokenPool:
        return TokenPool(fn(self.k), fn(self.v), fn(self.pos), fn(self.tok), self.n_tok)

    def reset_(self, mask: Tensor) -> None:
        self.pos[mask] = -1

    def nbytes(self) -> int:
        return tensor_bytes(self.k, self.v, self.pos, self.tok)

    def used(self) -> Tensor:
        """(B,) stored tokens per env."""
        return (self.pos[:, :self.main] >= 0).sum(1)

    def resize_(self, main: int) -> None:
        """Give every env ``main`` stored entries (in place). Growing keeps every entry where it
        is; shrinking first moves each env's stored tokens to the front (``main`` must hold them)."""
        old = self.main
        if main == old:
            return
        b, n = self.pos.shape[0], self.n_tok
        keep = min(main, old)
        if main < old and b and int(self.used().max()) > main:
            raise ValueError(f"cannot shrink a token pool to {main} entries: an env stores {int(self.used().max())}")
        if main < old:  # compact: each env's stored entries first (stable), then the free ones
            order = torch.argsort((self.pos[:, :old] < 0).to(torch.uint8), dim=1, stable=True)[:, :main]
            rows = torch.arange(b, device=order.device)[:, None]
            front = [x[rows, order] for x in (self.k, self.v, self.pos, self.tok)]
        else:
            front = [x[:, :keep] for x in (self.k, self.v, self.pos, self.tok)]
        fields = []
        for x, f, fill in zip((self.k, self.v, self.pos, self.tok), front, (0, 0, -1, 0)):
            y = x.new_full((b, main + n, *x.shape[2:]), fill)
            y[:, :keep] = f[:, :keep]
            y[:, main:] = x[:, old:]  # the scratch space
            fields.append(y)
        self.k, self.v, self.pos, self.tok = fields

    def compact_(self, slack: int) -> None:
        """Shrink to the largest env's count + ``slack`` when more than twice that slack is free
        (hysteresis: a pool that just grew is not shrunk at once)."""
        need = int(self.used().max()) + slack if self.pos.shape[0] else 0
        if self.main > need + slack:
            self.resize_(need)

    @staticmethod
    def from_ring(cache: KVCache, slack: int) -> TokenPool:
        """The stored tokens of a ring (as :meth:`CompactTokens.from_ring`) as a pool with room
        for ``slack`` more per env."""
        flat = CompactTokens.from_ring(cache)
        b, n = flat.counts.shape[0], flat.n_tok
        main = (int(flat.counts.max()) if b else 0) + slack
        pool = TokenPool(flat.k.new_zeros(b, main + n, *flat.k.shape[1:]), flat.v.new_zeros(b, main + n, *flat.v.shape[1:]),
                         flat.pos.new_full((b, main + n), -1), flat.tok.new_zeros(b, main + n), n)
        env = torch.repeat_interleave(torch.arange(b, device=flat.counts.device), flat.counts)
        entry = torch.arange(len(env), device=env.device) - (flat.counts.cumsum(0) - flat.counts)[env]  # 0.. per env
        pool.k[env, entry], pool.v[env, entry], pool.pos[env, entry], pool.tok[env, entry] = flat.k, flat.v, flat.pos, flat.tok
        return pool

    def to_ring(self, slots: int, window: int | None) -> KVCache:
        """The dense ring (``slots`` slots) holding these tokens (see :func:`ring_from_tokens`)."""
        bi, ei = (self.pos[:, :self.main] >= 0).nonzero(as_tuple=True)
        return ring_from_tokens(self.pos.shape[0], slots, self.n_tok, window, bi, self.pos[bi, ei], self.tok[bi, ei],
                                self.k[bi, ei], self.v[bi, ei])

    @staticmethod
    def cat(pools: list[TokenPool]) -> TokenPool:
        """Envs of several pools, in order (each brought to the largest capacity first)."""
        main = max(p.main for p in pools)
        grown = []
        for p in pools:
            p = p.map(lambda x: x)  # (a new object over the same tensors: resizing it leaves p alone)
            p.resize_(main)
            grown.append(p)
        return TokenPool(*(torch.cat([getattr(p, f) for p in grown]) for f in ("k", "v", "pos", "tok")), pools[0].n_tok)


@dataclass
class CompactTokens:
    """The stored tokens of a ring (kept tokens of filled slots), nothing else: the smallest
    form of a compressed attention cache, for storage between steps (a step rebuilds the ring).
    ``k, v`` (M, heads, head_dim), ``pos`` (M,) frame index, ``tok`` (M,) int16 token index:
    the tokens of env 0, then env 1, ...; ``counts`` (B,) tokens per env; ``n_tok`` per frame."""

    k: Tensor
    v: Tensor
    pos: Tensor
    tok: Tensor
    counts: Tensor
    n_tok: int

    @staticmethod
    def from_ring(cache: KVCache) -> CompactTokens:
        b, s, n = cache.keep.shape
        stored = cache.keep & (cache.pos >= 0)[..., None]
        bi, si, ti = stored.nonzero(as_tuple=True)
        return CompactTokens(cache.k[stored], cache.v[stored], cache.pos[bi, si], ti.to(torch.int16),
                             stored.flatten(1).sum(1), n)

    def to_ring(self, slots: int, window: int | None) -> KVCache:
        b = self.counts.shape[0]
        env = torch.repeat_interleave(torch.arange(b, device=self.counts.device), self.counts)
        return ring_from_tokens(b, slots, self.n_tok, window, env, self.pos, self.tok, self.k, self.v)

    @staticmethod
    def cat(parts: list[CompactTokens]) -> CompactTokens:
        return CompactTokens(*(torch.cat([getattr(p, f) for p in parts]) for f in ("k", "v", "pos", "tok", "counts")),
                             parts[0].n_tok)

    def nbytes(self) -> int:
        return tensor_bytes(self.k, self.v, self.pos, self.tok, self.counts)


def ring_from_tokens(b: int, slots: int, n_tok: int, window: int | None, env: Tensor, frame: Tensor, tok: Tensor,
                     k: Tensor, v: Tensor) -> KVCache:
    """A dense ring of ``slots`` slots (frame p in slot p % slots for local windows, slot p for
    full attention) holding the given stored tokens (env, frame, token index, key, value; one
    row each); every other token of a slot is not kept."""
    shape = (b, slots, n_tok, *k.shape[1:])
    ring = KVCache(k.new_zeros(shape), v.new_zeros(shape), frame.new_full((b, slots), -1),
                   torch.zeros(b, slots, n_tok, dtype=torch.bool, device=frame.device))
    slot = frame % slots if window is not None else frame
    tok = tok.long()
    ring.k[env, slot, tok], ring.v[env, slot, tok] = k, v
    ring.pos[env, slot], ring.keep[env, slot, tok] = frame, True
    return ring


def rope_tables(pos: Tensor, head_dim: int, base: float, dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables (B, T, 1, 1, head_dim/2) for integer frame positions (B, T).
    Angles are computed in float64 so that long episodes (large indices) keep full precision."""
    inv_freq = base ** (-torch.arange(0, head_dim // 2, dtype=torch.float64, device=pos.device) / (head_dim // 2))
    ang = pos.to(torch.float64)[..., None] * inv_freq
    return ang.cos().to(dtype)[:, :, None, None], ang.sin().to(dtype)[:, :, None, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


# ---------------------------------------------------------------------------------------------
# The fused CPU kernel for training in bf16 (csrc/attention_cpu.cpp): frame-window attention of a
# whole clip, forward and backward, on the AVX-512 BF16 units with no score tensor in memory.
# Used by FrameLocalAttention._clip where it applies (see _fused_applies); torch's attention
# (the reference it is tested against) everywhere else.
# ---------------------------------------------------------------------------------------------
ATTENTION_KERNEL = native.Kernel("ssm_gym_attention_cpu", "attention_cpu.cpp", "fused CPU attention kernel",
                                 "using torch's attention", switch="SSM_GYM_CPU_ATTENTION")
FUSED_SIZES = (16, 32, 64)  # tokens per frame and head_dim the kernel takes


_attention_kernel_usable: bool | None = None  # (a plain global once known: torch.compile traces its read)


def attention_kernel():
    """The compiled kernel where this CPU and compiler have AVX-512 BF16, else None."""
    global _attention_kernel_usable
    if _attention_kernel_usable is None:
        kernel = ATTENTION_KERNEL.get()
        _attention_kernel_usable = kernel is not None and bool(kernel.available())
    return ATTENTION_KERNEL.module if _attention_kernel_usable and ATTENTION_KERNEL.enabled else None


def attention_kernel_ready() -> bool:
    return attention_kernel() is not None


def fused_attention(enabled: bool):
    """Within the block, use the fused kernel where it applies (``True``, the default outside) or
    torch's attention everywhere (``False``): for comparisons and benchmarks."""
    return ATTENTION_KERNEL.switched(enabled)


@torch.library.custom_op("ssm_gym::window_attention_forward", mutates_args=())
def _window_attention_forward(q: Tensor, k: Tensor, v: Tensor, kx: Tensor | None, vx: Tensor | None,
                              window: int) -> tuple[Tensor, Tensor]:
    # (the loaded module itself: fused_attention(False) around a backward must not hide it from
    # the gradient of a forward that took it)
    out, lse = ATTENTION_KERNEL.module.forward(q, k, v, kx, vx, window)
    return out, lse


@_window_attention_forward.register_fake
def _(q, k, v, kx, vx, window):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("ssm_gym::window_attention_backward", mutates_args=())
def _window_attention_backward(q: Tensor, k: Tensor, v: Tensor, kx: Tensor | None, vx: Tensor | None, out: Tensor,
                               lse: Tensor, dout: Tensor, window: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dkx, dvx = ATTENTION_KERNEL.module.backward(q, k, v, kx, vx, out, lse, dout, window)
    return dq, dk, dv, dkx, dvx


@_window_attention_backward.register_fake
def _(q, k, v, kx, vx, out, lse, dout, window):
    extra = q.shape if kx is not None else (0,)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(extra), q.new_empty(extra)


def _window_attention_setup_context(ctx, inputs, output):
    q, k, v, kx, vx, window = inputs
    ctx.save_for_backward(q, k, v, kx, vx, *output)
    ctx.window = window


def _window_attention_autograd(ctx, dout, dlse):
    q, k, v, kx, vx, out, lse = ctx.saved_tensors
    dq, dk, dv, dkx, dvx = _window_attention_backward(q, k, v, kx, vx, out, lse, dout.contiguous(), ctx.window)
    return dq, dk, dv, (dkx if kx is not None else None), (dvx if vx is not None else None), None


torch.library.register_autograd("ssm_gym::window_attention_forward", _window_attention_autograd,
                                setup_context=_window_attention_setup_context)


def window_attention_cpu(q: Tensor, k: Tensor, v: Tensor, window: int, kx: Tensor | None = None,
                         vx: Tensor | None = None) -> Tensor:
    """Frame-window attention with the fused kernel. q, k, v (and kx, vx): (batch*heads, frames,
    tokens, head_dim) bf16 CPU tensors. Query frame t attends to the tokens of key frames
    t-window+1 .. t; with ``kx, vx`` (a clip's noised copies) to key frames t-window+1 .. t-1 and
    to frame t of kx/vx. Scale 1/sqrt(head_dim), as torch's attention."""
    args = [x.contiguous() for x in (q, k, v)] + [None if x is None else x.contiguous() for x in (kx, vx)]
    # (a window past the clip sees the same frames as one of the clip's length; the kernel sizes
    # its buffers by the window)
    return _window_attention_forward(*args, max(1, min(window, q.shape[1])))[0]


class FrameLocalAttention(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        tokens_per_frame: int,
        window: int | None = 10,
        chunk_frames: int | None = None,
        rope_base: float = 10000.0,
    ):
        super().__init__()
        assert d_model % n_heads == 0 and (d_model // n_heads) % 2 == 0
        assert window is None or window >= 1
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.n_tok, self.window, self.rope_base = tokens_per_frame, window, rope_base
        # query frames per attention call: each call sees chunk + window - 1 key frames, so
        # smaller chunks waste less masked work but make more calls; k/2 (as the paper) is a good middle
        self.chunk_frames = chunk_frames or (max(1, (window + 1) // 2) if window is not None else 16)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    # -- cache ---------------------------------------------------------------------------------
    def init_cache(self, batch_size: int, device=None, dtype=torch.float32, capacity: int = 16) -> KVCache:
        s = self.window if self.window is not None else capacity
        shape = (batch_size, s, self.n_tok, self.n_heads, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                       torch.full((batch_size, s), -1, dtype=torch.long, device=device),
                       torch.ones((batch_size, s, self.n_tok), dtype=torch.bool, device=device))

    def _write(self, cache: KVCache, k: Tensor, v: Tensor, pos: Tensor, keep: Tensor, inplace: bool) -> KVCache:
        """Store the frames of this piece (k, v: (B, T, N, h, hd), pos (B, T), keep (B, T, N)) in the cache."""
        s = cache.pos.shape[1]
        if self.window is not None:
            if s == 1:  # window 1: no frame sees another
                return cache
            m = min(k.shape[1], s - 1)  # only the last k-1 frames can still be seen later
            k, v, pos, keep = k[:, -m:], v[:, -m:], pos[:, -m:], keep[:, -m:]
            slots = pos % s
        else:
            need = int(pos.max()) + 1
            if need > s:  # grow (full attention baseline only)
                cap = max(need, 2 * s)
                grown = self.init_cache(k.shape[0], k.device, cache.k.dtype, capacity=cap)
                grown.k[:, :s], grown.v[:, :s], grown.pos[:, :s], grown.keep[:, :s] = cache.k, cache.v, cache.pos, cache.keep
                cache, inplace = grown, True
            slots = pos
        bidx = torch.arange(k.shape[0], device=k.device)[:, None].expand_as(slots)
        k, v = k.to(cache.k.dtype), v.to(cache.v.dtype)
        if inplace:
            cache.k[bidx, slots], cache.v[bidx, slots], cache.pos[bidx, slots] = k, v, pos
            cache.keep[bidx, slots] = keep
        else:
            cache = KVCache(cache.k.index_put((bidx, slots), k), cache.v.index_put((bidx, slots), v),
                            cache.pos.index_put((bidx, slots), pos), cache.keep.index_put((bidx, slots), keep))
        if self.window is not None:
            _free_next_slot(cache, pos[:, -1])  # (pos is a fresh tensor if not inplace)
        return cache

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: Tensor, pos: Tensor, cache: KVCache | None = None, update: str = "none",
                keep: Tensor | None = None):
        """x (B, T, N, D); pos (B, T) int frame indices of these frames (consecutive).
        cache: past frames (or None: no past). update: "none" (return the cache unchanged),
        "copy" (return a new cache holding these frames too; autograd-safe), "inplace"
        (write into ``cache``). keep (B, T, N) bool: which of these tokens later frames may see
        (state compression; None = all); a frame always sees all of its own tokens.
        Returns ``(y (B, T, N, D), cache)``."""
        t = x.shape[1]
        q, k, v = self._qkv(x, pos)
        one_frame = t == 1 and update in ("none", "inplace") and not torch.is_grad_enabled()
        if isinstance(cache, TokenPool):
            if not one_frame:
                raise ValueError("a TokenPool cache takes one frame per call, without autograd, update 'none' or "
                                 f"'inplace' (got {t} frames, update={update!r}, grad={torch.is_grad_enabled()}); "
                                 "convert it with TokenPool.to_ring for anything else")
            return self.proj(self._pool_step(q, k, v, pos[:, 0], cache, update, keep)), cache
        if one_frame and cache is not None and self.window is not None:
            return self.proj(self._step(q, k, v, pos[:, 0], cache, update, keep)), cache
        y = self._clip(q, k, v, pos, cache, keep)
        return self.proj(y), self._update(cache, k, v, pos, keep, update)

    def forward_paired(self, x: Tensor, x_noisy: Tensor, pos: Tensor, cache: KVCache | None = None,
                       update: str = "none"):
        """Clean frames ``x`` and a noised copy of each, ``x_noisy`` (B, T, N, D). The clean frames
        attend as in :meth:`forward`; the copy of frame t attends to the clean frames before t that
        the window shows (the cache's included) and to its own tokens, which is what a one-frame
        :meth:`forward` of it after the clean frames < t sees. Copies are never cached.
        Returns ``(y, y_noisy, cache)``."""
        if isinstance(cache, TokenPool):
            raise ValueError("forward_paired takes a ring cache (KVCache), not a TokenPool")
        q, k, v = self._qkv(x, pos)
        y, yn = self._clip(q, k, v, pos, cache, None, self._qkv(x_noisy, pos))
        return self.proj(y), self.proj(yn), self._update(cache, k, v, pos, None, update)

    def _qkv(self, x: Tensor, pos: Tensor):
        b, t, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, t, n, 3, self.n_heads, self.head_dim)
        if pointwise.rope_qkv_applies(qkv):  # one pass instead of torch's seven (csrc/pointwise_cpu.cpp)
            cos, sin = (z.expand(b, t, 1, 1, -1).reshape(b, t, -1)
                        for z in rope_tables(pos, self.head_dim, self.rope_base, torch.float32))
            return pointwise.rope_qkv(qkv, cos, sin)
        q, k, v = qkv.unbind(3)
        cos, sin = rope_tables(pos, self.head_dim, self.rope_base, q.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _update(self, cache, k, v, pos, keep, update: str):
        if update == "none":
            return cache
        b, t, n = k.shape[:3]
        if cache is None:
            cache = self.init_cache(b, k.device, k.dtype)
        keep = torch.ones(b, t, n, dtype=torch.bool, device=k.device) if keep is None else keep
        return self._write(cache, k, v, pos, keep, inplace=(update == "inplace"))

    def _clip(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, cache: KVCache | None, keep: Tensor | None,
              noisy: tuple[Tensor, Tensor, Tensor] | None = None):
        """Attention of a clip's frames (q, k, v: (B, T, N, heads, hd)) over the window, in chunks of
        query frames; noisy: (q, k, v) of noised copies (see forward_paired), answered alongside.
        Returns y (B, T, N, D) before the out-projection, or (y, y_noisy) with copies."""
        b, t, n, h, hd = q.shape
        past = cache is not None and cache.pos.shape[1] > 0
        if past:
            ck, cv, cpos, ckeep = cache.k.to(k.dtype), cache.v.to(v.dtype), cache.pos, cache.keep
            if self.window is None:  # drop the never-written tail of the growing cache
                used = int(cpos.max()) + 1
                ck, cv, cpos, ckeep = ck[:, :used], cv[:, :used], cpos[:, :used], ckeep[:, :used]
            past = cpos.shape[1] > 0

        if self._fused_applies(q, cache if past else None, keep):  # whole clip at once (bf16, AVX-512 BF16 CPU)
            def seq(z):  # (B, T, N, h, hd) -> (B*heads, T, N, hd)
                return z.permute(0, 3, 1, 2, 4).reshape(b * h, t, n, hd)

            def unseq(y):
                return y.reshape(b, h, t, n, hd).permute(0, 2, 3, 1, 4).reshape(b, t, n, h * hd)

            ks, vs = seq(k), seq(v)
            y = unseq(window_attention_cpu(seq(q), ks, vs, self.window))
            if noisy is None:
                return y
            qn, kn, vn = noisy
            return y, unseq(window_attention_cpu(seq(qn), ks, vs, self.window, seq(kn), seq(vn)))

        def heads(z):  # (B, T, N, h, hd) -> (B, heads, frames*N, hd)
            return z.permute(0, 3, 1, 2, 4).reshape(b, h, -1, hd)

        qh, kh, vh = heads(q), heads(k), heads(v)
        if noisy is not None:
            qn, kn, vn = (heads(z) for z in noisy)
        if past:
            pkh, pvh = heads(ck), heads(cv)

        w = self.window
        outs, outs_n = [], []
        c = self.chunk_frames
        for s0 in range(0, t, c):
            s1 = min(t, s0 + c)
            lo = 0 if w is None else max(0, s0 - (w - 1))
            keys_k, keys_v, kpos = [kh[:, :, lo * n:s1 * n]], [vh[:, :, lo * n:s1 * n]], [pos[:, lo:s1]]
            kkeep = [keep[:, lo:s1]] if keep is not None else [None]
            if past and (w is None or s0 < w - 1):  # older chunks cannot see the cache
                keys_k.insert(0, pkh), keys_v.insert(0, pvh), kpos.insert(0, cpos), kkeep.insert(0, ckeep)
            kk, vv, kp = torch.cat(keys_k, 2), torch.cat(keys_v, 2), torch.cat(kpos, 1)
            qp = pos[:, s0:s1]
            allowed = _visible_frames(kp, qp, w)
            nq, nk = s1 - s0, kp.shape[1]
            kkeep = _token_keep(kkeep, kpos, n)
            if kkeep is not None:  # compressed: dropped tokens are hidden from later frames
                own = kp[:, None, :] == qp[:, :, None]
                tok = allowed[:, :, None, :, None] & (kkeep[:, None, None] | own[:, :, None, :, None])
                mask = tok.expand(b, nq, n, nk, n).reshape(b, 1, nq * n, nk * n)
            elif allowed.all():  # e.g. a step with a full ring: no mask, SDPA's fastest path
                mask = None
            else:
                mask = _frame_mask(allowed, n)
            outs.append(F.scaled_dot_product_attention(qh[:, :, s0 * n:s1 * n], kk, vv, attn_mask=mask))
            if noisy is not None:  # copies: the clean frames strictly before their own, then themselves
                before = allowed & (kp[:, None, :] < qp[:, :, None])
                itself = torch.eye(nq, dtype=torch.bool, device=q.device).expand(b, nq, nq)
                outs_n.append(F.scaled_dot_product_attention(
                    qn[:, :, s0 * n:s1 * n], torch.cat([kk, kn[:, :, s0 * n:s1 * n]], 2),
                    torch.cat([vv, vn[:, :, s0 * n:s1 * n]], 2), attn_mask=_frame_mask(torch.cat([before, itself], -1), n)))

        def tokens(parts):  # (B, heads, T*N, hd) chunks -> (B, T, N, D)
            return torch.cat(parts, dim=2).reshape(b, h, t, n, hd).permute(0, 2, 3, 1, 4).reshape(b, t, n, h * hd)

        return tokens(outs) if noisy is None else (tokens(outs), tokens(outs_n))

    def _fused_applies(self, q: Tensor, cache: KVCache | None, keep: Tensor | None) -> bool:
        """The fused kernel computes a clip with no past frames (no cache, or one still empty, as
        after a reset) and no compression, in bf16 (under autocast) on a CPU, for the token and head
        sizes it takes; torch's attention the rest (pieces after cached frames included)."""
        return (q.dtype == torch.bfloat16 and q.device.type == "cpu" and keep is None
                and self.window is not None and self.n_tok in FUSED_SIZES and self.head_dim in FUSED_SIZES
                and attention_kernel_ready() and (cache is None or not bool((cache.pos >= 0).any())))

    # -- step: one frame against the ring, in place --------------------------------------------
    def _step(self, q: Tensor, k: Tensor, v: Tensor, t: Tensor, cache: KVCache, update: str,
              keep: Tensor | None) -> Tensor:
        """Attention of frame ``t`` (B,) for q, k, v (B, 1, N, heads, hd); returns (B, 1, N, D).
        Writes this frame's keys/values into its own ring slot (free until now: see ``_write``);
        ``update="inplace"`` also marks them stored, "none" leaves them as scratch."""
        b, _, n, h, hd = q.shape
        if b == 0:
            return q.new_zeros(0, 1, n, h * hd)
        s = cache.pos.shape[1]
        rows = torch.arange(b, device=q.device)
        slot = t % s
        sync_free = q.is_cuda  # on a GPU: no host round trips (no checks, no gather; a mask instead)
        if not sync_free:
            held = cache.pos[rows, slot]
            if bool(((held >= 0) & (held > t - s)).any()):  # free: empty (-1) or left the window (<= t - s)
                raise RuntimeError("attention ring: the slot of the frame being processed holds a frame still in "
                                   "its window (state not advanced one frame at a time?)")
        cache.k[rows, slot], cache.v[rows, slot] = k[:, 0].to(cache.k.dtype), v[:, 0].to(cache.v.dtype)
        kpos = cache.pos.clone()
        kpos[rows, slot] = t
        own = kpos == t[:, None]
        visible = _visible_frames(kpos, t[:, None], self.window)[:, 0]  # (B, S) frames
        if self._fused_step_applies(q, cache, keep):  # bf16 on a CPU with AVX-512 BF16: over the ring in place
            y = attention_kernel().step_forward(q[:, 0].contiguous(), cache.k, cache.v, visible.contiguous())
            self._step_store(cache, rows, slot, t, update, keep)
            return y.reshape(b, 1, n, h * hd)
        tok = visible[:, :, None] & (cache.keep | own[:, :, None])  # (B, S, N) tokens
        keys, vals = cache.k.reshape(b, s * n, h, hd), cache.v.reshape(b, s * n, h, hd)  # the ring, no copy
        mask = tok.reshape(b, 1, 1, s * n)
        if not sync_free:
            counts = tok.flatten(1).sum(1)
            longest = int(counts.max())
            if longest <= 0.75 * s * n:  # compressed (or a young ring): attend over the visible tokens only
                order = torch.argsort((~tok).flatten(1).to(torch.uint8), dim=1, stable=True)[:, :longest]
                keys, vals = keys[rows[:, None], order], vals[rows[:, None], order]  # (B, L, h, hd)
                mask = (torch.arange(longest, device=q.device) < counts[:, None])[:, None, None]
            if int(counts.min()) == mask.shape[-1]:
                mask = None  # every key visible: SDPA's fastest path
        y = F.scaled_dot_product_attention(q[:, 0].transpose(1, 2), keys.to(q.dtype).transpose(1, 2),
                                           vals.to(q.dtype).transpose(1, 2), attn_mask=mask)
        self._step_store(cache, rows, slot, t, update, keep)
        return y.transpose(1, 2).reshape(b, 1, n, h * hd)

    def _step_store(self, cache: KVCache, rows: Tensor, slot: Tensor, t: Tensor, update: str,
                    keep: Tensor | None) -> None:
        """After a step: ``update="inplace"`` marks the frame's slot stored (its keys and values are
        there already) and frees the next frame's slot; "none" leaves the slot as scratch."""
        if update == "inplace":
            cache.pos[rows, slot] = t
            # (a device-side value: a Python scalar here broke CUDA-graph capture with "cannot copy
            # between CPU and CUDA tensors during capture" on torch 2.11)
            cache.keep[rows, slot] = cache.keep.new_ones(()) if keep is None else keep[:, 0]
            _free_next_slot(cache, t)

    def _fused_step_applies(self, q: Tensor, cache: KVCache, keep: Tensor | None) -> bool:
        """The fused kernel steps a bf16 frame (under autocast) over a bf16 ring on a CPU when no
        token is dropped (no compression); torch's attention the rest."""
        return (q.dtype == torch.bfloat16 and cache.k.dtype == torch.bfloat16 and cache.v.dtype == torch.bfloat16
                and q.device.type == "cpu"
                and cache.k.is_contiguous() and cache.v.is_contiguous() and keep is None and self.n_tok in FUSED_SIZES and self.head_dim in FUSED_SIZES
                and attention_kernel_ready() and bool(cache.keep.all()))

    # -- pool step: one frame against the kept tokens, in place --------------------------------
    def _pool_step(self, q: Tensor, k: Tensor, v: Tensor, t: Tensor, pool: TokenPool, update: str,
                   keep: Tensor | None) -> Tensor:
        """Attention of frame ``t`` (B,) over the pool's visible entries and its own tokens (written
        to the scratch space). ``update="inplace"`` then stores the frame: entries of the frame
        that leaves the window are freed and this frame's kept tokens move into free entries
        (the pool grows if an env has too few)."""
        b, _, n, h, hd = q.shape
        if b == 0:
            return q.new_zeros(0, 1, n, h * hd)
        main = pool.main
        pool.k[:, main:], pool.v[:, main:] = k[:, 0].to(pool.k.dtype), v[:, 0].to(pool.v.dtype)
        visible = _visible_frames(pool.pos[:, :main], t[:, None], self.window)[:, 0]  # (B, main)
        mask = torch.cat([visible, visible.new_ones(b, n)], 1)[:, None, None]  # own frame: all tokens
        if not q.is_cuda and bool(mask.all()):
            mask = None  # SDPA's fastest path (checked on the CPU only: no host round trip on a GPU)
        y = F.scaled_dot_product_attention(q[:, 0].transpose(1, 2), pool.k.to(q.dtype).transpose(1, 2),
                                           pool.v.to(q.dtype).transpose(1, 2), attn_mask=mask)
        if update == "inplace":
            self._pool_store(pool, k[:, 0], v[:, 0], t, keep[:, 0] if keep is not None else None)
        return y.transpose(1, 2).reshape(b, 1, n, h * hd)

    def _pool_store(self, pool: TokenPool, k: Tensor, v: Tensor, t: Tensor, keep: Tensor | None) -> None:
        """Store frame ``t``'s kept tokens (k, v: (B, N, h, hd); keep (B, N) or None = all)."""
        b, n = k.shape[0], pool.n_tok
        rows = torch.arange(b, device=k.device)[:, None]
        if self.window is not None:  # the oldest frame leaves the window of frame t + 1
            stale = pool.pos[:, :pool.main] <= t[:, None] - self.window + 1
            pool.pos[:, :pool.main].masked_fill_(stale, -1)
        kept = torch.ones(b, n, dtype=torch.bool, device=k.device) if keep is None else keep
        if self.window == 1:  # no later frame sees this one
            kept = torch.zeros_like(kept)
        free = pool.pos[:, :pool.main] < 0
        short = int((kept.sum(1) - free.sum(1)).max())
        if short > 0:  # grow by what the neediest env lacks, rounded up to 1/4 frame (fewer regrowths)
            step = max(1, n // 4)
            pool.resize_(pool.main + -(-short // step) * step)
            free = pool.pos[:, :pool.main] < 0
        scratch = pool.main + torch.arange(n, device=k.device)
        if pool.main == 0:
            dst = scratch.expand(b, n)
        else:  # the j-th kept token of an env takes its j-th free entry; dropped ones stay in scratch
            first_free = torch.argsort((~free).to(torch.uint8), dim=1, stable=True)[:, :n]
            rank = (kept.cumsum(1) - 1).clamp(0, first_free.shape[1] - 1)
            dst = torch.where(kept, first_free.gather(1, rank), scratch)
        pool.k[rows, dst], pool.v[rows, dst] = k.to(pool.k.dtype), v.to(pool.v.dtype)
        pool.pos[rows, dst] = torch.where(kept, t[:, None], -1)
        pool.tok[rows, dst] = torch.arange(n, dtype=torch.int16, device=k.device).expand(b, n)


def _visible_frames(kpos: Tensor, qpos: Tensor, window: int | None) -> Tensor:
    """(B, Q, K) bool: key frame ``kpos`` (B, K) is visible from query frame ``qpos`` (B, Q):
    filled (>= 0), not later, and inside the window (None: every past frame)."""
    allowed = (kpos[:, None, :] <= qpos[:, :, None]) & (kpos[:, None, :] >= 0)
    if window is not None:
        allowed = allowed & (kpos[:, None, :] > qpos[:, :, None] - window)
    return allowed


def _frame_mask(allowed: Tensor, n: int) -> Tensor:
    """(B, Q, K) frame visibility -> (B, 1, Q*n, K*n) token mask for SDPA (n tokens per frame)."""
    b, nq, nk = allowed.shape
    return allowed[:, None, :, None, :, None].expand(b, 1, nq, n, nk, n).reshape(b, 1, nq * n, nk * n)


def _free_next_slot(cache: KVCache, last: Tensor) -> None:
    """After frame ``last`` (B,): the ring slot of frame last+1 holds frame last+1-k, which no
    frame from last+1 on can see; mark it empty, as the next frame's scratch (local windows)."""
    cache.pos[torch.arange(last.shape[0], device=last.device), (last + 1) % cache.pos.shape[1]] = cache.pos.new_full((), -1)


def _token_keep(parts: list, kpos: list, n: int) -> Tensor | None:
    """Concatenated (B, frames, N) keep flags of the key frames, or None when every token is kept."""
    if all(p is None or bool(p.all()) for p in parts):
        return None
    return torch.cat([p if p is not None else torch.ones(*kp.shape, n, dtype=torch.bool, device=kp.device)
                      for p, kp in zip(parts, kpos)], 1)
