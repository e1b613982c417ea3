"""Gymnasium environments: the ground-truth maze and (later) the learned world model."""
from ssm_gym.envs.maze_real import MazeRealEnv, MazeRealVectorEnv

__all__ = ["MazeRealEnv", "MazeRealVectorEnv"]
