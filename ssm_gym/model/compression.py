"""Dynamic state compression: per-environment state whose size follows how much the scene changes.

Two parts of the inference state are sized by content, both from one measured score, the mean
absolute pixel change (0..255) of the frame pixels each token covers (8x8 here, for pixel and
latent models alike) from one frame to the next:

- **SSM state, nested by importance.** Each spatial block's Mamba-2 state (heads x headdim x
  d_state) keeps only a prefix of its ``d_state`` dimensions: ``d_state/4``, ``/2`` or all of it.
  The prefix is chosen per block and per frame from the block's *activity*, an exponential moving
  average of its tokens' change (a block that has been static for a while gets a small state; a
  block that keeps changing keeps all of it). The model is trained with the same rule (the
  dimensions past a block's prefix get no input and are not read), so the first dimensions learn
  to carry what matters: any prefix works.
- **Attention cache, novel tokens only.** A token whose patch did not change since the previous
  frame (below ``kv_threshold``) adds nothing the newer frames in the window do not already show;
  it is not kept for later frames (its own frame still attends to it). Trained with the same mask.

At inference the rule is causal: frame t's SSM prefix comes from the activity up to frame t-1; a
token's keep flag from the change between its frame and the one before. When a block's prefix
shrinks, the dropped dimensions are zeroed (a later grow starts them from zero), so the packed
form (:func:`pack_state`) stores exactly what the model uses and unpacking is lossless. Training
and a multi-frame warm-up (``observe_clip``) apply the same masks in the parallel form, where a
shrunk block's dropped dimensions are neither written nor read but decay instead of being zeroed:
the two forms differ only after a block's prefix grows back (then the parallel form sees the
decayed remainder, the step-by-step form zeros).

Settings (``SETTINGS``, by name): "off" (no compression: the model's exact outputs), "light",
"medium", "strong", "bf16" (only the attention cache stored in bfloat16, content-independent) and
"strong-bf16"; "strong-compact" and "strong-bf16-compact" apply the same rules and store the
state in the fewest bytes (``storage``: the default "pool" keeps attention token pools that the
step reads in place, sized by the neediest env of a chunk; "compact" keeps each env's stored
tokens only and rebuilds a dense ring every step, which is slower). Training:
``TrainConfig.compression`` + ``compression_prob`` apply the same rule to a share of the
training clips.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import CompactTokens, TokenPool, tensor_bytes

NOVEL = 255.0  # change score of a frame with no previous frame (an episode start): all new


@dataclass(frozen=True)
class CompressionConfig:
    """One compression setting. Scores are mean |pixel change| per token's pixels, on 0..255."""

    name: str = "custom"
    kv_threshold: Optional[float] = None  # drop cache tokens that changed less than this (None: keep all)
    ssm_fractions: tuple = ()  # allowed d_state prefixes as fractions of d_state, ascending, last 1.0 ...
    ssm_thresholds: tuple = ()  # ... activity below ssm_thresholds[i] -> ssm_fractions[i] (len = fractions - 1)
    activity_rate: float = 0.1  # EMA rate of the per-token activity (time constant ~10 frames)
    cache_dtype: str = "float32"  # storage precision of the attention cache
    storage: str = "pool"  # between steps: "pool" (token pools the step reads in place: faster) or
    # "compact" (only the stored tokens: fewest bytes; the step rebuilds a dense ring)

    def __post_init__(self):
        if self.ssm_fractions:
            if len(self.ssm_thresholds) != len(self.ssm_fractions) - 1:
                raise ValueError(f"compression {self.name!r}: need {len(self.ssm_fractions) - 1} ssm_thresholds "
                                 f"for {len(self.ssm_fractions)} ssm_fractions, got {len(self.ssm_thresholds)}")
            if list(self.ssm_fractions) != sorted(self.ssm_fractions) or self.ssm_fractions[-1] != 1.0:
                raise ValueError(f"compression {self.name!r}: ssm_fractions must ascend and end at 1.0, "
                                 f"got {self.ssm_fractions}")
            if list(self.ssm_thresholds) != sorted(self.ssm_thresholds):
                raise ValueError(f"compression {self.name!r}: ssm_thresholds must ascend, got {self.ssm_thresholds}")
        if not 0 < self.activity_rate <= 1:
            raise ValueError(f"activity_rate must be in (0, 1], got {self.activity_rate}")
        if self.cache_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"cache_dtype must be float32, bfloat16 or float16, got {self.cache_dtype!r}")
        if self.storage not in ("pool", "compact"):
            raise ValueError(f"storage must be 'pool' or 'compact', got {self.storage!r}")

    @property
    def dynamic(self) -> bool:
        """True if the state's size depends on content (else only the storage dtype changes)."""
        return self.kv_threshold is not None or bool(self.ssm_fractions)

    @property
    def torch_cache_dtype(self) -> torch.dtype:
        return getattr(torch, self.cache_dtype)

    def ssm_sizes(self, d_state: int) -> list[int]:
        return [max(1, round(f * d_state)) for f in self.ssm_fractions]


