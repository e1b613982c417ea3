"""The video world model: block-wise SSM + frame-local attention, diffusion-forcing denoiser.

Frames (64 x 64 x 3 uint8) enter as 8 x 8 pixel patches -> an 8 x 8 grid of tokens per frame
(or, with ``latent_channels``, as 2 x 2 patches of a frozen autoencoder's 16 x 16 latent grid: the
network then denoises latents, see autoencoder.py; frames still go in and out as pixels).
Each layer = adaLN-modulated [block-wise Mamba-2 scan] -> [frame-local attention] -> [MLP],
conditioned per frame on (noise level embedding + embedding of the action that led to the frame).
Heads: the denoised frame (EDM preconditioning, see diffusion.py), a reward and a termination
logit for the transition into the frame.

Conventions
- ``actions[:, t]`` is the action that led to frame t; a first frame gets ``model.START``
  (= n_actions). With the Gymnasium convention (``context_actions[i]`` taken after
  ``context_obs[i]``) use :func:`incoming_actions`.
- ``forward`` runs a clip (or a piece of one, after ``state``) in parallel; ``observe`` /
  ``generate`` are the step API on a batch of N environments: constant-size state
  (except the "attn_full" baseline, whose KV cache grows).

Variants (``config.variant``): "full" (block-wise SSM + frame-local attention), "attn_local"
(frame-local attention only), "ssm_flat" (SSM over the flattened frame, no block-wise scan, +
local attention), "attn_full" (causal attention over all past frames, growing KV cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .autoencoder import FrameAutoencoder
from .attention import FrameLocalAttention, KVCache, TokenPool, tensor_bytes
from .compression import ClipCompression, CompressionState, NOVEL, get_compression, truncate_ssm_
from .diffusion import edm_scalings, float_to_frames, frames_to_float, sample
from .pointwise import gelu_tanh, modulate, norm_modulate, residual
from .ssm import BlockwiseSSM

VARIANTS = ("full", "attn_local", "ssm_flat", "attn_full")


@dataclass
class WorldModelConfig:
    variant: str = "full"
    image_size: int = 64
    channels: int = 3
    patch_size: int = 8  # 64x64 frame -> 8x8 token grid of 8x8x3 pixel patches
    d_model: int = 128
    n_layers: int = 6
    n_heads: int = 4
    mlp_ratio: float = 4.0
    # SSM (Mamba-2)
    block_sizes: tuple = ((2, 2), (4, 4), (8, 8))  # per layer, cycled ("full" variant)
    d_state: int = 16
    ssm_expand: int = 2
    ssm_headdim: int = 32
    d_conv: int = 4
    ssm_chunk_size: int = 64
    backend: str = "auto"  # "auto" | "torch" | "cpu" (fused C++ kernel) | "mamba" | "sequential"; see ssm.ssd
    # attention
    attn_window: int = 10  # k: own frame + k-1 previous ("attn_full" ignores it)
    attn_chunk_frames: int | None = None  # query frames per attention call (default: ceil(k/2))
    # conditioning
    n_actions: int = 6
    action_tokens: bool = False  # also add a learned per-(action, token position) embedding to the tokens
    prev_frame: bool = False  # also feed each frame's tokens the patches of the previous clean frame
    null_action: bool = False  # a learned "no action given" embedding (action NULL = n_actions + 1), for guidance
    pixel_head: int = 0  # channels of a small convolutional refiner on the output pixels (0 = none)
    # latent space (autoencoder.py): 0 = denoise pixels; > 0 = denoise the latents of a frozen
    # frame autoencoder with this many channels (patch_size then cuts the latent grid)
    latent_channels: int = 0
    latent_downsample: int = 4  # latent grid = image_size / latent_downsample
    latent_width: int = 16  # the autoencoder's channels at full resolution
    # diffusion (EDM)
    sigma_data: float = 0.5
    sigma_min: float = 2e-3
    sigma_max: float = 5.0
    rho: float = 7.0
    p_mean: float = -0.4
    p_std: float = 1.2
    sample_steps: int = 3
    action_guidance: float = 1.0  # classifier-free guidance on the action when sampling (1 = off; needs null_action)

    def __post_init__(self):
        assert self.variant in VARIANTS, f"variant must be one of {VARIANTS}"
        if isinstance(self.pixel_head, bool) or not isinstance(self.pixel_head, int) or self.pixel_head < 0:
            raise ValueError(f"pixel_head is the refiner's channels, an int >= 0 (0 = none), got {self.pixel_head!r}")
        self.block_sizes = tuple(tuple(b) if b is not None else None for b in self.block_sizes)
        if self.latent_channels < 0:
            raise ValueError(f"latent_channels must be >= 0 (0 = pixel space), got {self.latent_channels}")
        if self.latent_channels and (self.latent_downsample < 1 or self.image_size % self.latent_downsample):
            raise ValueError(f"latent_downsample {self.latent_downsample} must divide image_size {self.image_size}")
        if self.space_shape[0] % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide the {'latent' if self.latent_channels else 'frame'} "
                             f"size {self.space_shape[0]}" + (" (set --model.patch-size for the latent grid, e.g. 2)"
                                                              if self.latent_channels else ""))

    @property
    def space_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of what the network denoises: the frame, or its latent."""
        if self.latent_channels:
            s = self.image_size // self.latent_downsample
            return (s, s, self.latent_channels)
        return (self.image_size, self.image_size, self.channels)

    @property
    def grid(self) -> tuple[int, int]:
        g = self.space_shape[0] // self.patch_size
        return (g, g)

    @property
    def pixels_per_token(self) -> int:
        """Side of the square of frame pixels one token covers (what state compression scores)."""
        return self.image_size // self.grid[0]

    @property
    def has_ssm(self) -> bool:
        return self.variant in ("full", "ssm_flat")

    @property
    def window(self) -> int | None:
        return None if self.variant == "attn_full" else self.attn_window

    def block_size(self, layer: int):
        if self.variant == "ssm_flat":
            return None
        return self.block_sizes[layer % len(self.block_sizes)]


