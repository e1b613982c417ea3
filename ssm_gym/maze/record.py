"""Record episodes of scripted policies in the ground-truth maze, many mazes at once."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ssm_gym.maze.dataset import ClipDataset, DatasetError
from ssm_gym.maze.layout import TILE
from ssm_gym.maze.policies import make_policy
from ssm_gym.maze.sim import N_ACTIONS, MazeBatch

# act(observations (M, 64, 64, 3) uint8, episode_starts (M,) bool) -> actions (M,): a learned agent
# that sees only frames (e.g. `agents.evaluate.sb3_act_fn`), called once per step for all its envs.
FrameAgent = Callable[[np.ndarray, np.ndarray], np.ndarray]


def is_agent_policy(name: str) -> bool:
    """Policy names "agent" or "agent:<id>" mean: actions come from a learned `FrameAgent`."""
    return name == "agent" or name.startswith("agent:")


def record_episodes(
    seeds: list[int],
    policies: list[str],
    steps: int,
    maze_size: int = 9,
    n_objects: int = 3,
    policy_seed: int = 0,
    agent: Optional[FrameAgent] = None,
    agent_epsilon: float = 0.0,
    agent_burst: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Run one episode of `steps` actions per (maze seed, policy name), batched in one MazeBatch.

    Maze i is exactly the maze of `gym.make("SSMWorld-MazeReal-v0").reset(seed=seeds[i])`; the
    policy's own randomness comes from `(policy_seed, seeds[i])`. Envs whose policy is an agent
    name (`is_agent_policy`) act by `agent` on their current frames, all in one call per step, with
    a uniformly random action instead at probability `agent_epsilon`: data from the states a
    learned agent visits (Dyna-style: a world model then learns what that agent does).
    `agent_burst` > 0: the explore policy drives those envs, and the agent takes over for
    `agent_burst` steps after every stretch of `agent_burst` to `3 * agent_burst` explore steps
    (told an episode starts there): the agent from the kind of states an imagined episode starts
    at, when it was trained on short episodes after real context. Returns episode dicts in the
    layout of `ssm_gym.maze.dataset`.
    """
    n = len(seeds)
    if len(policies) != n:
        raise ValueError(f"got {n} seeds but {len(policies)} policies")
    by_agent = np.array([is_agent_policy(p) for p in policies], dtype=bool)
    if by_agent.any() and agent is None:
        raise ValueError("policies name a learned agent ('agent'), but no agent was given")
    if not 0.0 <= agent_epsilon <= 1.0:
        raise ValueError(f"agent_epsilon must be in [0, 1], got {agent_epsilon}")
    if agent_burst < 0:
        raise ValueError(f"agent_burst must be >= 0, got {agent_burst}")
    sim = MazeBatch(n, maze_size, n_objects)
    scripted = {i: make_policy("explore" if by_agent[i] else p) for i, p in enumerate(policies)
                if not by_agent[i] or agent_burst}
    rngs = [np.random.default_rng([policy_seed, s]) for s in seeds]
    for i, s in enumerate(seeds):
        sim.reset_env(i, np.random.default_rng(s))
        if i in scripted:
            scripted[i].reset(sim, i, rngs[i])
    agent_envs = np.flatnonzero(by_agent)
    # Steps left of the agent's turn (> 0) or of the explore stretch before it (< 0), per agent env.
    turn = np.array([-int(rngs[i].integers(agent_burst, 3 * agent_burst + 1)) for i in agent_envs]
                    if agent_burst else np.ones(len(agent_envs), dtype=np.int64) * (steps + 1))
    images = np.empty((steps + 1, n, 64, 64, 3), dtype=np.uint8)
    actions = np.zeros((steps + 1, n), dtype=np.int64)
    rewards = np.zeros((steps + 1, n), dtype=np.float32)
    infos = [sim.info()]
    images[0] = sim.render()
    for t in range(1, steps + 1):
        for i, policy in scripted.items():
            actions[t, i] = policy.act(sim, i)  # agent envs in an explore stretch keep this action
        if len(agent_envs):
            starts = (turn == agent_burst) if agent_burst else np.full(len(agent_envs), t == 1)
            # Called for all agent envs every step, so a recurrent agent sees a fixed batch.
            chosen = np.asarray(agent(images[t - 1, agent_envs], starts)).reshape(-1)
            if chosen.shape != agent_envs.shape or chosen.min() < 0 or chosen.max() >= N_ACTIONS:
                raise ValueError(f"the agent must return {len(agent_envs)} actions in [0, {N_ACTIONS}), got {chosen!r}")
            t_was_agent = turn > 0
            for j, i in enumerate(agent_envs):
                if turn[j] > 0:
                    actions[t, i] = rngs[i].integers(N_ACTIONS) if rngs[i].random() < agent_epsilon else chosen[j]
            if agent_burst:  # advance the turns: explore stretch -> agent's turn -> explore stretch ...
                for j, i in enumerate(agent_envs):
                    turn[j] -= np.sign(turn[j])
                    if turn[j] == 0 and t_was_agent[j]:
                        turn[j] = -int(rngs[i].integers(agent_burst, 3 * agent_burst + 1))
                    elif turn[j] == 0:
                        turn[j] = agent_burst
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