SETTINGS: dict[str, Optional[CompressionConfig]] = {
    "off": None,
    "light": CompressionConfig("light", kv_threshold=4.0, ssm_fractions=(0.25, 0.5, 1.0), ssm_thresholds=(6.0, 12.0)),
    "medium": CompressionConfig("medium", kv_threshold=6.0, ssm_fractions=(0.25, 0.5, 1.0), ssm_thresholds=(8.0, 16.0)),
    "strong": CompressionConfig("strong", kv_threshold=8.0, ssm_fractions=(0.25, 0.5, 1.0), ssm_thresholds=(10.0, 20.0)),
    "bf16": CompressionConfig("bf16", cache_dtype="bfloat16"),
}
SETTINGS["strong-bf16"] = replace(SETTINGS["strong"], name="strong-bf16", cache_dtype="bfloat16")
for _name in ("strong", "strong-bf16"):  # the same rule, stored with the fewest bytes (slower steps)
    SETTINGS[f"{_name}-compact"] = replace(SETTINGS[_name], name=f"{_name}-compact", storage="compact")


def get_compression(setting) -> Optional[CompressionConfig]:
    """A setting by name (see ``SETTINGS``), a config, or None."""
    if setting is None or isinstance(setting, CompressionConfig):
        return setting
    if setting not in SETTINGS:
        raise ValueError(f"unknown compression setting {setting!r}; choose from {sorted(SETTINGS)}")
    return SETTINGS[setting]


