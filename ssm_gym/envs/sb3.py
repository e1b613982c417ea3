"""stable-baselines3 adapter: an SB3 `VecEnv` over one of our batched Gymnasium vector envs.

SB3 cannot take a Gymnasium `VectorEnv` directly: it wants `step_async`/`step_wait`, one `done`
flag, a list of info dicts and the last observation of a finished episode in
`info["terminal_observation"]`. This adapter runs the wrapped env in `SAME_STEP` autoreset mode
(finished episodes restart inside the same step, as SB3 expects) and translates.

    venv = SB3VecEnv(gym.make_vec("SSMWorld-Maze-v0", num_envs=16, autoreset_mode="SameStep"))
    PPO("CnnPolicy", venv).learn(10_000)
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnv


class SB3VecEnv(VecEnv):
    def __init__(self, venv: VectorEnv):
        mode = venv.metadata.get("autoreset_mode")
        if mode != AutoresetMode.SAME_STEP:
            raise ValueError(f"SB3VecEnv needs a vector env with autoreset_mode=SAME_STEP, got {mode}; "
                             "create it with gym.make_vec(..., autoreset_mode='SameStep')")
        self.venv = venv
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)
        self._actions: Optional[np.ndarray] = None
        self._seed: Optional[int] = None

    def reset(self) -> np.ndarray:
        obs, _ = self.venv.reset(seed=self._seed)
        self._seed = None
        return obs

    def seed(self, seed: Optional[int] = None) -> Sequence[None | int]:
        self._seed = seed
        return [None if seed is None else seed + i for i in range(self.num_envs)]

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions).reshape(self.num_envs)

    def step_wait(self):
        obs, rewards, terminated, truncated, info = self.venv.step(self._actions)
        dones = terminated | truncated
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        # per-env numbers of the imagined env: its ground truth for this step (NaN where unknown), and
        # an ensemble's disagreement
        for key in ("reward_real", "disagreement"):
            if key in info:
                for i in range(self.num_envs):
                    infos[i][key] = float(info[key][i])
        for i in np.flatnonzero(dones):
            infos[i]["terminal_observation"] = info["final_obs"][i]
            infos[i]["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
        return obs, rewards.astype(np.float32), dones, infos

    def close(self) -> None:
        self.venv.close()

    def get_images(self) -> Sequence[Optional[np.ndarray]]:
        frames = self.venv.render()
        return [None] * self.num_envs if frames is None else list(frames)

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        return [getattr(self.venv, attr_name)] * len(self._get_indices(indices))

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *args, indices=None, **kwargs) -> list[Any]:
        result = getattr(self.venv, method_name)(*args, **kwargs)
        return [result] * len(self._get_indices(indices))

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [False] * len(self._get_indices(indices))
