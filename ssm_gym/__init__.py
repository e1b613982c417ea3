"""ssm-gym: a long-memory video world model served as Gymnasium environments.

Importing the package registers the environment ids with Gymnasium:

- ``SSMWorld-MazeReal-v0``: the ground-truth maze (fast numpy simulator), single and vector.
- ``SSMWorld-Maze-v0``: the learned world model (shipped checkpoint, CPU by default), single and
  vector (one batched model call per step for all envs).
"""

import gymnasium as gym

__version__ = "0.1.0"


ENVS = {  # id: (entry_point, vector_entry_point)
    "SSMWorld-MazeReal-v0": ("ssm_gym.envs.maze_real:MazeRealEnv", "ssm_gym.envs.maze_real:MazeRealVectorEnv"),
    "SSMWorld-Maze-v0": ("ssm_gym.envs.world_model_env:WorldModelEnv", "ssm_gym.envs.world_model_env:WorldModelVectorEnv"),
}


def _register() -> None:
    for env_id, (entry, vector_entry) in ENVS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry, vector_entry_point=vector_entry)


_register()
