"""`SSMWorld-Maze-v0`: the learned world model as a single and a native vector Gymnasium env.

Both are thin layers over `ssm_gym.rollout.RolloutEngine` (a batch of 1 and of N). Episodes
start from the real maze's first frame (`reset(seed=s)` shows the same first frame as
`SSMWorld-MazeReal-v0` reset with seed s), after real history passed as context, or (with
`context_data`) after real history drawn from a dataset folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import gymnasium as gym
import numpy as np
import torch
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv

from ssm_gym.checkpoints import load_world_model
from ssm_gym.envs.maze_real import (
    ACTION_SPACE,
    OBSERVATION_SPACE,
    MazeRealEnv,
    check_single_action,
    check_max_episode_steps,
    setup_vector_env,
)
from ssm_gym.maze.record import RecordedMoments
from ssm_gym.maze.sim import N_ACTIONS, MazeBatch, check_actions
from ssm_gym.model.world_model import WorldModel
from ssm_gym.rollout.engine import RolloutEngine
from ssm_gym.rollout.ensemble import EnsembleEngine


def _load(checkpoint: str | Path | None, model: Optional[WorldModel], device: str) -> WorldModel:
    if model is not None:
        return model.to(device).eval()
    return load_world_model(checkpoint, device)


def _engine(checkpoint, model, device: str, num_envs: int, ensemble: Sequence, disagreement_penalty: float,
            **engine_kwargs) -> RolloutEngine | EnsembleEngine:
    """The env's engine: the model alone, or driving an ensemble with the `ensemble` models (each a
    checkpoint name or folder, or a loaded `WorldModel`) as members, all with the same settings
    but their own noise streams (members never step by CUDA graph: they predict and observe)."""
    if isinstance(ensemble, (str, Path, WorldModel)):
        raise TypeError(f"ensemble must be a list of models (names, folders or WorldModels), got {ensemble!r}")
    if not disagreement_penalty >= 0.0:
        raise ValueError(f"disagreement_penalty must be >= 0, got {disagreement_penalty}")
    if disagreement_penalty > 0 and not ensemble:
        raise ValueError("disagreement_penalty needs ensemble=[...]: the models whose disagreement is penalised")
    driver = RolloutEngine(_load(checkpoint, model, device), num_envs, device, **engine_kwargs)
    if not ensemble:
        return driver
    member_kwargs = {**engine_kwargs, "cuda_graph": False}
    members = [RolloutEngine(_load(None, m, device) if isinstance(m, WorldModel) else _load(m, None, device), num_envs,
                             device, seed=k * num_envs, **member_kwargs) for k, m in enumerate(ensemble, 1)]
    return EnsembleEngine(driver, members)


def penalise(paid: np.ndarray, engine, penalty: float, info: dict) -> np.ndarray:
    """Subtract `penalty` x the ensemble's disagreement of this step (logged in `info["disagreement"]`)."""
    if not isinstance(engine, EnsembleEngine):
        return paid
    d = engine.disagreement.float().cpu().numpy().copy()  # the info's own, not a view of the engine's tensor
    if np.ndim(paid) == 0:  # the single env: one number
        d = d[0]
        info["disagreement"] = float(d)
    else:
        info["disagreement"] = d
    return (paid - np.float32(penalty) * d).astype(np.float32)


# reward_mode -> where the engine reads the head ("real" pays the ground-truth maze, the head is only logged)
REWARD_MODES = {"threshold": "frame", "soft": "frame", "expected": "denoiser", "real": "frame"}
REWARD_THRESHOLD = 0.5  # the head's reading above which a step pays 1 ("threshold" mode)


def check_reward_mode(mode: str) -> str:
    if mode not in REWARD_MODES:
        raise ValueError(f"reward_mode must be one of {sorted(REWARD_MODES)}, got {mode!r}")
    return REWARD_MODES[mode]


def pay(raw: np.ndarray, mode: str, threshold: float, baseline: Optional[np.ndarray] = None,
        real: Optional[np.ndarray] = None) -> np.ndarray:
    """Reward paid for raw head outputs: 1/0 at ``threshold`` ("threshold"), or the reading itself
    clipped to [0, 1] ("soft": read on the generated frame; "expected": on the first denoising
    pass); with a per-action ``baseline`` (the baseline of each env's action, "expected" only),
    the expected reward minus it, clipped to [-1, 1]. "real": the
    ground-truth maze's reward ``real`` for the same actions from the same start."""
    if mode == "real":
        return np.asarray(real, dtype=np.float32)
    if mode in ("expected", "soft"):
        if baseline is not None and mode == "expected":
            return np.clip(raw - baseline, -1.0, 1.0).astype(np.float32)
        return np.clip(raw, 0.0, 1.0).astype(np.float32)
    return (raw > threshold).astype(np.float32)