REWARD_SOURCES = ("frame", "denoiser")  # where generate() reads the reward head


def check_reward_from(reward_from: str) -> str:
    if reward_from not in REWARD_SOURCES:
        raise ValueError(f"reward_from must be one of {REWARD_SOURCES} (see WorldModel.generate), got {reward_from!r}")
    return reward_from


def check_action_guidance(model, w: float) -> float:
    """A guidance weight the model can use: a number, and != 1 only with the null action."""
    w = float(w)
    if not math.isfinite(w):
        raise ValueError(f"action_guidance must be a finite number, got {w}")
    if w != 1.0 and model.action_null is None:
        raise ValueError(f"action_guidance={w} needs a model trained with the null action (null_action=True, "
                         "the trainer's --model.null-action --action-dropout p); this model has none, use 1")
    return w


def incoming_actions(context_actions: Tensor, start: int) -> Tensor:
    """Gymnasium convention -> model convention. context_actions (..., T-1) (``[i]`` taken after
    obs i) -> (..., T) action that led to each frame, ``start`` for the first."""
    first = torch.full_like(context_actions[..., :1], start)
    return torch.cat([first, context_actions], dim=-1)


class WorldModelOutput(NamedTuple):
    denoised: Tensor  # (B, T, H, W, C) x0 estimate in [-1, 1] scale
    raw: Tensor  # (B, T, H, W, C) network output F before EDM preconditioning
    reward: Tensor  # (B, T)
    term_logit: Tensor  # (B, T)
    state: WorldModelState | None


@dataclass
class WorldModelState:
    """Inference state of a batch of N environments, all preallocated tensors.

    t: (N,) frames seen per env; ssm[l]: (conv_state, ssm_state) per spatial block, or None;
    kv[l]: :class:`KVCache` ring of the last k-1 frames (growing for "attn_full"), or a
    :class:`TokenPool` of their kept tokens (the rollout engine's form with dynamic compression);
    comp: the running scores of dynamic state compression (None = off), see compression.py;
    prev: (N, H, W, C) the last clean frame in [-1, 1] scale, for models with ``prev_frame``
    (None otherwise, and with dynamic compression, whose ``comp.last`` holds that frame).
    """

    t: Tensor
    ssm: list
    kv: list
    comp: CompressionState | None = None
    prev: Tensor | None = None

    def _map(self, fn) -> WorldModelState:
        ssm = [None if s is None else tuple(fn(x) for x in s) for s in self.ssm]
        kv = [c.map(fn) for c in self.kv]
        return WorldModelState(fn(self.t), ssm, kv, None if self.comp is None else self.comp.map(fn),
                               None if self.prev is None else fn(self.prev))

    def clone(self) -> WorldModelState:
        return self._map(lambda x: x.clone())

    def data_ptrs(self) -> tuple[int, ...]:
        """Addresses of the state's tensors: whether a CUDA graph captured on it still applies."""
        ptrs: list[int] = []
        self._map(lambda x: ptrs.append(x.data_ptr()) or x)
        return tuple(ptrs)

    def detach(self) -> WorldModelState:
        return self._map(lambda x: x.detach())

    def index_select(self, idx: Tensor) -> WorldModelState:
        """New state with envs ``idx`` (forking for planners: idx may repeat)."""
        return self._map(lambda x: x.index_select(0, idx.to(x.device)))

    def copy_(self, other: WorldModelState) -> WorldModelState:
        """In-place update from ``other`` (same batch size); a grown KV cache is rebound."""
        self.t.copy_(other.t)
        for mine, theirs in zip(self.ssm, other.ssm):
            if mine is not None:
                for a, b in zip(mine, theirs):
                    if a is not b:
                        a.copy_(b)
        for i, (mine, theirs) in enumerate(zip(self.kv, other.kv)):
            if mine is theirs:  # (a step on a TokenPool updates it in place: always this case)
                continue
            if isinstance(mine, KVCache) and isinstance(theirs, KVCache) and mine.k.shape == theirs.k.shape:
                mine.k.copy_(theirs.k), mine.v.copy_(theirs.v), mine.pos.copy_(theirs.pos), mine.keep.copy_(theirs.keep)
            else:
                self.kv[i] = theirs
        if self.comp is not None and other.comp is not None and self.comp is not other.comp:
            self.comp.copy_(other.comp)
        if self.prev is not None and other.prev is not None and self.prev is not other.prev:
            self.prev.copy_(other.prev)
        return self

    def index_copy_(self, idx: Tensor, other: WorldModelState) -> WorldModelState:
        """In place: env ``idx[j]`` takes the state of env j of ``other`` (resets with context)."""
        idx = idx.to(self.t.device)
        if any(isinstance(c, TokenPool) for c in (*self.kv, *other.kv)):
            raise TypeError("index_copy_ works on ring caches (KVCache); convert TokenPool caches with to_ring first")
        self.t.index_copy_(0, idx, other.t)
        for mine, theirs in zip(self.ssm, other.ssm):
            if mine is not None:
                for a, b in zip(mine, theirs):
                    a.index_copy_(0, idx, b.to(a.dtype))
        for i, (mine, theirs) in enumerate(zip(self.kv, other.kv)):
            slots = max(mine.k.shape[1], theirs.k.shape[1])  # only "attn_full" caches differ in size
            mine, theirs = _pad_cache(mine, slots), _pad_cache(theirs, slots)
            for a, b in ((mine.k, theirs.k), (mine.v, theirs.v), (mine.pos, theirs.pos), (mine.keep, theirs.keep)):
                a.index_copy_(0, idx, b.to(a.dtype))
            self.kv[i] = mine
        if (self.comp is None) != (other.comp is None):
            raise ValueError("cannot copy between a compressed and an uncompressed state")
        if self.comp is not None:
            self.comp.index_copy_(idx, other.comp)
        if (self.prev is None) != (other.prev is None):
            raise ValueError("cannot copy between states with and without a previous frame (prev_frame)")
        if self.prev is not None:
            self.prev.index_copy_(0, idx, other.prev.to(self.prev.dtype))
        return self

    def reset_(self, mask: Tensor) -> WorldModelState:
        """Reset the envs where ``mask`` (N,) bool is set, in place."""
        m = mask.to(self.t.device).bool()
        self.t.masked_fill_(m, 0)
        for s in self.ssm:
            if s is not None:
                for x in s:
                    x[m] = 0
        for c in self.kv:
            c.reset_(m)
        if self.comp is not None:
            self.comp.reset_(m)
        if self.prev is not None:
            self.prev[m] = 0
        return self

    @property
    def batch_size(self) -> int:
        return self.t.shape[0]

    def nbytes(self) -> int:
        return sum(self.nbytes_by_part().values())

    def nbytes_by_part(self) -> dict[str, int]:
        """Bytes held, split into the SSM states, the SSM convolution tails and the attention
        cache (what a state-compression scheme has to work on)."""
        parts = {"ssm_state": 0, "ssm_conv": 0, "attention_cache": 0, "step_counter": tensor_bytes(self.t)}
        for s in self.ssm:
            if s is not None:
                parts["ssm_conv"] += tensor_bytes(s[0])
                parts["ssm_state"] += tensor_bytes(s[1])
        for c in self.kv:
            parts["attention_cache"] += c.nbytes()
        if self.comp is not None:
            parts["compression_scores"] = self.comp.nbytes()
        if self.prev is not None:
            parts["previous_frame"] = tensor_bytes(self.prev)
        return parts