def place_at_recorded_moment(sim: MazeBatch, i: int, episode: dict[str, np.ndarray], t: int) -> None:
    """Put env i of `sim` exactly where a recorded episode was at frame t: the episode's maze
    (rebuilt from its seed, as `record_episodes` made it), the agent's pose, the current target,
    and the maze's generator advanced past the touches before t, so that the recorded actions
    from t replay the recording exactly (next targets included). From there the ground-truth maze
    can also be stepped with other actions (the truth to judge a world model's imagined branches
    against). Refuses an episode whose maze and objects its seed does not rebuild (other maze
    settings, or data not recorded by this package)."""
    if not 0 <= t < len(episode["agent_pose"]):
        raise ValueError(f"t must be in [0, {len(episode['agent_pose'])}), got {t}")
    sim.reset_env(i, np.random.default_rng(int(episode["seed"])))
    objects = episode["targets_pos"][t]
    if (sim.walls[i].shape != episode["maze_layout"].shape or not (sim.walls[i] == episode["maze_layout"].astype(bool)).all()
            or objects.shape != sim.object_pos[i].shape or not np.allclose(objects, sim.object_pos[i] / TILE)):
        raise ValueError(f"the maze of seed {int(episode['seed'])} (maze_size {sim.maze_size}, n_objects "
                         f"{sim.n_objects}) is not this episode's (maze_layout, targets_pos): recorded with other settings?")
    for _ in range(int((episode["reward"][1:t + 1] > 0).sum())):  # each touch drew the next target
        sim.rngs[i].integers(sim.n_objects - 1)
    sim.pose[i] = episode["agent_pose"][t]
    sim.target[i] = episode["target_index"][t]


class RecordedMoments:
    """Moments of recorded episodes (a `training.collect` folder) to start the ground-truth maze
    from: the last of `context_len` recorded frames (the imagined env's first observation after
    that history), drawn by `ClipDataset.draw` (uniform over every clip of that length), the same
    draw as the imagined env's `context_data` starts, which build on this class. The real maze
    started this way is the control for short imagined episodes from real data: same starts, same
    horizon, true dynamics. Reads only the small arrays of each episode (seed, layout, poses,
    targets, rewards); `clips` reads frames only when asked for a clip."""

    KEYS = ("seed", "maze_layout", "agent_pose", "target_index", "targets_pos", "reward")

    def __init__(self, directory: str | Path, context_len: int = 32, cache_episodes: int = 64):
        if context_len < 1:
            raise ValueError(f"context_len must be >= 1, got {context_len}")
        try:
            self.clips = ClipDataset(directory, context_len, cache_size=cache_episodes)
        except DatasetError:
            raise
        except ValueError:  # longer than every episode
            raise ValueError(f"context_len {context_len} is longer than every episode in {directory}") from None
        self.context_len = context_len
        self._facts: dict[int, dict[str, np.ndarray]] = {}

    def facts(self, e: int) -> dict[str, np.ndarray]:
        """The small arrays of episode e (its maze and where the agent and target were)."""
        if e not in self._facts:
            path = self.clips.episodes[e][0]
            with np.load(path, allow_pickle=False) as npz:
                missing = [k for k in self.KEYS if k not in npz.files]
                if missing:
                    raise DatasetError(f"{path}: no {', '.join(map(repr, missing))} array; the real maze can start "
                                       "only from episodes recorded by this package (python -m training.collect)")
                self._facts[e] = {k: npz[k] for k in self.KEYS}
        return self._facts[e]

    def place_at(self, sim: MazeBatch, i: int, e: int, t0: int) -> None:
        """Put env i of `sim` at the last frame of the clip of episode e that starts at frame t0."""
        place_at_recorded_moment(sim, i, self.facts(e), t0 + self.context_len - 1)

    def place(self, sim: MazeBatch, i: int, rng: np.random.Generator) -> None:
        """Draw a moment with `rng` and put env i of `sim` there."""
        self.place_at(sim, i, *self.clips.draw(rng))
