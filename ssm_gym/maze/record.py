"""Record episodes of scripted policies in the ground-truth maze, many mazes at once."""

from __future__ import annotations

import numpy as np

from ssm_gym.maze.policies import make_policy
from ssm_gym.maze.sim import N_ACTIONS, MazeBatch


def record_episodes(
    seeds: list[int],
    policies: list[str],
    steps: int,
    maze_size: int = 9,
    n_objects: int = 3,
    policy_seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Run one episode of `steps` actions per (maze seed, policy name), batched in one MazeBatch.

    Maze i is exactly the maze of `gym.make("SSMWorld-MazeReal-v0").reset(seed=seeds[i])`; the
    policy's own randomness comes from `(policy_seed, seeds[i])`. Returns episode dicts in the
    layout of `ssm_gym.maze.dataset`.
    """
    n = len(seeds)
    if len(policies) != n:
        raise ValueError(f"got {n} seeds but {len(policies)} policies")
    sim = MazeBatch(n, maze_size, n_objects)
    agents = [make_policy(p) for p in policies]
    for i, s in enumerate(seeds):
        sim.reset_env(i, np.random.default_rng(s))
        agents[i].reset(sim, i, np.random.default_rng([policy_seed, s]))
    images = np.empty((steps + 1, n, 64, 64, 3), dtype=np.uint8)
    actions = np.zeros((steps + 1, n), dtype=np.int64)
    rewards = np.zeros((steps + 1, n), dtype=np.float32)
    infos = [sim.info()]
    images[0] = sim.render()
    for t in range(1, steps + 1):
        actions[t] = [agent.act(sim, i) for i, agent in enumerate(agents)]
        rewards[t] = sim.step(actions[t])
        images[t] = sim.render()
        infos.append(sim.info())
    episodes = []
    for i in range(n):
        one_hot = np.zeros((steps + 1, N_ACTIONS), dtype=np.float32)
        one_hot[np.arange(1, steps + 1), actions[1:, i]] = 1.0
        ep = {
            "image": images[:, i].copy(),
            "action": one_hot,
            "reward": rewards[:, i].copy(),
            "terminal": np.zeros(steps + 1, dtype=bool),
            "reset": np.arange(steps + 1) == 0,
            "maze_layout": sim.walls[i].astype(np.uint8),
            "seed": np.array(seeds[i], dtype=np.int64),
            "policy": np.array(policies[i]),
        }
        for key in infos[0]:
            ep[key] = np.stack([info[key][i] for info in infos])
        ep["agent_pose"] = ep["agent_pose"].astype(np.int32)
        ep["target_index"] = ep["target_index"].astype(np.int32)
        episodes.append(ep)
    return episodes