def check_real_start(mode: str) -> None:
    if mode == "real":
        raise ValueError("reward_mode 'real' pays the ground-truth maze, which cannot follow a start from given "
                         "context_obs: start from a seed or from context_data")


def check_reward_baseline(baseline, mode: str) -> Optional[np.ndarray]:
    """A per-action reward baseline: N_ACTIONS finite numbers, for reward_mode "expected"."""
    if baseline is None:
        return None
    if mode != "expected":
        raise ValueError(f"reward_baseline works with reward_mode='expected', got {mode!r}")
    b = np.asarray(baseline, dtype=np.float32)
    if b.shape != (N_ACTIONS,) or not np.isfinite(b).all():
        raise ValueError(f"reward_baseline must be {N_ACTIONS} finite numbers (one per action), got {baseline!r}")
    return b


def check_context(options: dict, n: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate reset options {"context_obs": (T, 64, 64, 3) uint8, "context_actions": (T-1,) int}
    (with a leading env dimension n for the vector env). Raises an error naming the problem."""
    if "context_obs" not in options or "context_actions" not in options:
        raise ValueError("reset options need both 'context_obs' and 'context_actions'")
    obs, acts = np.asarray(options["context_obs"]), np.asarray(options["context_actions"])
    lead = () if n is None else (n,)
    if obs.dtype != np.uint8:
        raise TypeError(f"context_obs must be uint8, got {obs.dtype}")
    if obs.ndim != len(lead) + 4 or obs.shape[:len(lead)] != lead or obs.shape[-3:] != OBSERVATION_SPACE.shape or obs.shape[len(lead)] < 1:
        raise ValueError(f"context_obs must have shape {lead + ('T',) + OBSERVATION_SPACE.shape} with T >= 1, got {obs.shape}")
    t = obs.shape[len(lead)]
    if acts.shape != lead + (t - 1,):
        raise ValueError(f"context_actions must have shape {lead + (t - 1,)} (one action between consecutive "
                         f"context frames: context_actions[i] is taken after context_obs[i]), got {acts.shape}")
    if acts.size:
        check_actions(acts.reshape(-1), acts.size)
    return obs, acts.astype(np.int64)


class DatasetStarts:
    """Real histories to start imagined episodes from: `context_len` consecutive frames of a
    random episode of a dataset folder (`python -m training.collect`), from a random place, with
    the actions taken between them. DIAMOND, IRIS and Dreamer start imagination this way (from
    replayed real data, for short horizons), which keeps the imagined world close to the real one."""

    def __init__(self, directory: str | Path, context_len: int = 32, cache_episodes: int = 64):
        self.moments = RecordedMoments(directory, context_len, cache_episodes)  # also the real maze there
        self.clips = self.moments.clips
        self._index = {path.name: e for e, (path, _) in enumerate(self.clips.episodes)}

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """(context_obs (T, 64, 64, 3) uint8, context_actions (T-1,) int64, facts for `info`)."""
        i, t0 = self.clips.draw(rng)
        clip = self.clips.clip(i, t0)
        facts = {"context_episode": self.clips.episodes[i][0].name, "context_start": t0}
        return clip["frames"].numpy(), clip["prev_actions"][1:].numpy(), facts

    def place(self, sim: MazeBatch, i: int, facts: dict[str, Any], strict: bool = False) -> bool:
        """Put env i of a ground-truth maze where a drawn start's last context frame was (the
        truth beside the imagined episode: `info["reward_real"]`, reward_mode "real"). Data the
        real maze cannot rebuild (not recorded by this package, e.g. Memory Maze's, or with other
        maze settings) returns False, or raises if `strict`."""
        try:
            self.moments.place_at(sim, i, self._index[facts["context_episode"]], facts["context_start"])
        except ValueError:  # DatasetError included
            if strict:
                raise
            return False
        return True


def _starts(context_data: str | Path | None, context_len: int) -> Optional[DatasetStarts]:
    return None if context_data is None else DatasetStarts(context_data, context_len)


class WorldModelEnv(gym.Env):
    """The maze imagined by the learned world model.

    ## Description
    Each `step` is one batched denoising pass of the world model (block-wise Mamba-2 scan + frame-
    local attention); its state carries the memory of the episode at a constant cost per step.

    ## Action Space
    `Discrete(6)`, as `SSMWorld-MazeReal-v0`: noop, forward, left, right, forward+left, forward+right.

    ## Observation Space
    `Box(0, 255, (64, 64, 3), uint8)`: the imagined first-person frame.

    ## Starting State
    `reset(seed=s)`: the first frame of the real maze for seed s (same as `SSMWorld-MazeReal-v0`).
    `reset(options={"context_obs": (T, 64, 64, 3) uint8, "context_actions": (T-1,) int})`: the model is
    warmed up on real history (`context_actions[i]` was taken after `context_obs[i]`); the returned
    observation is the last context frame and the next `step` predicts frame T.
    With `context_data` (a dataset folder), every reset without such options starts after `context_len` real
    frames drawn from it at random (the way DIAMOND, IRIS and Dreamer start imagination from replayed
    real data); `info` names the episode file and first frame. Pair it with a short
    `max_episode_steps` (e.g. 32) to train agents on short imagined horizons that drift little.
    The start is the first thing drawn from the env's generator, so a seeded reset picks the same
    recorded moment as `SSMWorld-MazeReal-v0` with the same `context_data` and seed (paired
    comparisons; later autoresets draw differently in the two, which use their generators apart).

    ## Rewards
    The model's reward head (the real maze pays +1 for touching the target). `reward_mode`
    "threshold" (default): the head read on the generated frame, 1.0 when it exceeds
    `reward_threshold`, else 0.0. "soft": the same reading paid as is, clipped to [0, 1] (the
    head is trained with a squared loss, so this is the expected reward given the imagined frame
    and history: no touch the head is unsure of is rounded away, nor a doubtful one paid in full).
    "expected": the head read on the first denoising pass, i.e. from
    the history and the action alone (the expected reward), paid as is, clipped to [0, 1]; use it
    when the generated frames do not show the reward events (see README, Agents). The raw
    prediction is in `info["reward_raw"]`. `reward_baseline` (expected mode): one number per
    action subtracted from the expected reward (paid clipped to [-1, 1]), e.g. the model's own mean
    expected reward for each action on real data (`ssm_gym.eval.prediction.action_sensitivity`):
    the head learns that touches follow moves, and without it an agent learns to repeat the
    action with the highest prior instead of going where the target is (see README, Agents).

    The truth beside it: when the start is known to the real maze (a seeded or random fresh maze,
    or a `context_data` start), a ground-truth maze is stepped in lock-step with the same actions
    and `info["reward_real"]` holds what it paid (NaN after a start from given `context_obs`, or
    from data the real maze cannot rebuild: episodes not recorded by this package).
    `reward_mode` "real" pays that instead of the head's: a control that trains on imagined
    observations with true rewards, to tell a wrong reward head from wrong frames (not training
    in imagination alone; it needs known starts).

    ## Episode End
    Terminates when the termination head says so (the maze itself never terminates); truncates
    after `max_episode_steps`.

    ## Arguments
    - `checkpoint`: folder with config.json + model.safetensors, or a shipped model's name
      (`"maze-latent-ol"`, the default; `"maze-latent-walls"`, which stops at walls more often;
      `"maze-latent-balls"`, which keeps the targets in view longer, the one to train agents in;
      `"maze-latent"`, `"maze-cpu"`; see ssm_gym/checkpoints/ and the README's Shipped models).
    - `model`: an already loaded `WorldModel` (instead of `checkpoint`).
    - `device` ("cpu"): torch device. `sampling_steps` (None = the model's default; 1 = fast mode).
    - `reward_baseline` (None): per-action numbers subtracted from the expected reward (above).
    - `action_guidance` (None = the model's default, 1 = off): classifier-free guidance on the action,
      for models trained with the null action (see WorldModel.generate); costs one more model pass
      per denoising step.
    - `max_episode_steps` (1000), `reward_mode` ("threshold", "soft", "expected" or "real"), `reward_threshold` (0.5).
    - `maze_size` (9), `n_objects` (3): the real maze that provides first frames.
    - `render_mode`: `"rgb_array"` returns the imagined frame.
    - `context_data` (None): a dataset folder to start episodes from (above); `context_len` (32).
    - `compression` (None = off): dynamic state compression, a setting name ("light", "medium", "strong",
      "bf16", "strong-bf16", "strong-compact", "strong-bf16-compact") or a `CompressionConfig` (see
      ssm_gym/model/compression.py).
    - `cuda_graph` (False): on a GPU, step by replaying a CUDA graph of the model call (see
      ssm_gym/rollout/engine.py; uncompressed state and a windowed attention ring only).
    - `precision` ("fp32"): "bf16" runs the model in bf16 autocast with its attention ring in bf16,
      1.7x the env-steps/s on a CPU with AVX-512 BF16 (see ssm_gym/rollout/engine.py).
    - `ensemble` (()): more models (names, folders or `WorldModel`s) that follow the same imagined
      episodes and predict each next frame from their own state (ssm_gym/rollout/ensemble.py);
      `info["disagreement"]` is the mean absolute pixel difference in [0, 1] between their
      predictions and the frame shown. `disagreement_penalty` (0.0): subtracted from the reward
      times that disagreement, so an agent is paid less where the models disagree (MOPO-style).
      Each member costs about 1.2x the model's own step.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, checkpoint: str | Path | None = None, device: str = "cpu", sampling_steps: Optional[int] = None,
                 max_episode_steps: int = 1000, reward_threshold: float = REWARD_THRESHOLD, maze_size: int = 9, n_objects: int = 3,
                 render_mode: Optional[str] = None, model: Optional[WorldModel] = None, compression=None,
                 reward_mode: str = "threshold", context_data: str | Path | None = None, context_len: int = 32,
                 cuda_graph: bool = False,
                 action_guidance: Optional[float] = None, reward_baseline=None, precision: str = "fp32",
                 ensemble: Sequence = (), disagreement_penalty: float = 0.0):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        check_max_episode_steps(max_episode_steps)
        self.starts = _starts(context_data, context_len)
        self.engine = _engine(checkpoint, model, device, 1, ensemble, disagreement_penalty,
                              sampling_steps=sampling_steps, compression=compression,
                              reward_from=check_reward_mode(reward_mode), cuda_graph=cuda_graph,
                              action_guidance=action_guidance, precision=precision)
        self.disagreement_penalty = disagreement_penalty
        self.reward_mode = reward_mode
        self.reward_baseline = check_reward_baseline(reward_baseline, reward_mode)
        self.real = MazeRealEnv(maze_size, n_objects)
        self.max_episode_steps, self.reward_threshold, self.render_mode = max_episode_steps, reward_threshold, render_mode
        self.observation_space, self.action_space = OBSERVATION_SPACE, ACTION_SPACE
        self._obs: Optional[np.ndarray] = None

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict[str, Any]] = None):
        given = bool(options) and ("context_obs" in options or "context_actions" in options)
        if given:
            check_real_start(self.reward_mode)  # before anything changes
        super().reset(seed=seed)
        # a drawn start comes first from the generator: a seed picks the same recorded moment as
        # SSMWorld-MazeReal-v0 with the same context_data (paired comparisons)
        drawn = self.starts.draw(self.np_random) if self.starts is not None and not given else None
        maze_seed = seed if seed is not None else int(self.np_random.integers(2**31))
        noise_seed = int(self.np_random.integers(2**62))
        info: dict[str, Any] = {"step": 0}
        context = None
        self._real_known = True
        if given:
            context = check_context(options)
            self._real_known = False
        elif drawn is not None:
            *context, facts = drawn
            info.update(facts)
            self._real_known = self.starts.place(self.real.sim, 0, facts, strict=self.reward_mode == "real")
        if context is not None:
            obs, acts = context
            self.engine.reset(torch.ones(1, dtype=torch.bool), torch.from_numpy(obs)[None],
                              torch.from_numpy(acts)[None], seeds=[noise_seed])
            info["context_len"] = len(obs)
        else:
            first, real_info = self.real.reset(seed=maze_seed)
            self.engine.reset(torch.ones(1, dtype=torch.bool), torch.from_numpy(first)[None], seeds=[noise_seed])
            info["maze_layout"] = real_info["maze_layout"]
        info["maze_seed"] = maze_seed
        self._elapsed = 0
        self._obs = self.engine.frames[0].cpu().numpy()
        return self._obs.copy(), info

    def step(self, action):
        if self._obs is None:
            raise RuntimeError("call reset() before step()")
        a = check_single_action(action)
        frames, rewards, terminated = self.engine.step(torch.from_numpy(a))
        real = float(self.real.sim.step(a)[0]) if self._real_known else float("nan")
        self._elapsed += 1
        self._obs = frames[0].cpu().numpy()
        raw = float(rewards[0])
        base = None if self.reward_baseline is None else self.reward_baseline[a[0]]
        info = {"step": self._elapsed, "reward_raw": raw, "reward_real": real}
        paid = float(penalise(pay(np.float32(raw), self.reward_mode, self.reward_threshold, base, np.float32(real)),
                              self.engine, self.disagreement_penalty, info))
        return self._obs.copy(), paid, bool(terminated[0]), self._elapsed >= self.max_episode_steps, info

    def render(self):
        return None if self.render_mode is None or self._obs is None else self._obs.copy()