def _pad_cache(c: KVCache, slots: int) -> KVCache:
    """A full-attention cache grown to ``slots`` slots (new slots empty); unchanged if big enough."""
    extra = slots - c.k.shape[1]
    if extra <= 0:
        return c
    pad = lambda x, v: torch.cat([x, x.new_full((x.shape[0], extra, *x.shape[2:]), v)], 1)
    return KVCache(pad(c.k, 0), pad(c.v, 0), pad(c.pos, -1), pad(c.keep, True))


class MLP(nn.Module):
    def __init__(self, d: int, ratio: float):
        super().__init__()
        h = int(d * ratio)
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(gelu_tanh(self.fc1(x)))


class Layer(nn.Module):
    """adaLN-Zero block: [SSM] -> attention -> MLP, each pre-normed, modulated (shift, scale) and
    gated by the per-frame conditioning vector."""

    def __init__(self, cfg: WorldModelConfig, idx: int):
        super().__init__()
        d = cfg.d_model
        self.ssm = None
        if cfg.has_ssm:
            self.ssm = BlockwiseSSM(d, cfg.grid, cfg.block_size(idx), d_state=cfg.d_state, expand=cfg.ssm_expand,
                                    headdim=cfg.ssm_headdim, d_conv=cfg.d_conv, chunk_size=cfg.ssm_chunk_size,
                                    backend=cfg.backend)
        self.attn = FrameLocalAttention(d, cfg.n_heads, cfg.grid[0] * cfg.grid[1], window=cfg.window,
                                        chunk_frames=cfg.attn_chunk_frames)
        self.mlp = MLP(d, cfg.mlp_ratio)
        self.n_sub = 3 if self.ssm is not None else 2
        self.ada = nn.Linear(d, 3 * self.n_sub * d)
        nn.init.zeros_(self.ada.weight), nn.init.zeros_(self.ada.bias)
        self.eps = 1e-6

    def _norm(self, x, shift, scale):
        """The modulated pre-norm (adaLN) of tokens x (B, T, N, D) with a frame's shift and scale."""
        return norm_modulate(x, shift, scale, self.eps)

    def forward(self, x, cond, pos, ssm_state, kv, update, compress: ClipCompression | None = None):
        # x (B, T, N, D); cond (B, T, D) already SiLU'd
        b, t, n, d = x.shape
        mods = self.ada(cond)[:, :, None].chunk(3 * self.n_sub, dim=-1)
        new_ssm = None
        i = 0
        if self.ssm is not None:
            h = self._norm(x, mods[0], mods[1])
            sizes = None if compress is None else compress.ssm_sizes(self.ssm.block, self.ssm.d_state)
            h, new_ssm = self.ssm(h.reshape(b, t, *self.ssm.grid, d), ssm_state, sizes)
            x = residual(x, mods[2], h.reshape(b, t, n, d))
            i = 3
        keep = None if compress is None else compress.kv_keep
        h, kv = self.attn(self._norm(x, mods[i], mods[i + 1]), pos, kv, update=update, keep=keep)
        x = residual(x, mods[i + 2], h)
        return self._mlp(x, mods[i + 3:]), new_ssm, kv

    def forward_paired(self, x, xn, cond, cond_n, pos, ssm_state, kv, update):
        """Clean tokens ``x`` and their noised copies ``xn`` (B, T, N, D) (see WorldModel.forward_paired)."""
        b, t, n, d = x.shape
        mods = self.ada(cond)[:, :, None].chunk(3 * self.n_sub, dim=-1)
        mods_n = self.ada(cond_n)[:, :, None].chunk(3 * self.n_sub, dim=-1)
        new_ssm = None
        i = 0
        if self.ssm is not None:
            grid = (b, t, *self.ssm.grid, d)
            h, hn, new_ssm = self.ssm.forward_paired(self._norm(x, mods[0], mods[1]).reshape(grid),
                                                     self._norm(xn, mods_n[0], mods_n[1]).reshape(grid),
                                                     ssm_state)
            x = residual(x, mods[2], h.reshape(b, t, n, d))
            xn = residual(xn, mods_n[2], hn.reshape(b, t, n, d))
            i = 3
        h, hn, kv = self.attn.forward_paired(self._norm(x, mods[i], mods[i + 1]),
                                             self._norm(xn, mods_n[i], mods_n[i + 1]), pos, kv, update)
        x = residual(x, mods[i + 2], h)
        xn = residual(xn, mods_n[i + 2], hn)
        return self._mlp(x, mods[i + 3:]), self._mlp(xn, mods_n[i + 3:]), new_ssm, kv

    def _mlp(self, x, mods):
        """x + gate * MLP(modulated norm of x); mods = (shift, scale, gate)."""
        return residual(x, mods[2], self.mlp(self._norm(x, mods[0], mods[1])))


