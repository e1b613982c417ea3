"""ssm-gym: a long-memory video world model served as Gymnasium environments.

Importing the package registers the environment ids with Gymnasium:

- ``SSMWorld-MazeReal-v0``: the ground-truth maze (fast numpy simulator), single and vector.
"""

import gymnasium as gym

__version__ = "0.1.0"


def _register() -> None:
    if "SSMWorld-MazeReal-v0" not in gym.registry:
        gym.register(
            id="SSMWorld-MazeReal-v0",
            entry_point="ssm_gym.envs.maze_real:MazeRealEnv",
            vector_entry_point="ssm_gym.envs.maze_real:MazeRealVectorEnv",
        )


_register()