# ---------------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------------
def patch_change(frames: Tensor, prev: Optional[Tensor], patch: int, has_prev: Optional[Tensor] = None) -> Tensor:
    """Mean |pixel change| (0..255) of every patch from the frame before: frames (B, T, H, W, C)
    uint8, prev (B, H, W, C) uint8 (the frame before frames[:, 0]) or None. Frames without a
    previous frame (the first one when prev is None, or where has_prev (B,) is False) score NOVEL.
    Returns (B, T, H/patch, W/patch)."""
    b, t, hh, ww, c = frames.shape
    x = frames.float()
    if prev is None:
        before = torch.cat([x[:, :1], x[:, :-1]], 1)
    else:
        before = torch.cat([prev[:, None].float(), x[:, :-1]], 1)
    diff = (x - before).abs().mean(-1)  # (B, T, H, W)
    change = F.avg_pool2d(diff.reshape(b * t, 1, hh, ww), patch).reshape(b, t, hh // patch, ww // patch)
    first_novel = torch.ones(b, dtype=torch.bool, device=frames.device) if prev is None else (
        ~has_prev if has_prev is not None else torch.zeros(b, dtype=torch.bool, device=frames.device))
    change[:, 0][first_novel] = NOVEL
    return change


def activity(change: Tensor, start: Tensor, rate: float) -> tuple[Tensor, Tensor]:
    """Exponential moving average of the change per token. change (B, T, gh, gw); start (B, gh, gw)
    the activity before change[:, 0]. Returns (activity *before* each frame (B, T, gh, gw),
    activity after the last frame (B, gh, gw)). Causal: frame t's value uses frames < t only."""
    before, a = [], start
    for i in range(change.shape[1]):
        before.append(a)
        a = torch.lerp(a, change[:, i], rate)
    return torch.stack(before, 1), a


def block_sizes(act: Tensor, block: tuple[int, int], cfg: CompressionConfig, d_state: int) -> Tensor:
    """SSM prefix size per spatial block: act (B, T, gh, gw) activity per token -> (B, T, nblocks)
    int64 (blocks in raster order, as ``ssm.to_blocks``), from the block's mean activity."""
    b, t, gh, gw = act.shape
    bh, bw = block
    mean = F.avg_pool2d(act.reshape(b * t, 1, gh, gw), (bh, bw)).reshape(b, t, -1)
    sizes = torch.tensor(cfg.ssm_sizes(d_state), device=act.device)
    level = torch.bucketize(mean, torch.tensor(cfg.ssm_thresholds, device=act.device, dtype=mean.dtype), right=True)
    return sizes[level]


@dataclass
class ClipCompression:
    """The compression masks for the frames of one forward call (a clip or a piece of one).

    kv_keep (B, T, N) bool: token stays visible to later frames (None: all); act (B, T, gh, gw):
    activity before each frame, which sets every SSM block's prefix (None: full state)."""

    cfg: CompressionConfig
    kv_keep: Optional[Tensor]
    act: Optional[Tensor]

    def ssm_sizes(self, block: tuple[int, int], d_state: int) -> Optional[Tensor]:
        if self.act is None or not self.cfg.ssm_fractions:
            return None
        return block_sizes(self.act, block, self.cfg, d_state)

    def __getitem__(self, sl: slice) -> ClipCompression:
        """The masks of frames ``sl`` (temporal chunks of a clip trained with truncated BPTT)."""
        return ClipCompression(self.cfg, None if self.kv_keep is None else self.kv_keep[:, sl],
                               None if self.act is None else self.act[:, sl])


def clip_compression(cfg: CompressionConfig, frames: Tensor, patch: int, prob: float = 1.0,
                     generator: Optional[torch.Generator] = None) -> ClipCompression:
    """Training masks for whole clips (B, T, H, W, C) uint8, each clip compressed with probability
    ``prob`` (the others get all-keep masks and full states). The first frame of a clip counts as
    an episode start, as after a reset at inference."""
    change = patch_change(frames, None, patch)
    b = frames.shape[0]
    use = torch.rand(b, generator=generator, device=frames.device) < prob if prob < 1 else torch.ones(
        b, dtype=torch.bool, device=frames.device)
    keep = None
    if cfg.kv_threshold is not None:
        keep = (change >= cfg.kv_threshold) | ~use[:, None, None, None]
        keep = keep.flatten(2)
    act = None
    if cfg.ssm_fractions:
        act, _ = activity(change, torch.full_like(change[:, 0], NOVEL), cfg.activity_rate)
        act = torch.where(use[:, None, None, None], act, torch.full_like(act, NOVEL))
    return ClipCompression(cfg, keep, act)


# ---------------------------------------------------------------------------------------------
# inference: the running scores of N environments
# ---------------------------------------------------------------------------------------------
@dataclass
class CompressionState:
    """What the step API needs to apply the rule: the activity per token (N, gh, gw) and the last
    clean frame (N, H, W, C) uint8 (to measure the next frame's change)."""

    cfg: CompressionConfig
    act: Tensor
    last: Tensor

    def map(self, fn) -> CompressionState:
        return CompressionState(self.cfg, fn(self.act), fn(self.last))

    def copy_(self, other: CompressionState) -> None:
        self.act.copy_(other.act), self.last.copy_(other.last)

    def index_copy_(self, idx: Tensor, other: CompressionState) -> None:
        self.act.index_copy_(0, idx, other.act), self.last.index_copy_(0, idx, other.last)

    def reset_(self, mask: Tensor) -> None:
        self.act[mask] = NOVEL

    def nbytes(self) -> int:
        return tensor_bytes(self.act, self.last)

    def block_sizes(self, block: tuple[int, int], d_state: int) -> Tensor:
        """(N, nblocks) SSM prefix of every block at the next frame (from the activity so far)."""
        return block_sizes(self.act[:, None], block, self.cfg, d_state)[:, 0]

    def current(self) -> ClipCompression:
        """Masks for denoising the next frame: its SSM prefixes (from the activity so far); no
        keep flags (a frame being denoised is not written to the cache)."""
        return ClipCompression(self.cfg, None, self.act[:, None])

    def observe(self, frames: Tensor, t: Tensor) -> tuple[ClipCompression, Tensor]:
        """Masks for advancing on clean frames (N, T, H, W, C) uint8 after ``t`` (N,) frames seen;
        returns them and the activity after the last frame (commit with :meth:`commit`)."""
        patch = frames.shape[2] // self.act.shape[1]
        change = patch_change(frames, self.last, patch, has_prev=t > 0)
        keep = (change >= self.cfg.kv_threshold).flatten(2) if self.cfg.kv_threshold is not None else None
        before, after = activity(change, self.act, self.cfg.activity_rate)
        return ClipCompression(self.cfg, keep, before), after

    def commit(self, frames: Tensor, act_after: Tensor) -> None:
        self.act.copy_(act_after)
        self.last.copy_(frames[:, -1])


def truncate_ssm_(state, layers, comp: CompressionState) -> None:
    """Zero every SSM block's state past the prefix it will have at the next frame (in place)."""
    if not comp.cfg.ssm_fractions:
        return
    for s, layer in zip(state.ssm, layers):
        if s is None:
            continue
        ssm = s[1]  # (N, nb, heads, headdim, d_state)
        sizes = comp.block_sizes(layer.ssm.block, ssm.shape[-1])  # (N, nb)
        keep = torch.arange(ssm.shape[-1], device=ssm.device) < sizes[..., None]
        ssm.mul_(keep[:, :, None, None, :].to(ssm.dtype))


# ---------------------------------------------------------------------------------------------
# packed storage: only what the rule keeps
# ---------------------------------------------------------------------------------------------
def pool_slack(n_tok: int) -> int:
    """Free entries a token pool keeps per env beyond the largest env's count (a quarter frame):
    fewer regrowths during steps, at a small cost in bytes."""
    return max(1, n_tok // 4)


@dataclass
class PackedState:
    """A :class:`WorldModelState` stored compactly between steps.

    SSM states: dimensions [0, s_0) of every block dense; dimensions [s_{i-1}, s_i) only for the
    blocks whose prefix reaches s_i (rows selected by a boolean mask). Attention cache: a
    :class:`TokenPool` per layer, the kept tokens of the frames in the window (what the step
    reads directly) or, with ``storage="compact"``, :class:`CompactTokens` (only the stored tokens).
    Masks, step counters, convolution tails and scores dense."""

    t: Tensor
    comp: CompressionState
    conv: list  # per layer: conv state tensor or None
    ssm_masks: list  # per layer: list of (N, nb) bool per tier, or None
    ssm_tiers: list  # per layer: list of (rows, heads, headdim, width) tensors, or None
    ssm_shape: list  # per layer: full (N, nb, heads, headdim, d_state) shape, or None
    kv: list  # per layer: TokenPool or CompactTokens
    kv_slots: list  # per layer: slots of the dense ring (KVCache) it unpacks to
    kv_window: list  # per layer: attention window (None: full attention, slot = frame index)

    @property
    def batch_size(self) -> int:
        return self.t.shape[0]

    @staticmethod
    def cat(parts: list[PackedState]) -> PackedState:
        """Envs of several packed states, in order."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        cat = lambda xs: torch.cat(list(xs), 0)  # noqa: E731
        n = sum(p.batch_size for p in parts)
        layers = range(len(first.conv))
        with_n = lambda shape: None if shape is None else (n, *shape[1:])  # noqa: E731
        kv = [type(first.kv[i]).cat([p.kv[i] for p in parts]) for i in layers]
        return PackedState(
            cat(p.t for p in parts),
            CompressionState(first.comp.cfg, cat(p.comp.act for p in parts), cat(p.comp.last for p in parts)),
            [None if first.conv[i] is None else cat(p.conv[i] for p in parts) for i in layers],
            [None if first.ssm_masks[i] is None else [cat(p.ssm_masks[i][j] for p in parts)
                                                      for j in range(len(first.ssm_masks[i]))] for i in layers],
            [None if first.ssm_tiers[i] is None else [cat(p.ssm_tiers[i][j] for p in parts)
                                                      for j in range(len(first.ssm_tiers[i]))] for i in layers],
            [with_n(s) for s in first.ssm_shape], kv, [max(p.kv_slots[i] for p in parts) for i in layers],
            list(first.kv_window))

    def nbytes(self) -> int:
        return sum(self.nbytes_by_part().values())

    def nbytes_by_part(self) -> dict[str, int]:
        parts = {"ssm_state": 0, "ssm_conv": 0, "attention_cache": 0, "step_counter": tensor_bytes(self.t),
                 "compression_scores": self.comp.nbytes()}
        for conv, masks, tiers in zip(self.conv, self.ssm_masks, self.ssm_tiers):
            if conv is not None:
                parts["ssm_conv"] += tensor_bytes(conv)
                parts["ssm_state"] += tensor_bytes(*tiers, *masks)
        for pool in self.kv:
            parts["attention_cache"] += pool.nbytes()
        return parts


def _tier_bounds(sizes: list[int]) -> list[tuple[int, int]]:
    return [(0 if i == 0 else sizes[i - 1], s) for i, s in enumerate(sizes)]


def pack_state(state, layers) -> PackedState:
    """Compact form of a state (``state.comp`` must be set). Ring caches become token pools
    (copies); token pools are kept as they are (the same objects, shrunk if far too big). Exact:
    :func:`unpack_state` restores every value the model reads (dropped SSM dimensions are zero
    already; dropped cache tokens are invisible to later frames)."""
    comp = state.comp
    conv, masks, tiers, shapes = [], [], [], []
    for s, layer in zip(state.ssm, layers):
        if s is None:
            conv.append(None), masks.append(None), tiers.append(None), shapes.append(None)
            continue
        c, ssm = s
        conv.append(c.clone())
        shapes.append(tuple(ssm.shape))
        d_state = ssm.shape[-1]
        if comp.cfg.ssm_fractions:
            sizes = comp.cfg.ssm_sizes(d_state)
            level = comp.block_sizes(layer.ssm.block, d_state)  # (N, nb)
        else:
            sizes, level = [d_state], torch.full(ssm.shape[:2], d_state, device=ssm.device)
        ms, ts = [], []
        for lo, hi in _tier_bounds(sizes):
            m = level >= hi
            ms.append(m)
            ts.append(ssm[..., lo:hi][m])  # (boolean indexing copies)
        masks.append(ms), tiers.append(ts)
    kv, slots, windows = [], [], []
    for cache, layer in zip(state.kv, layers):
        if isinstance(cache, TokenPool):
            cache.compact_(pool_slack(layer.attn.n_tok))
            stored, n_slots = cache, layer.attn.window or 1
        elif comp.cfg.storage == "pool":
            stored, n_slots = TokenPool.from_ring(cache, pool_slack(layer.attn.n_tok)), cache.pos.shape[1]
        else:
            stored, n_slots = CompactTokens.from_ring(cache), cache.pos.shape[1]
        kv.append(stored), slots.append(n_slots), windows.append(layer.attn.window)
    return PackedState(state.t.clone(), comp.map(lambda x: x.clone()), conv, masks, tiers, shapes, kv, slots, windows)


def unpack_state(p: PackedState, dtype=torch.float32, pools: bool = False):
    """A :class:`WorldModelState` from a packed one: dense SSM states (fresh tensors) and either
    dense ring caches (fresh; the default) or, with ``pools=True``, the packed token pools
    themselves, which the step API reads and updates in place (the engine's step; compact
    storage always unpacks to rings)."""
    from .world_model import WorldModelState  # local: world_model imports this module

    ssm = []
    for conv, masks, tiers, shape in zip(p.conv, p.ssm_masks, p.ssm_tiers, p.ssm_shape):
        if conv is None:
            ssm.append(None)
            continue
        dense = torch.zeros(shape, dtype=tiers[0].dtype if tiers else dtype, device=conv.device)
        lo = 0
        for m, vals in zip(masks, tiers):
            hi = lo + vals.shape[-1]
            dense[..., lo:hi][m] = vals
            lo = hi
        ssm.append((conv.clone(), dense))
    kv = []
    for stored, slots, window in zip(p.kv, p.kv_slots, p.kv_window):
        if pools and isinstance(stored, TokenPool):
            kv.append(stored)
            continue
        if window is None:  # full attention: a slot per frame, up to the newest stored one
            slots = max(slots, int(stored.pos.max()) + 1 if stored.pos.numel() else 0, 1)
        kv.append(stored.to_ring(slots, window))
    return WorldModelState(p.t.clone(), ssm, kv, p.comp.map(lambda x: x.clone()))