class WorldModel(nn.Module):
    def __init__(self, config: WorldModelConfig):
        super().__init__()
        self.config = cfg = config
        d, p, c = cfg.d_model, cfg.patch_size, cfg.space_shape[2]
        self.grid = cfg.grid
        self.n_tok = self.grid[0] * self.grid[1]
        self.patch_dim = p * p * c
        self.START = cfg.n_actions
        self.NULL = cfg.n_actions + 1
        self.patch_in = nn.Linear(self.patch_dim, d)
        self.pos_emb = nn.Parameter(torch.randn(self.n_tok, d) * 0.02)
        self.register_buffer("noise_freqs", torch.randn(d // 2) * 4.0, persistent=True)  # Fourier features
        self.noise_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.action_emb = nn.Embedding(cfg.n_actions + 1, d)
        # adaLN gives every token of a frame the same per-channel shift and scale, so it cannot say
        # "this token now shows what its left neighbour showed" (turning shifts the first-person
        # view by about two patches). A per-position action embedding lets attention queries
        # depend on action and position together. Zero-initialised: a fine-tune starts from the
        # model it loads.
        self.action_tok = None
        if cfg.action_tokens:
            self.action_tok = nn.Embedding(cfg.n_actions + 1, self.n_tok * d)
            nn.init.zeros_(self.action_tok.weight)
        # DIAMOND-style direct input of the previous clean frame: history otherwise reaches a frame
        # only through attention and the SSM, and every model trained without this input predicted
        # the next frame worse than copying the last one. Zero-initialised, like action_tok.
        self.prev_in = None
        if cfg.prev_frame:
            self.prev_in = nn.Linear(self.patch_dim, d)
            nn.init.zeros_(self.prev_in.weight), nn.init.zeros_(self.prev_in.bias)
        # Classifier-free guidance on the action: trained with a share of actions replaced by NULL
        # (the trainer's --action-dropout), sampling pushes the frame away from the action-free
        # prediction, D = D(null) + w (D(a) - D(null)). Why: every model here reacted too little to
        # the action (its frames for different actions about 30 dB apart). Zero-initialised.
        self.action_null = nn.Parameter(torch.zeros(d)) if cfg.null_action else None
        self.layers = nn.ModuleList([Layer(cfg, i) for i in range(cfg.n_layers)])
        self.final_ada = nn.Linear(d, 2 * d)
        self.patch_out = nn.Linear(d, self.patch_dim)
        self.head = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 2))  # reward, termination
        with torch.no_grad():  # start from "never terminates" (P = 0.25%): episodes rarely end
            self.head[2].bias[1] = -6.0
        for m in (self.final_ada, self.patch_out):
            nn.init.zeros_(m.weight), nn.init.zeros_(m.bias)
        # Pixel refiner. The network's output F is patch_out of a d_model-wide token, so per 8x8x3
        # patch (192 values) it spans at most d_model = 128 directions: the noise in the other 64
        # cannot be cancelled and stays in D = c_skip x + c_out F (scaled by c_skip). That bounds
        # denoising at low noise levels (every model so far: 26 -> 30 dB at sigma 0.1, 17 -> 23 dB at 0.3,
        # near the bound), which leaves multi-step samples grainy. Three 3x3 convolutions over the
        # full-resolution noisy input, F and the noise level add a per-pixel correction to F.
        # The last one is zero-initialised: a fine-tune starts from the model it loads.
        self.pixel_refine = None
        if cfg.pixel_head:
            ph, c_img = cfg.pixel_head, c
            self.pixel_refine = nn.Sequential(
                nn.Conv2d(2 * c_img + 1, ph, 3, padding=1), nn.SiLU(),
                nn.Conv2d(ph, ph, 3, padding=1), nn.SiLU(),
                nn.Conv2d(ph, c_img, 3, padding=1))
            nn.init.zeros_(self.pixel_refine[-1].weight), nn.init.zeros_(self.pixel_refine[-1].bias)
        # Latent space: a frozen frame autoencoder (trained first, training.train_autoencoder; the
        # trainer's --autoencoder loads it). Frames go in and out as pixels; the network, the state
        # and the diffusion work on latents. Its weights are part of the checkpoint.
        self.codec = None
        if cfg.latent_channels:
            self.codec = FrameAutoencoder(cfg.channels, cfg.latent_channels, cfg.latent_downsample, cfg.latent_width)
            self.codec.requires_grad_(False)

    # -- bookkeeping ---------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def receptive_field(self) -> int | None:
        """Frames back (incl. the current) that can influence an output: None = unbounded."""
        cfg = self.config
        if cfg.has_ssm or cfg.window is None:
            return None
        return cfg.n_layers * (cfg.window - 1) + 1

    def init_state(self, batch_size: int, device=None, dtype=torch.float32, compression=None) -> WorldModelState:
        """Empty state for ``batch_size`` envs. compression: a setting name or CompressionConfig
        (see compression.py; None/"off" = exact uncompressed model); it also sets the storage
        dtype of the attention cache."""
        device = device if device is not None else self.pos_emb.device
        comp_cfg = get_compression(compression)
        ssm = [l.ssm.init_state(batch_size, device, dtype) if l.ssm is not None else None for l in self.layers]
        kv_dtype = dtype if comp_cfg is None else comp_cfg.torch_cache_dtype
        kv = [l.attn.init_cache(batch_size, device, kv_dtype) for l in self.layers]
        comp = None
        if comp_cfg is not None and comp_cfg.dynamic:  # ("bf16" only changes the cache's dtype)
            cfg = self.config  # (the rule scores the pixels each token covers, for a latent model too)
            if self.codec is not None and self.prev_in is not None:
                raise ValueError("dynamic state compression with a previous-frame input keeps the last frame as "
                                 "pixels: not supported for a latent-space model (latent_channels > 0)")
            comp = CompressionState(comp_cfg, torch.full((batch_size, *self.grid), NOVEL, device=device),
                                    torch.zeros((batch_size, cfg.image_size, cfg.image_size, cfg.channels),
                                                dtype=torch.uint8, device=device))
        prev = None
        if self.prev_in is not None and comp is None:
            prev = torch.zeros((batch_size, *self.config.space_shape), dtype=dtype, device=device)
        return WorldModelState(torch.zeros(batch_size, dtype=torch.long, device=device), ssm, kv, comp, prev)

    # -- frames <-> what the network denoises ---------------------------------------------------
    def to_space(self, frames: Tensor) -> Tensor:
        """Frames (..., H, W, C) (uint8, or floats in [-1, 1]) -> floats in the network's space:
        the frames themselves, or their (scaled) latents. Tensors already in that space (floats of
        ``config.space_shape``) pass through."""
        cfg = self.config
        frame_shape = (cfg.image_size, cfg.image_size, cfg.channels)
        if frames.dtype != torch.uint8 and tuple(frames.shape[-3:]) == cfg.space_shape:
            return frames
        if tuple(frames.shape[-3:]) != frame_shape:
            raise ValueError(f"expected frames (..., {', '.join(map(str, frame_shape))})"
                             + (f" or latents (..., {', '.join(map(str, cfg.space_shape))})" if self.codec else "")
                             + f", got {tuple(frames.shape)}")
        x = frames_to_float(frames)
        if self.codec is None:
            return x
        with torch.no_grad():
            return self.codec.encode(x.to(self.pos_emb.dtype))

    def to_frames(self, x: Tensor) -> Tensor:
        """The network's space -> uint8 frames (decoded for a latent-space model)."""
        if self.codec is None:
            return float_to_frames(x)
        with torch.no_grad():
            return float_to_frames(self.codec.decode(x))

    # -- tokens --------------------------------------------------------------------------------
    def patchify(self, x: Tensor) -> Tensor:
        """(B, T, H, W, C) -> (B, T, N, p*p*C)"""
        b, t, hh, ww, c = x.shape
        p = self.config.patch_size
        x = x.reshape(b, t, hh // p, p, ww // p, p, c).permute(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, t, self.n_tok, self.patch_dim)

    def unpatchify(self, x: Tensor) -> Tensor:
        b, t = x.shape[:2]
        p, c = self.config.patch_size, self.config.space_shape[2]
        gh, gw = self.grid
        x = x.reshape(b, t, gh, gw, p, p, c).permute(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, t, gh * p, gw * p, c)

    # -- network -------------------------------------------------------------------------------
    def forward(self, x: Tensor, sigma: Tensor, actions: Tensor, state: WorldModelState | None = None,
                update: str = "copy", compress: ClipCompression | None = None,
                clean: Tensor | None = None, refine: bool = True, paired: bool = False) -> WorldModelOutput:
        """Denoise a clip (or a piece following ``state``) in parallel.

        x (B, T, H, W, C) noisy frames in [-1, 1] scale (uint8 accepted: clean frames); sigma (B, T)
        noise level per frame (0 = clean); actions (B, T) long, the action that led to each frame.
        update: with a state, "copy" returns a new state after these frames (autograd-safe),
        "inplace" advances ``state`` itself, "none" leaves it (denoising passes).
        compress: state-compression masks of these frames (training, and the step API), or None.
        clean (B, T, H, W, C): the clean frames behind ``x``, which a ``prev_frame`` model feeds to the
        frame after each (training); may be left out when ``x`` is clean or T = 1.
        refine: run the pixel refiner (``pixel_head``); False skips it where only the state matters
        (clean frames: c_out = 0, so ``denoised`` is ``x`` either way; ``raw`` then lacks its part).
        paired: ``x`` are noised copies of ``clean``: returns :meth:`forward_paired`'s pair.
        """
        if paired:  # (through forward, so that a DDP wrapper sees the call)
            if compress is not None or clean is None:
                raise ValueError("paired=True takes the clean frames (clean=...) and no compression masks")
            return self.forward_paired(x, sigma, actions, clean, state=state, update=update, refine=refine)
        x = self.to_space(x)
        b, t = x.shape[:2]
        sigma = sigma.to(x.dtype).expand(b, t)
        pos = self._positions(state, b, t, x.device)
        prev = None
        if self.prev_in is not None:
            clean = self._clean_frames(x, sigma, clean)
            prev = self._previous_frames(clean, state)
        actions, null = self._split_null(actions)
        tok, cond, scalings = self._embed(x, sigma, actions, null, pos, prev)

        attn_update = "none" if (state is None or update == "none") else update
        new_ssm, new_kv = [], []
        for i, layer in enumerate(self.layers):
            ssm_s = state.ssm[i] if state is not None else None
            kv = state.kv[i] if state is not None else None
            tok, s_new, kv_new = layer(tok, cond, pos, ssm_s, kv, attn_update, compress)
            new_ssm.append(s_new), new_kv.append(kv_new)
        new_state = self._next_state(state, update, t, new_ssm, new_kv, None if prev is None else clean[:, -1])
        return self._readout(tok, cond, x, scalings, refine, new_state)

    def forward_paired(self, x: Tensor, sigma: Tensor, actions: Tensor, clean: Tensor,
                       state: WorldModelState | None = None, update: str = "copy",
                       refine: bool = True) -> tuple[WorldModelOutput, WorldModelOutput]:
        """Denoise a noised copy of every frame of a clip, each from the clean history before it.

        clean (B, T, H, W, C) the clip's clean frames; x the noised copies (sigma (B, T) > 0 each).
        The clean frames run as in :meth:`forward` with sigma = 0; the copy of frame t reads the clean
        frames before t (SSM state, attention window, previous-frame input) and its own tokens, and
        nothing reads it. So its output equals ``forward(x[:, t:t+1], ...)`` from the state after the
        clean frames < t, for all t in one pass of about twice the cost of one clip: every frame
        carries a denoising loss from a clean history, as at inference (training with
        ``noised_copies``). state/update: as in :meth:`forward`, for the clean frames.
        Returns ``(noised, clean_out)``: the copies' outputs (state: the state after the clean
        frames), and the clean frames' reward and termination heads (``raw`` None).
        """
        x = self.to_space(x)
        x0 = self.to_space(clean).to(x.dtype)
        if x0.shape != x.shape:
            raise ValueError(f"clean frames {tuple(x0.shape)} do not match the noised copies {tuple(x.shape)}")
        b, t = x.shape[:2]
        sigma = sigma.to(x.dtype).expand(b, t)
        pos = self._positions(state, b, t, x.device)
        prev = self._previous_frames(x0, state) if self.prev_in is not None else None
        actions, null = self._split_null(actions)
        tok, cond, _ = self._embed(x0, torch.zeros_like(sigma), actions, null, pos, prev)
        tok_n, cond_n, scalings = self._embed(x, sigma, actions, null, pos, prev)

        attn_update = "none" if (state is None or update == "none") else update
        new_ssm, new_kv = [], []
        for i, layer in enumerate(self.layers):
            ssm_s = state.ssm[i] if state is not None else None
            kv = state.kv[i] if state is not None else None
            tok, tok_n, s_new, kv_new = layer.forward_paired(tok, tok_n, cond, cond_n, pos, ssm_s, kv, attn_update)
            new_ssm.append(s_new), new_kv.append(kv_new)
        new_state = self._next_state(state, update, t, new_ssm, new_kv, None if prev is None else x0[:, -1])
        hfin = F.layer_norm(tok, tok.shape[-1:], eps=1e-6)
        rt = self.head(hfin.mean(dim=2))
        return (self._readout(tok_n, cond_n, x, scalings, refine, new_state),
                WorldModelOutput(x0, None, rt[..., 0], rt[..., 1], new_state))

    def _positions(self, state: WorldModelState | None, b: int, t: int, device) -> Tensor:
        """(B, T) frame indices of a piece: from 0, or following ``state``."""
        if state is None:
            return torch.arange(t, device=device)[None].expand(b, t)
        return state.t[:, None] + torch.arange(t, device=device)

    def _previous_frames(self, clean: Tensor, state: WorldModelState | None) -> Tensor:
        """(B, T, H, W, C) the clean frame before each frame of a piece (zeros before a first one)."""
        before = self._state_prev(state, clean)
        before = torch.zeros_like(clean[:, 0]) if before is None else before.to(clean.dtype)
        return torch.cat([before[:, None], clean[:, :-1]], 1)

    def _embed(self, x: Tensor, sigma: Tensor, actions: Tensor, null: Tensor | None, pos: Tensor,
               prev: Tensor | None):
        """Frame tokens (B, T, N, D), the per-frame conditioning (SiLU'd) and the EDM scalings."""
        cfg = self.config
        b, t = x.shape[:2]
        scalings = edm_scalings(sigma, cfg.sigma_data)
        c_in, c_noise = scalings[2], scalings[3]
        x_in = x * c_in[:, :, None, None, None]
        tok = self.patch_in(self.patchify(x_in)) + self.pos_emb
        if self.action_tok is not None:
            emb = self.action_tok(actions).view(b, t, self.n_tok, cfg.d_model)
            tok = tok + (emb if null is None else emb * ~null[:, :, None, None])
        if prev is not None:
            # a first frame (of a clip without state, or after a reset) has no previous frame
            tok = tok + self.prev_in(self.patchify(prev)) * (pos > 0)[:, :, None, None].to(tok.dtype)
        ang = c_noise[..., None] * self.noise_freqs
        act = self.action_emb(actions)
        if null is not None:
            act = torch.where(null[..., None], self.action_null.to(act.dtype), act)
        cond = F.silu(self.noise_mlp(torch.cat([ang.cos(), ang.sin()], -1)) + act)
        return tok, cond, (*scalings, x_in)

    def _readout(self, tok: Tensor, cond: Tensor, x: Tensor, scalings, refine: bool,
                 new_state: WorldModelState | None) -> WorldModelOutput:
        """Final modulated norm -> patches (and the pixel refiner) -> EDM denoiser; the heads."""
        c_skip, c_out, _, c_noise, x_in = scalings
        shift, scale = self.final_ada(cond)[:, :, None].chunk(2, dim=-1)
        hfin = F.layer_norm(tok, tok.shape[-1:], eps=1e-6)
        raw = self.unpatchify(self.patch_out(modulate(hfin, shift, scale)))
        if self.pixel_refine is not None and refine:
            raw = raw + self._refine(raw, x_in, c_noise)
        rt = self.head(hfin.mean(dim=2))
        denoised = c_skip[:, :, None, None, None] * x + c_out[:, :, None, None, None] * raw
        return WorldModelOutput(denoised, raw, rt[..., 0], rt[..., 1], new_state)

    def _next_state(self, state: WorldModelState | None, update: str, t: int, new_ssm, new_kv,
                    last_clean: Tensor | None) -> WorldModelState | None:
        """The state after a piece of t frames ("copy", "inplace"), or ``state`` itself ("none")."""
        if state is None or update == "none":
            return state
        ssm_out = [None if s is None else tuple(z.to(state.ssm[i][j].dtype) for j, z in enumerate(s))
                   for i, s in enumerate(new_ssm)]
        prev_out = None if state.prev is None or last_clean is None else last_clean.to(state.prev.dtype)
        new_state = WorldModelState(state.t + t, ssm_out, new_kv, state.comp, prev_out)
        return state.copy_(new_state) if update == "inplace" else new_state

    def _refine(self, raw: Tensor, x_in: Tensor, c_noise: Tensor) -> Tensor:
        """The pixel refiner's correction to ``raw`` (B, T, H, W, C), from ``raw``, the scaled
        noisy input and the noise level, frame by frame (channels-first for the convolutions)."""
        b, t, hh, ww, c = raw.shape
        level = c_noise.to(raw.dtype)[:, :, None, None, None].expand(b, t, hh, ww, 1)
        z = torch.cat([raw, x_in.to(raw.dtype), level], -1).reshape(b * t, hh, ww, 2 * c + 1).permute(0, 3, 1, 2)
        return self.pixel_refine(z).permute(0, 2, 3, 1).reshape(b, t, hh, ww, c)

    def _split_null(self, actions: Tensor) -> tuple[Tensor, Tensor | None]:
        """(actions with NULL replaced by 0 for the embedding tables, mask of NULL) for a model with
        the null action; (actions, None) otherwise."""
        if self.action_null is None:
            return actions, None
        null = actions == self.NULL
        return actions.masked_fill(null, 0), null

    def _clean_frames(self, x: Tensor, sigma: Tensor, clean: Tensor | None) -> Tensor:
        if clean is not None:
            if clean.shape[:2] != x.shape[:2]:
                raise ValueError(f"clean frames {tuple(clean.shape)} do not match the clip {tuple(x.shape)}")
            return self.to_space(clean).to(x.dtype)
        if x.shape[1] > 1 and bool((sigma > 0).any()):
            raise ValueError("a prev_frame model needs the clean frames (clean=...) of a noised clip longer "
                             "than one frame: each frame's previous-frame input is the clean frame")
        return x

    def _state_prev(self, state: WorldModelState | None, x: Tensor) -> Tensor | None:
        """(N, H, W, C) the frame before this piece: the state's, or compression's stored last frame."""
        if state is None:
            return None
        if state.prev is not None:
            return state.prev
        if state.comp is not None:
            return self.to_space(state.comp.last).to(x.dtype)
        raise ValueError("this state has no previous frame: it was made for a model without prev_frame")

    # -- step API (inference on a batch of N envs) ---------------------------------------------
    @torch.no_grad()
    def observe(self, state: WorldModelState, frame: Tensor, action, pixels: Tensor | None = None) -> WorldModelOutput:
        """Advance ``state`` (in place) on real clean frames. frame (N, H, W, C) uint8 (or float in
        [-1, 1]; for a latent model also its latents); action (N,) long: the action that led to this
        frame (``START`` after a reset). pixels: the frame as uint8 when ``frame`` holds latents and
        the state is compressed (its rule scores pixels). Returns the outputs for this frame
        (reward/termination predictions included)."""
        return self.observe_clip(state, frame[:, None], self._actions(action, frame.shape[0])[:, None],
                                 None if pixels is None else pixels[:, None])

    @torch.no_grad()
    def observe_clip(self, state: WorldModelState, frames: Tensor, actions: Tensor,
                     pixels: Tensor | None = None) -> WorldModelOutput:
        """Warm up on T real frames at once (parallel form): frames (N, T, H, W, C), actions (N, T);
        pixels as in ``observe``."""
        sigma = torch.zeros(frames.shape[:2], device=frames.device)
        if state.comp is None:
            return self(frames, sigma, actions.to(frames.device), state=state, update="inplace", refine=False)
        return self._advance_compressed(state, frames, sigma, actions.to(frames.device), pixels)

    def _advance_compressed(self, state: WorldModelState, frames: Tensor, sigma: Tensor, actions: Tensor,
                            pixels: Tensor | None = None):
        """Advance on clean frames with state compression: masks from the running scores (of the
        uint8 pixels), then the scores move on and every SSM block is cut to its next prefix."""
        comp = state.comp
        if pixels is None:
            cfg = self.config
            if tuple(frames.shape[-3:]) != (cfg.image_size, cfg.image_size, cfg.channels):
                raise ValueError(f"state compression scores pixel frames: with latents {tuple(frames.shape)} "
                                 "pass the decoded frames too (pixels=...)")
            frames = pixels = frames if frames.dtype == torch.uint8 else float_to_frames(frames)
        elif pixels.dtype != torch.uint8:
            pixels = float_to_frames(pixels)
        masks, act_after = comp.observe(pixels, state.t)
        out = self(frames, sigma, actions, state=state, update="inplace", compress=masks, refine=False)
        comp.commit(pixels, act_after)
        truncate_ssm_(state, self.layers, comp)
        return out

    @torch.no_grad()
    def generate(self, state: WorldModelState, action, steps: int | None = None,
                 generator: torch.Generator | None = None, noise: Tensor | None = None, reward_from: str = "frame",
                 action_guidance: float | None = None):
        """Imagine the next frame after taking ``action`` (N,) long, then advance ``state`` once on
        the generated (uint8-quantised, clean) frame. ``steps`` denoising steps (default
        ``config.sample_steps``; 1 = fast mode). Returns ``(frame (N, H, W, C) uint8,
        reward (N,) float, terminated (N,) bool)``.

        reward_from: "frame" reads the reward head on the generated frame (what the frame shows);
        "denoiser" reads it on the first denoising pass, from pure noise, i.e. from the history and
        the action alone: the expected reward (the head is trained with a squared loss at every
        noise level), which does not depend on the generated frame showing the event.

        action_guidance: see ``predict``."""
        check_reward_from(reward_from)
        x, expected = self._sample(state, action, steps, generator, noise, action_guidance)
        frame, _, out = self._advance_on_sample(state, x, action)
        reward = expected if reward_from == "denoiser" else out.reward[:, 0]
        return frame, reward, out.term_logit[:, 0] > 0

    def _advance_on_sample(self, state: WorldModelState, x: Tensor, action) -> tuple[Tensor, Tensor, WorldModelOutput]:
        """Advance ``state`` once on a sampled frame x (N, 1, *space_shape). A pixel model advances
        on the uint8 frame it returns; a latent one on the latent itself (decoding and encoding
        again would only add the autoencoder's error; compression scores the pixels).
        Returns ``(frame (N, H, W, C) uint8, what the state saw (N, *space_shape), outputs)``."""
        frame = self.to_frames(x)[:, 0]
        seen = frames_to_float(frame) if self.codec is None else x[:, 0]
        return frame, seen, self.observe(state, seen, action, pixels=frame)

    @torch.no_grad()
    def imagine(self, state: WorldModelState, actions: Tensor, steps: int | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """Open-loop imagination for a sequence of actions (N, T) long, advancing ``state`` (as T
        calls of ``generate``). Returns what the state advanced on, in the network's space
        (N, T, *space_shape): the frames as floats in [-1, 1] (uint8-quantised), or the latents.
        For training on the model's own history (the trainer's ``--open-loop-prob``)."""
        seen = []
        for i in range(actions.shape[1]):
            x, _ = self._sample(state, actions[:, i], steps, generator, None, None)
            seen.append(self._advance_on_sample(state, x, actions[:, i])[1])
        return torch.stack(seen, 1)

    @torch.no_grad()
    def predict(self, state: WorldModelState, action, steps: int | None = None,
                generator: torch.Generator | None = None, noise: Tensor | None = None,
                action_guidance: float | None = None) -> tuple[Tensor, Tensor]:
        """The first half of ``generate``: sample the next frame after ``action`` (N,) without
        advancing ``state``. Returns ``(frame (N, H, W, C) uint8, expected reward (N,))``, the
        latter read on the first denoising pass (see ``generate``'s reward_from="denoiser"). For
        callers that choose the frame to advance on themselves (``observe``), e.g. several models
        each predicting from its own state before all observe one frame.

        action_guidance (default ``config.action_guidance``): w != 1 runs every denoising pass
        twice, with the action and with the null action, and uses ``D(null) + w (D(a) - D(null))``
        (classifier-free guidance; needs a model trained with the null action). The reward is
        read from the pass with the action."""
        x, expected = self._sample(state, action, steps, generator, noise, action_guidance)
        return self.to_frames(x)[:, 0], expected

    def _sample(self, state, action, steps, generator, noise, action_guidance) -> tuple[Tensor, Tensor]:
        """``predict`` in the network's space: (x (N, 1, *space_shape), expected reward (N,))."""
        cfg = self.config
        n = state.batch_size
        a = self._actions(action, n)[:, None]
        w = check_action_guidance(self, cfg.action_guidance if action_guidance is None else action_guidance)
        null = None if w == 1.0 else torch.full_like(a, self.NULL)
        shape = (n, 1, *cfg.space_shape)
        dev = self.pos_emb.device

        current = None if state.comp is None else state.comp.current()
        first_pass = []

        def denoise(x, s):
            out = self(x, s.expand(n, 1), a, state=state, update="none", compress=current)
            if not first_pass:
                first_pass.append(out.reward[:, 0])
            if null is None:
                return out.denoised
            free = self(x, s.expand(n, 1), null, state=state, update="none", compress=current).denoised
            return torch.lerp(free, out.denoised, w)  # free + w (with - free)

        x = sample(denoise, shape, steps or cfg.sample_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho,
                   generator=generator, device=dev, dtype=self.pos_emb.dtype, noise=noise)
        return x, first_pass[0]

    def _actions(self, action, n: int) -> Tensor:
        a = torch.as_tensor(action, dtype=torch.long, device=self.pos_emb.device)
        return a.expand(n) if a.dim() == 0 else a
