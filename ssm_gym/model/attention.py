"""Dense frame-local attention (Po et al. 2025) and the full causal baseline.

Tokens come as ``(B, T, N, D)``: T frames of N tokens. A token of frame t attends to every token
of frames ``t-k+1 .. t`` (its own frame bidirectionally, across spatial block boundaries);
``window=None`` means every past frame (the full-context causal transformer baseline).
Frame order enters through a rotary embedding of the frame index (relative in time; the token
grid position is added to the tokens by the model), so a ring buffer of the last ``k-1`` frames
is all the step-by-step inference needs: constant memory per layer.

Two forms, one module:
- parallel (training): queries are processed in chunks of frames, each chunk against only the
  keys it can see, with a frame-level mask expanded to tokens (``F.scaled_dot_product_attention``);
- step / pieces: the same code with a :class:`KVCache` of past frames prepended to the keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class KVCache:
    """Keys/values of past frames. ``k, v``: (B, S, N, heads, head_dim) (keys already rotated);
    ``pos``: (B, S) frame index stored in each slot, -1 = empty; ``keep``: (B, S, N) bool, False
    for tokens dropped by state compression (invisible to later frames). Local attention: a ring
    of S = k-1 slots (frame p lives in slot p % S). Full attention: slot = frame index, grown on demand."""

    k: Tensor
    v: Tensor
    pos: Tensor
    keep: Tensor


def rope_tables(pos: Tensor, head_dim: int, base: float, dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables (B, T, 1, 1, head_dim/2) for integer frame positions (B, T).
    Angles are computed in float64 so that long episodes (large indices) keep full precision."""
    inv_freq = base ** (-torch.arange(0, head_dim // 2, dtype=torch.float64, device=pos.device) / (head_dim // 2))
    ang = pos.to(torch.float64)[..., None] * inv_freq
    return ang.cos().to(dtype)[:, :, None, None], ang.sin().to(dtype)[:, :, None, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


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
        s = (self.window - 1) if self.window is not None else capacity
        shape = (batch_size, s, self.n_tok, self.n_heads, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                       torch.full((batch_size, s), -1, dtype=torch.long, device=device),
                       torch.ones((batch_size, s, self.n_tok), dtype=torch.bool, device=device))

    def _write(self, cache: KVCache, k: Tensor, v: Tensor, pos: Tensor, keep: Tensor, inplace: bool) -> KVCache:
        """Store the frames of this piece (k, v: (B, T, N, h, hd), pos (B, T), keep (B, T, N)) in the cache."""
        s = cache.pos.shape[1]
        if self.window is not None:
            if s == 0:
                return cache
            m = min(k.shape[1], s)  # only the last S frames can still be seen later
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
            return cache
        return KVCache(cache.k.index_put((bidx, slots), k), cache.v.index_put((bidx, slots), v),
                       cache.pos.index_put((bidx, slots), pos), cache.keep.index_put((bidx, slots), keep))

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: Tensor, pos: Tensor, cache: KVCache | None = None, update: str = "none",
                keep: Tensor | None = None):
        """x (B, T, N, D); pos (B, T) int frame indices of these frames (consecutive).
        cache: past frames (or None: no past). update: "none" (return the cache unchanged),
        "copy" (return a new cache holding these frames too; autograd-safe), "inplace"
        (write into ``cache``). keep (B, T, N) bool: which of these tokens later frames may see
        (state compression; None = all); a frame always sees all of its own tokens.
        Returns ``(y (B, T, N, D), cache)``."""
        b, t, n, d = x.shape
        h, hd = self.n_heads, self.head_dim
        q, k, v = self.qkv(x).reshape(b, t, n, 3, h, hd).unbind(3)
        cos, sin = rope_tables(pos, hd, self.rope_base, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        past = cache is not None and cache.pos.shape[1] > 0
        if past:
            ck, cv, cpos, ckeep = cache.k.to(k.dtype), cache.v.to(v.dtype), cache.pos, cache.keep
            if self.window is None:  # drop the never-written tail of the growing cache
                used = int(cpos.max()) + 1
                ck, cv, cpos, ckeep = ck[:, :used], cv[:, :used], cpos[:, :used], ckeep[:, :used]
            past = cpos.shape[1] > 0
        # (B, heads, frames*N, hd) layouts
        qh = q.permute(0, 3, 1, 2, 4).reshape(b, h, t * n, hd)
        kh = k.permute(0, 3, 1, 2, 4).reshape(b, h, t * n, hd)
        vh = v.permute(0, 3, 1, 2, 4).reshape(b, h, t * n, hd)
        if past:
            s = cpos.shape[1]
            pkh = ck.permute(0, 3, 1, 2, 4).reshape(b, h, s * n, hd)
            pvh = cv.permute(0, 3, 1, 2, 4).reshape(b, h, s * n, hd)

        w = self.window
        outs = []
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
            allowed = (kp[:, None, :] <= qp[:, :, None]) & (kp[:, None, :] >= 0)
            if w is not None:
                allowed = allowed & (kp[:, None, :] > qp[:, :, None] - w)
            nq, nk = s1 - s0, kp.shape[1]
            kkeep = _token_keep(kkeep, kpos, n)
            if kkeep is not None:  # compressed: dropped tokens are hidden from later frames
                own = kp[:, None, :] == qp[:, :, None]
                tok = allowed[:, :, None, :, None] & (kkeep[:, None, None] | own[:, :, None, :, None])
                mask = tok.expand(b, nq, n, nk, n).reshape(b, 1, nq * n, nk * n)
            elif allowed.all():  # e.g. a step with a full ring: no mask, SDPA's fastest path
                mask = None
            else:
                mask = allowed[:, None, :, None, :, None].expand(b, 1, nq, n, nk, n).reshape(b, 1, nq * n, nk * n)
            outs.append(F.scaled_dot_product_attention(qh[:, :, s0 * n:s1 * n], kk, vv, attn_mask=mask))
        y = torch.cat(outs, dim=2).reshape(b, h, t, n, hd).permute(0, 2, 3, 1, 4).reshape(b, t, n, d)
        y = self.proj(y)

        if update != "none":
            if cache is None:
                cache = self.init_cache(b, x.device, k.dtype)
            keep = torch.ones(b, t, n, dtype=torch.bool, device=x.device) if keep is None else keep
            cache = self._write(cache, k, v, pos, keep, inplace=(update == "inplace"))
        return y, cache


def _token_keep(parts: list, kpos: list, n: int) -> Tensor | None:
    """Concatenated (B, frames, N) keep flags of the key frames, or None when every token is kept."""
    if all(p is None or bool(p.all()) for p in parts):
        return None
    return torch.cat([p if p is not None else torch.ones(*kp.shape, n, dtype=torch.bool, device=kp.device)
                      for p, kp in zip(parts, kpos)], 1)
