"""Batched rollout engine: N imagined environments stepped by one batched model call per step.

All per-environment state lives in preallocated tensors on one device: the model's inference
state (per layer: the SSM state of every spatial block and the last-k-frames attention cache),
the last frame, step counters, and one noise generator per environment. Memory and time per
step do not depend on how long an episode has run (the SSM state and the attention window have
fixed sizes). Environment i's sampling noise comes from its own generator, so its rollout does
not depend on which other environments share the batch.

    engine = RolloutEngine(model, num_envs=64)
    engine.reset(torch.ones(64, dtype=torch.bool), first_frames)      # or with real context
    frames, rewards, terminated = engine.step(actions)                 # (64, 64, 64, 3) uint8, ...
    planner = engine.fork(torch.tensor([3, 3, 3, 3]))                  # 4 copies of env 3

With ``compression`` set (see ``ssm_gym.model.compression``), the state is kept packed between
calls, ``chunk_envs`` environments per chunk (default: all in one): each SSM block holds only its
current prefix of state dimensions and the attention cache is a pool of the kept tokens, so the
bytes held per environment follow the scene. A step reads and updates the token pools in place
and unpacks only the SSM states (one chunk at a time, so the dense working set is one chunk's);
a pool's capacity is its chunk's largest count plus a little slack. Resets with context, forks
and ``engine.state`` go through the dense form.

With ``precision="bf16"`` the model runs under bf16 autocast and the attention ring is stored in
bf16: on a CPU with AVX-512 BF16 (the fused attention kernel of ``ssm_gym.model.attention``) a
step runs 1.7x as fast (`benchmarks/rollout.py --bf16`). The first imagined frame
is about 52 dB from fp32's (0.4 grey levels on average); over 30 open-loop steps the two rollouts
drift to about 43 dB apart, as any two rollouts from slightly different numbers do.

With ``cuda_graph=True`` on a GPU, ``step`` replays a CUDA graph of the model call: the first
step runs eagerly (warm-up) and captures the graph right after, later steps replay it; it is
captured again whenever the state's tensors, the model's parameters, ``sampling_steps``,
``action_guidance`` or ``reward_from`` change. One launch instead of thousands of small kernels,
which is what bounds a step of this small model on a GPU. It needs a fixed-size state: uncompressed (or bf16-only)
and a windowed attention ring (not the "attn_full" variant, whose cache grows). Forks step
eagerly unless asked (a planner's short branches would not repay a capture).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ssm_gym.maze.sim import N_ACTIONS
from ssm_gym.model.compression import PackedState, get_compression, pack_state, unpack_state
from ssm_gym.model.world_model import WorldModel, WorldModelState, check_action_guidance, check_reward_from


PRECISIONS = ("fp32", "bf16")


class RolloutEngine:
    def __init__(self, model: WorldModel, num_envs: int, device: str | torch.device | None = None,
                 sampling_steps: Optional[int] = None, seed: int = 0, compression=None,
                 chunk_envs: Optional[int] = None, reward_from: str = "frame", cuda_graph: bool = False,
                 action_guidance: Optional[float] = None, precision: str = "fp32"):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.num_envs = num_envs
        self.sampling_steps = model.config.sample_steps if sampling_steps is None else sampling_steps
        if self.sampling_steps < 1:
            raise ValueError(f"sampling_steps must be >= 1, got {self.sampling_steps}")
        cfg = model.config
        # classifier-free guidance on the action (see WorldModel.generate); None = the model's default
        self.action_guidance = check_action_guidance(model, cfg.action_guidance if action_guidance is None
                                                     else action_guidance)
        self.frame_shape = (cfg.image_size, cfg.image_size, cfg.channels)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "bf16" and cuda_graph:
            raise ValueError("precision='bf16' is not supported with cuda_graph=True (capture in fp32)")
        self.precision = precision
        if precision == "bf16" and compression in (None, "off"):
            compression = "bf16"  # the attention ring stored in bf16 too: no cast of it every step
        self.compression = get_compression(compression)
        if self.compression is not None and not model.config.has_ssm and self.compression.ssm_fractions:
            raise ValueError(f"compression {self.compression.name!r} sizes SSM states, but the model "
                             f"(variant {model.config.variant!r}) has none")
        self.reward_from = check_reward_from(reward_from)
        if chunk_envs is not None and chunk_envs < 1:
            raise ValueError(f"chunk_envs must be >= 1, got {chunk_envs}")
        self.chunk_envs = chunk_envs
        self._chunks: list[PackedState] = []  # packed state, one per chunk of envs (compression on)
        self.state = model.init_state(num_envs, self.device, compression=self.compression)
        self.frames = torch.zeros((num_envs, *self.frame_shape), dtype=torch.uint8, device=self.device)
        self.steps = torch.zeros(num_envs, dtype=torch.long, device=self.device)
        self.generators = [torch.Generator(device=self.device).manual_seed(seed + i) for i in range(num_envs)]
        self.cuda_graph = cuda_graph
        if cuda_graph:
            if self.packed or model.config.window is None:
                raise ValueError("cuda_graph=True needs a fixed-size state: no dynamic compression "
                                 f"(got {compression!r}) and a windowed attention ring (variant "
                                 f"{model.config.variant!r})")
            if self.device.type != "cuda":
                raise ValueError(f"cuda_graph=True needs a CUDA device, got {self.device}")
        self._graph: Optional[_StepGraph] = None

    # -- episode starts ------------------------------------------------------------------------
    @torch.inference_mode()
    def reset(self, mask: Tensor, first_frames: Tensor, context_actions: Optional[Tensor] = None,
              seeds: Optional[list[int]] = None) -> Tensor:
        """Start new episodes in the envs where `mask` (N,) is True.

        first_frames: (M, H, W, C) uint8, one first frame per reset env, or (M, T, H, W, C) real
        context frames with `context_actions` (M, T-1) (`context_actions[:, i]` was taken after
        frame i): the model is warmed up on the real history and the next `step` predicts frame T.
        seeds: reseed the reset envs' noise generators. Returns the current frames (N, H, W, C).
        """
        mask = torch.as_tensor(mask, dtype=torch.bool, device=self.device)
        if mask.shape != (self.num_envs,):
            raise ValueError(f"reset mask must have shape ({self.num_envs},), got {tuple(mask.shape)}")
        idx = mask.nonzero().flatten()
        m = len(idx)
        if m == 0:
            return self.frames
        frames = torch.as_tensor(first_frames, device=self.device)
        if frames.dtype != torch.uint8:
            raise TypeError(f"frames must be uint8, got {frames.dtype}")
        if frames.dim() == 4:
            frames = frames[:, None]
        if frames.dim() != 5 or frames.shape[0] != m or tuple(frames.shape[2:]) != self.frame_shape:
            raise ValueError(f"expected {m} first frames of shape {self.frame_shape} (or ({m}, T, *{self.frame_shape}) "
                             f"context), got {tuple(first_frames.shape)}")
        t = frames.shape[1]
        if context_actions is None:
            if t != 1:
                raise ValueError(f"{t} context frames given without context_actions")
            context_actions = torch.zeros((m, 0), dtype=torch.long)
        acts = self.check_actions(context_actions, (m, t - 1), "context_actions")
        prev = torch.cat([torch.full((m, 1), self.model.START, dtype=torch.long, device=self.device), acts], 1)
        sub = self.model.init_state(m, self.device, compression=self.compression)
        with self._autocast():
            self.model.observe_clip(sub, frames, prev)
        where = torch.full((self.num_envs,), -1, dtype=torch.long, device=self.device)
        where[idx] = torch.arange(m, device=self.device)  # env -> its row of `sub`

        def start(state: WorldModelState, rows: slice) -> None:
            local = where[rows]
            hit = (local >= 0).nonzero().flatten()
            state.index_copy_(hit, sub.index_select(local[hit]))

        self._update(start, touched=mask)
        self.frames[idx] = frames[:, -1]
        self.steps[idx] = 0
        if seeds is not None:
            if len(seeds) != m:
                raise ValueError(f"expected {m} seeds, got {len(seeds)}")
            for i, s in zip(idx.tolist(), seeds):
                self.generators[i].manual_seed(int(s))
        return self.frames

    # -- one step for all envs -----------------------------------------------------------------
    @torch.inference_mode()
    def step(self, actions) -> tuple[Tensor, Tensor, Tensor]:
        """Take one action in every env: returns (frames (N, H, W, C) uint8, rewards (N,) float,
        terminated (N,) bool), all on the engine's device."""
        a = self.check_actions(actions, (self.num_envs,), "actions")
        noise = self._draw_noise()
        if self.cuda_graph:
            return self._graph_step(a, noise)
        rewards = torch.empty(self.num_envs, device=self.device)
        terminated = torch.empty(self.num_envs, dtype=torch.bool, device=self.device)

        def advance(state: WorldModelState, rows: slice) -> None:
            self.frames[rows], rewards[rows], terminated[rows] = self.model.generate(
                state, a[rows], steps=self.sampling_steps, noise=noise[rows], reward_from=self.reward_from,
                action_guidance=self.action_guidance)

        self._update(advance, one_frame=True)
        self.steps += 1
        return self.frames, rewards, terminated

    def _draw_noise(self) -> Tensor:
        """The next sampling noise of every env, each from its own generator (N, 1, *space_shape)."""
        return torch.stack([torch.randn((1, *self.model.config.space_shape), generator=g, device=self.device)
                            for g in self.generators])

    def _graph_step(self, a: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # everything the captured kernels read by address or were specialised on
        key = (self._state.data_ptrs(), self.frames.data_ptr(), tuple(p.data_ptr() for p in self.model.parameters()),
               self.sampling_steps, self.action_guidance, self.reward_from)
        graph = self._graph
        if graph is None or graph.key != key:  # first step, or something it was captured on changed
            graph = self._graph = _StepGraph(self, key)
        frames, rewards, terminated = graph.step(self, a, noise)
        self.steps += 1
        return frames, rewards, terminated

    @torch.inference_mode()
    def predict(self, actions) -> Tensor:
        """The frame each env would imagine after `actions` (N,), without advancing anything (state,
        frames, step counts; the noise streams do move on). For observers that then `observe` the
        real frame: an agent that acts in the real maze seeing the model's view of it."""
        a = self.check_actions(actions, (self.num_envs,), "actions")
        noise = self._draw_noise()
        out = torch.empty_like(self.frames)

        def predict(state: WorldModelState, rows: slice) -> None:
            out[rows] = self.model.predict(state, a[rows], steps=self.sampling_steps, noise=noise[rows],
                                           action_guidance=self.action_guidance)[0]

        self._update(predict)
        return out

    @torch.inference_mode()
    def observe(self, frames: Tensor, actions) -> Tensor:
        """Advance every env on a *real* frame (N, H, W, C) uint8 reached by `actions` (N,) instead
        of a generated one: keeps the model in sync with a real environment (planners)."""
        a = self.check_actions(actions, (self.num_envs,), "actions")
        frames = torch.as_tensor(frames, device=self.device)
        if frames.dtype != torch.uint8 or tuple(frames.shape) != (self.num_envs, *self.frame_shape):
            raise ValueError(f"frames must be uint8 of shape {(self.num_envs, *self.frame_shape)}, "
                             f"got {frames.dtype} {tuple(frames.shape)}")
        self._update(lambda state, rows: self.model.observe(state, frames[rows], a[rows]), one_frame=True)
        self.frames.copy_(frames)
        self.steps += 1
        return self.frames

    # -- planners ------------------------------------------------------------------------------
    def fork(self, idx, cuda_graph: bool = False) -> "RolloutEngine":
        """A new engine whose env j is a copy of this engine's env idx[j] (idx may repeat): state,
        frame, step count and noise stream. The copies then evolve independently. cuda_graph:
        step the fork with a CUDA graph too (worth it only for long branches)."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.device).flatten()
        if len(idx) == 0 or idx.min() < 0 or idx.max() >= self.num_envs:
            raise ValueError(f"fork indices must be in [0, {self.num_envs}), got {idx.tolist()}")
        new = RolloutEngine.__new__(RolloutEngine)
        new.device, new.model, new.num_envs = self.device, self.model, len(idx)
        new.sampling_steps, new.frame_shape, new.reward_from = self.sampling_steps, self.frame_shape, self.reward_from
        new.action_guidance, new.precision = self.action_guidance, self.precision
        new.compression, new.chunk_envs, new._chunks = self.compression, self.chunk_envs, []
        new.cuda_graph, new._graph = self.cuda_graph and cuda_graph, None
        new.state = self.state.index_select(idx)
        new.frames = self.frames.index_select(0, idx).clone()
        new.steps = self.steps.index_select(0, idx).clone()
        new.generators = []
        for i in idx.tolist():
            g = torch.Generator(device=self.device)
            g.set_state(self.generators[i].get_state())
            new.generators.append(g)
        return new

    # -- state storage -------------------------------------------------------------------------
    @property
    def packed(self) -> bool:
        """True when the state is held packed (dynamic compression on)."""
        return self.compression is not None and self.compression.dynamic

    @property
    def state(self) -> WorldModelState:
        """The model state of all envs, dense. With dynamic compression this unpacks a fresh copy:
        assign it back (``engine.state = s``) to keep changes."""
        if not self.packed:
            return self._state
        return unpack_state(PackedState.cat(self._chunks))

    @state.setter
    def state(self, state: WorldModelState) -> None:
        if self.packed:
            self._chunks = [pack_state(state.index_select(torch.arange(r.start, r.stop, device=self.device)),
                                       self.model.layers) for r in self._chunk_rows()]
        else:
            self._state = state

    def _chunk_rows(self) -> list[slice]:
        chunk = self.chunk_envs or self.num_envs
        return [slice(lo, min(lo + chunk, self.num_envs)) for lo in range(0, self.num_envs, chunk)]

    def _update(self, fn, touched: Optional[Tensor] = None, one_frame: bool = False) -> None:
        """Run ``fn(state, rows)`` on the envs ``rows`` (a slice), in place. Unpacked: once for all
        envs. Packed: chunk by chunk (only chunks with a ``touched`` env, if given); a one-frame
        step works on the chunk's token pools in place (SSM states unpacked and packed again),
        anything else on a dense copy of the chunk, packed again after."""
        if not self.packed:
            with self._autocast():
                fn(self._state, slice(0, self.num_envs))
            return
        for i, rows in enumerate(self._chunk_rows()):
            if touched is not None and not bool(touched[rows].any()):
                continue
            state = unpack_state(self._chunks[i], pools=one_frame)
            with self._autocast():
                fn(state, rows)
            self._chunks[i] = pack_state(state, self.model.layers)

    def _autocast(self):
        """Model calls in bf16 autocast with ``precision="bf16"``: on a CPU with AVX-512 BF16 the
        matrix products and the fused attention kernel run about twice as fast as fp32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def model_state_nbytes_by_part(self) -> dict[str, int]:
        """Bytes of the model state as held (packed when compressed), split by part."""
        if not self.packed:
            return self._state.nbytes_by_part()
        total: dict[str, int] = {}
        for chunk in self._chunks:
            for k, v in chunk.nbytes_by_part().items():
                total[k] = total.get(k, 0) + v
        return total

    def state_nbytes(self) -> int:
        """Bytes of per-environment state held for all envs (model state, frames, counters)."""
        return sum(self.model_state_nbytes_by_part().values()) + self.frames.numel() + self.steps.numel() * 8

    def check_actions(self, actions, shape: tuple[int, ...], name: str) -> Tensor:
        a = torch.as_tensor(actions, device=self.device)
        if tuple(a.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(a.shape)}")
        if a.is_floating_point() or a.is_complex() or a.dtype == torch.bool:
            raise TypeError(f"{name} must be integers in [0, {N_ACTIONS}), got dtype {a.dtype}")
        if a.numel() and (a.min() < 0 or a.max() >= N_ACTIONS):
            raise ValueError(f"{name} out of range: values must be in [0, {N_ACTIONS}), got min {int(a.min())} max {int(a.max())}")
        return a.long()


class _StepGraph:
    """A CUDA graph of one engine step's model call (``generate`` on the engine's state, writing
    the frames), with static buffers for its inputs (actions, noise) and outputs (rewards,
    terminations). The first ``step`` runs eagerly (a real step that also warms up kernels and
    allocators; nothing can be captured before that), and the graph is captured after it: capture
    records kernels without running them, so the state is not advanced twice. (The engine is
    passed in, not kept: no reference cycle holding a discarded engine's memory.)"""

    def __init__(self, engine: RolloutEngine, key: tuple):
        self.key, self.graph = key, None
        n = engine.num_envs
        self.actions = torch.zeros(n, dtype=torch.long, device=engine.device)
        self.noise = torch.zeros((n, 1, *engine.model.config.space_shape), device=engine.device)
        self.rewards = torch.zeros(n, device=engine.device)
        self.terminated = torch.zeros(n, dtype=torch.bool, device=engine.device)

    def _run(self, e: RolloutEngine) -> None:
        frames, rewards, terminated = e.model.generate(e._state, self.actions, steps=e.sampling_steps,
                                                       noise=self.noise, reward_from=e.reward_from,
                                                       action_guidance=e.action_guidance)
        e.frames.copy_(frames)
        self.rewards.copy_(rewards)
        self.terminated.copy_(terminated)

    def step(self, e: RolloutEngine, a: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self.actions.copy_(a)
        self.noise.copy_(noise)
        if self.graph is None:
            self._run(e)  # eager warm-up: this step's real result
            torch.cuda.synchronize(e.device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._run(e)
        else:
            self.graph.replay()
        # fresh tensors for rewards/terminations (callers may keep them); frames: the engine's buffer
        return e.frames, self.rewards.clone(), self.terminated.clone()
