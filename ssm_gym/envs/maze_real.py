"""`SSMWorld-MazeReal-v0`: the ground-truth maze as a single and a native vector Gymnasium env.

Both wrap `ssm_gym.maze.sim.MazeBatch` (a batch of 1 and of N), so they share every line of
dynamics and rendering; `tests/test_maze_env.py` checks that the vector env equals N single envs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from ssm_gym.maze.record import RecordedMoments
from ssm_gym.maze.render import FOV_DEG, IMAGE_SIZE
from ssm_gym.maze.sim import N_ACTIONS, MazeBatch, check_actions

OBSERVATION_SPACE = spaces.Box(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
ACTION_SPACE = spaces.Discrete(N_ACTIONS)


def check_max_episode_steps(max_episode_steps: int) -> None:
    if max_episode_steps < 1:
        raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")


def setup_vector_env(env: VectorEnv, num_envs: int, render_mode, autoreset_mode, max_episode_steps: int) -> None:
    """What every native vector env here shares: checked arguments, metadata and spaces."""
    check_max_episode_steps(max_episode_steps)
    autoreset_mode = AutoresetMode(autoreset_mode)
    if autoreset_mode == AutoresetMode.DISABLED:
        raise ValueError("autoreset_mode DISABLED is not supported; use NEXT_STEP or SAME_STEP")
    if render_mode not in (None, "rgb_array"):
        raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    env.metadata = {**env.metadata, "autoreset_mode": autoreset_mode}
    env.num_envs, env.render_mode = num_envs, render_mode
    env.single_observation_space, env.single_action_space = OBSERVATION_SPACE, ACTION_SPACE
    env.observation_space = batch_space(OBSERVATION_SPACE, num_envs)
    env.action_space = batch_space(ACTION_SPACE, num_envs)


def check_single_action(action) -> np.ndarray:
    a = np.asarray(action)
    if a.shape != ():
        raise ValueError(f"expected a single discrete action (a scalar in [0, {N_ACTIONS})), got shape {a.shape}")
    return check_actions(a.reshape(1), 1)


class MazeRealEnv(gym.Env):
    """Ground-truth first-person maze, a fast stand-in for Memory Maze.

    ## Description
    A procedurally generated maze (a new one every episode, fixed by the reset seed) with colored
    balls on the floor. The agent sees a 64x64 first-person view; the image border shows the color
    of the current target ball. Touching the target gives +1 and a new target (another ball).
    Poses are quantized (positions on a lattice of 1/12 tile, 16 headings), so returning to a
    pose renders exactly the same frame: revisits have exact ground truth.

    ## Action Space
    `Discrete(6)`: 0 noop, 1 forward (1/3 tile), 2 turn left, 3 turn right (22.5 degrees),
    4 forward + left, 5 forward + right. A forward move into a wall leaves the agent in place.

    ## Observation Space
    `Box(0, 255, (64, 64, 3), uint8)`: the first-person RGB frame.

    ## Starting State
    A random free tile center and heading of a maze generated from the reset seed. With
    `context_data`, instead a moment of a recorded episode: where the agent was at the last of
    `context_len` recorded frames (the imagined env's `context_data` starts, with true dynamics).

    ## Rewards
    +1 when the agent's center comes within 0.42 tiles of the target ball; 0 otherwise.

    ## Episode End
    Never terminates; truncates after `max_episode_steps` steps (default 1000, like Memory Maze).

    ## Info
    Every step: `agent_pos` (x, y in tiles), `agent_dir` (unit vector), `agent_pose` (exact integer
    pose: x, y in 1/12 tiles, heading index), `target_index`, `target_color`, `target_pos`,
    `targets_pos`. Reset also gives `maze_layout` ((size, size) uint8, 1 = wall).

    ## Arguments
    - `maze_size` (int, default 9): side of the tile grid including the border wall, odd >= 5.
    - `n_objects` (int, default 3): number of colored balls (2 to 6).
    - `max_episode_steps` (int, default 1000): truncation limit.
    - `fov_deg` (float, default 80): horizontal field of view.
    - `render_mode`: `"rgb_array"` (the first-person frame) or `"top_down"` (a map with agent,
      balls and target ringed); `render_top_down()` gives the map in either mode.
    - `context_data` (folder of recorded episodes, default None) and `context_len` (default 32):
      start every episode at a recorded moment drawn with the env's generator (see Starting State).
    """

    metadata = {"render_modes": ["rgb_array", "top_down"], "render_fps": 10}

    def __init__(
        self,
        maze_size: int = 9,
        n_objects: int = 3,
        max_episode_steps: int = 1000,
        fov_deg: float = FOV_DEG,
        render_mode: str | None = None,
        context_data: str | Path | None = None,
        context_len: int = 32,
    ):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']}, got {render_mode!r}")
        check_max_episode_steps(max_episode_steps)
        self.sim = MazeBatch(1, maze_size, n_objects, fov_deg)
        self.moments = None if context_data is None else RecordedMoments(context_data, context_len)
        self.max_episode_steps = max_episode_steps
        self.render_mode = render_mode
        self.observation_space = OBSERVATION_SPACE
        self.action_space = ACTION_SPACE
        self._elapsed = 0
        self._obs: np.ndarray | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if self.moments is None:
            self.sim.reset_env(0, self.np_random)
        else:
            self.moments.place(self.sim, 0, self.np_random)
        self._elapsed = 0
        self._obs = self.sim.render()[0]
        info = self._info()
        info["maze_layout"] = self.sim.walls[0].astype(np.uint8)
        return self._obs, info

    def step(self, action):
        if self._obs is None:
            raise RuntimeError("call reset() before step()")
        reward = float(self.sim.step(check_single_action(action))[0])
        self._elapsed += 1
        self._obs = self.sim.render()[0]
        truncated = self._elapsed >= self.max_episode_steps
        return self._obs, reward, False, truncated, self._info()

    def _info(self) -> dict:
        return {k: v[0] for k, v in self.sim.info().items()}

    def render(self):
        if self.render_mode == "top_down":
            return self.render_top_down()
        if self.render_mode == "rgb_array":
            return None if self._obs is None else self._obs.copy()
        return None

    def render_top_down(self, scale: int = 16, trail=None) -> np.ndarray:
        """Top-down map of the current maze (for humans and plots)."""
        return self.sim.render_top_down(0, scale, trail)


class MazeRealVectorEnv(VectorEnv):
    """N ground-truth mazes stepped in one numpy call (`gym.make_vec("SSMWorld-MazeReal-v0", N)`).

    Sub-env i reset with seed s behaves exactly like `MazeRealEnv` reset with seed s + i.
    Takes the same arguments as `MazeRealEnv` plus `num_envs` and `autoreset_mode`
    (`AutoresetMode.NEXT_STEP`, Gymnasium's default, or `SAME_STEP`, which puts the last
    observation of a finished episode in `info["final_obs"]`). `reset(options={"reset_mask": m})`
    resets only the sub-envs where the boolean mask is True. With `context_data`, every (re)start,
    autoresets included, is a recorded moment drawn with that sub-env's own generator.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10, "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int = 1,
        maze_size: int = 9,
        n_objects: int = 3,
        max_episode_steps: int = 1000,
        fov_deg: float = FOV_DEG,
        render_mode: str | None = None,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        context_data: str | Path | None = None,
        context_len: int = 32,
    ):
        setup_vector_env(self, num_envs, render_mode, autoreset_mode, max_episode_steps)
        self.sim = MazeBatch(num_envs, maze_size, n_objects, fov_deg)
        self.moments = None if context_data is None else RecordedMoments(context_data, context_len)
        self._start_rngs = [seeding.np_random(None)[0] for _ in range(num_envs)]  # draw the moments
        self.max_episode_steps = max_episode_steps
        self._elapsed = np.zeros(num_envs, dtype=np.int64)
        self._needs_reset = np.ones(num_envs, dtype=bool)
        self._obs: np.ndarray | None = None

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None):
        if isinstance(seed, (int, np.integer)):
            seeds: list = [int(seed) + i for i in range(self.num_envs)]
        elif seed is None:
            seeds = [None] * self.num_envs
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"expected {self.num_envs} seeds, got {len(seeds)}")
        mask = np.ones(self.num_envs, dtype=bool)
        if options and "reset_mask" in options:
            mask = np.asarray(options["reset_mask"], dtype=bool)
            if mask.shape != (self.num_envs,):
                raise ValueError(f"reset_mask must have shape ({self.num_envs},), got {mask.shape}")
        if seed is not None or self._np_random is None:
            self._np_random, self._np_random_seed = seeding.np_random(seeds[0])
        for i in np.flatnonzero(mask):
            rng = seeding.np_random(seeds[i])[0] if (seeds[i] is not None or self._obs is None) else None
            self._new_episode(i, rng)
        self._elapsed[mask] = 0
        self._needs_reset[mask] = False
        self._obs = self.sim.render()
        return self._obs.copy(), self._info(mask)

    def step(self, actions):
        if self._obs is None:
            raise RuntimeError("call reset() before step()")
        actions = check_actions(actions, self.num_envs)
        mode = self.metadata["autoreset_mode"]
        reset_now = self._needs_reset.copy() if mode == AutoresetMode.NEXT_STEP else np.zeros(self.num_envs, bool)
        # Sub-envs being autoreset (NEXT_STEP) ignore their action and start a new maze.
        rewards = self.sim.step(actions, active=~reset_now)
        self._elapsed += 1
        for i in np.flatnonzero(reset_now):
            self._new_episode(i)
        self._elapsed[reset_now] = 0
        truncations = (self._elapsed >= self.max_episode_steps) & ~reset_now
        terminations = np.zeros(self.num_envs, dtype=bool)
        obs = self.sim.render()
        info = self._info(reset_now)
        if mode == AutoresetMode.SAME_STEP and truncations.any():
            done = truncations
            info["final_obs"] = np.where(done[:, None, None, None], obs, 0).astype(np.uint8)
            info["final_info"] = self._info(np.zeros(self.num_envs, bool))
            info["_final_obs"] = info["_final_info"] = done.copy()
            for i in np.flatnonzero(done):
                self._new_episode(i)
            self._elapsed[done] = 0
            obs = self.sim.render()
            fresh = self._info(done)
            info.update({k: v for k, v in fresh.items() if not k.startswith("final")})
        else:
            self._needs_reset = truncations | terminations
        self._obs = obs
        return obs.copy(), rewards, terminations, truncations, info

    def _new_episode(self, i: int, rng: np.random.Generator | None = None) -> None:
        """Start sub-env i: a new maze, or a recorded moment with `context_data`; `rng` (a seeded
        reset) replaces the sub-env's generator, otherwise it continues."""
        if self.moments is None:
            self.sim.reset_env(i, rng)
            return
        if rng is not None:
            self._start_rngs[i] = rng
        self.moments.place(self.sim, i, self._start_rngs[i])

    def _info(self, reset_mask: np.ndarray) -> dict:
        info = self.sim.info()
        info.update({f"_{k}": np.ones(self.num_envs, dtype=bool) for k in list(info)})
        if reset_mask.any():
            info["maze_layout"] = self.sim.walls.astype(np.uint8) * reset_mask[:, None, None]
            info["_maze_layout"] = reset_mask.copy()
        return info

    def render(self):
        return None if self._obs is None or self.render_mode is None else self._obs.copy()