class WorldModelVectorEnv(VectorEnv):
    """N imagined mazes in one batched model call per step (`gym.make_vec("SSMWorld-Maze-v0", N)`).

    Sub-env i reset with seed s behaves like `WorldModelEnv` reset with seed s + i. Arguments as
    `WorldModelEnv`, plus `num_envs`, `chunk_envs` (with compression: envs stored and stepped
    this many at a time, each chunk packed on its own: bounds the dense working set) and `autoreset_mode` (`NEXT_STEP`, Gymnasium's default, or
    `SAME_STEP`: the last frame of a finished episode goes to `info["final_obs"]`, as
    stable-baselines3 expects). Reset options: `reset_mask` (N,) bool to reset a subset, and
    `context_obs` (N, T, 64, 64, 3) / `context_actions` (N, T-1) to start after real history. With
    `context_data`, every (re)start without given context, autoresets included, draws each env's real history from
    the dataset with that env's generator.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10, "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int = 1, checkpoint: str | Path | None = None, device: str = "cpu",
                 sampling_steps: Optional[int] = None, max_episode_steps: int = 1000, reward_threshold: float = REWARD_THRESHOLD,
                 maze_size: int = 9, n_objects: int = 3, render_mode: Optional[str] = None,
                 autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP, model: Optional[WorldModel] = None,
                 compression=None, chunk_envs: Optional[int] = None, reward_mode: str = "threshold",
                 context_data: str | Path | None = None, context_len: int = 32, cuda_graph: bool = False,
                 action_guidance: Optional[float] = None, reward_baseline=None, precision: str = "fp32",
                 ensemble: Sequence = (), disagreement_penalty: float = 0.0):
        setup_vector_env(self, num_envs, render_mode, autoreset_mode, max_episode_steps)
        self.starts = _starts(context_data, context_len)
        self.engine = _engine(checkpoint, model, device, num_envs, ensemble, disagreement_penalty,
                              sampling_steps=sampling_steps, compression=compression, chunk_envs=chunk_envs,
                              reward_from=check_reward_mode(reward_mode), cuda_graph=cuda_graph,
                              action_guidance=action_guidance, precision=precision)
        self.disagreement_penalty = disagreement_penalty
        self.reward_mode = reward_mode
        self.reward_baseline = check_reward_baseline(reward_baseline, reward_mode)
        self.real = MazeBatch(num_envs, maze_size, n_objects)  # first frames, and the truth beside each env
        self._real_known = np.zeros(num_envs, dtype=bool)  # does self.real follow env i's start?
        self.max_episode_steps, self.reward_threshold = max_episode_steps, reward_threshold
        self._rngs = [seeding.np_random(None)[0] for _ in range(num_envs)]
        self._elapsed = np.zeros(num_envs, dtype=np.int64)
        self._needs_reset = np.zeros(num_envs, dtype=bool)
        self._obs: Optional[np.ndarray] = None

    def _start(self, idx: np.ndarray, maze_seeds: Optional[list[int]] = None,
               context: Optional[tuple[np.ndarray, np.ndarray]] = None) -> np.ndarray:
        """(Re)start episodes in envs idx, exactly as `WorldModelEnv.reset` does for one env: the
        real history is drawn from the env's generator (with `context_data`, unless given), then
        the maze seed is given (a seeded reset) or drawn, then the noise seed."""
        drawn = [self.starts.draw(self._rngs[i]) for i in idx] if context is None and self.starts is not None else None
        maze_seeds = [int(self._rngs[i].integers(2**31)) if maze_seeds is None or maze_seeds[k] is None else maze_seeds[k]
                      for k, i in enumerate(idx)]
        noise_seeds = [int(self._rngs[i].integers(2**62)) for i in idx]
        mask = torch.zeros(self.num_envs, dtype=torch.bool)
        mask[torch.from_numpy(idx)] = True
        self._real_known[idx] = True
        if context is not None:  # given for all envs: keep the restarted ones
            context = (context[0][idx], context[1][idx])
            self._real_known[idx] = False
        elif drawn:
            context = (np.stack([d[0] for d in drawn]), np.stack([d[1] for d in drawn]))
            for i, d in zip(idx, drawn):
                self._real_known[i] = self.starts.place(self.real, i, d[2], strict=self.reward_mode == "real")
        if context is None:
            for i, s in zip(idx, maze_seeds):
                self.real.reset_env(i, np.random.default_rng(s))
            self.engine.reset(mask, torch.from_numpy(self.real.render()[idx]), seeds=noise_seeds)
        else:
            self.engine.reset(mask, torch.from_numpy(context[0]), torch.from_numpy(context[1]), seeds=noise_seeds)
        self._elapsed[idx] = 0
        return np.array(maze_seeds, dtype=np.int64)

    def reset(self, *, seed: int | list | None = None, options: Optional[dict[str, Any]] = None):
        options = options or {}
        mask = np.asarray(options.get("reset_mask", np.ones(self.num_envs, bool)), dtype=bool)
        if mask.shape != (self.num_envs,):
            raise ValueError(f"reset_mask must have shape ({self.num_envs},), got {mask.shape}")
        context = check_context(options, self.num_envs) if ("context_obs" in options or "context_actions" in options) else None
        if context is not None:
            check_real_start(self.reward_mode)  # before anything changes
        idx = np.flatnonzero(mask)
        maze_seeds = None
        if seed is not None:
            seeds = [int(seed) + i for i in range(self.num_envs)] if isinstance(seed, (int, np.integer)) else list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"expected {self.num_envs} seeds, got {len(seeds)}")
            for i in idx:
                if seeds[i] is not None:
                    self._rngs[i] = seeding.np_random(int(seeds[i]))[0]
            maze_seeds = [None if seeds[i] is None else int(seeds[i]) for i in idx]
        used = self._start(idx, maze_seeds, context)
        full = np.full(self.num_envs, -1, dtype=np.int64)
        full[idx] = used
        self._needs_reset[idx] = False
        self._obs = self.engine.frames.cpu().numpy()
        return self._obs.copy(), {"maze_seed": full, "_maze_seed": mask.copy()}

    def step(self, actions):
        if self._obs is None:
            raise RuntimeError("call reset() before step()")
        a = check_actions(actions, self.num_envs)
        frames, raw, terminated = self.engine.step(torch.from_numpy(a))
        raw = raw.float().cpu().numpy()
        real = np.where(self._real_known, self.real.step(a), np.nan).astype(np.float32)
        rewards = pay(raw, self.reward_mode, self.reward_threshold,
                      None if self.reward_baseline is None else self.reward_baseline[a], real)
        terminated = terminated.cpu().numpy()
        self._elapsed += 1
        truncated = self._elapsed >= self.max_episode_steps
        ones = np.ones(self.num_envs, bool)
        info: dict[str, Any] = {"reward_raw": raw, "_reward_raw": ones, "reward_real": real, "_reward_real": ones.copy()}
        rewards = penalise(rewards, self.engine, self.disagreement_penalty, info)
        if "disagreement" in info:
            info["_disagreement"] = ones.copy()
        mode = self.metadata["autoreset_mode"]
        if mode == AutoresetMode.NEXT_STEP:
            redo = np.flatnonzero(self._needs_reset)
            if len(redo):
                self._start(redo)
                rewards[redo], raw[redo], real[redo], terminated[redo], truncated[redo] = 0.0, 0.0, 0.0, False, False
                if "disagreement" in info:
                    info["disagreement"][redo] = 0.0
            self._needs_reset = terminated | truncated
            obs = self.engine.frames.cpu().numpy()
        else:
            done = terminated | truncated
            obs = frames.cpu().numpy()
            if done.any():
                info["final_obs"] = obs.copy()
                info["final_info"] = {"reward_raw": raw.copy(), "reward_real": real.copy(), "step": self._elapsed.copy(),
                                      **({"disagreement": info["disagreement"].copy()} if "disagreement" in info else {})}
                info["_final_obs"] = info["_final_info"] = done.copy()
                self._start(np.flatnonzero(done))
                obs = self.engine.frames.cpu().numpy()
        self._obs = obs
        return obs.copy(), rewards, terminated, truncated, info

    def render(self):
        return None if self.render_mode is None or self._obs is None else self._obs.copy()
