"""Scripted policies in the ground-truth maze, and the revisit routes used to measure recall.

- `ExplorePolicy`: walks to the least-visited nearby tile, with action noise, so data covers
  the maze and revisits happen naturally.
- `OraclePolicy`: shortest tile path to the current target ball.
- `RandomPolicy`: uniform random actions.
- `StumblePolicy`: explores, but now and then walks straight on whatever is ahead, so the data
  shows walls stopping forward moves all over the maze.
- `revisit_route`: explore for L steps, then return to earlier poses exactly (shortest path in
  the pose graph) and retrace earlier stretches, so that later frames equal earlier ones.

Policies see the simulator state (privileged information); they act one env at a time, which is
cheap next to rendering.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from ssm_gym.maze.layout import N_HEADINGS, TILE, Maze, tile_center
from ssm_gym.maze.sim import N_ACTIONS, MazeBatch, apply_actions

_NEIGHBORS = ((0, 1), (1, 0), (0, -1), (-1, 0))
_MOVE_ACTIONS = np.array([1, 2, 3, 4, 5])  # noop never helps navigation
_FORWARD_ACTIONS = np.array([1, 1, 4, 5])  # a stumble goes straight on half the time


def tile_distances(walls: np.ndarray, goal_rc: tuple[int, int]) -> np.ndarray:
    """BFS distance (in tiles) from every free tile to `goal_rc`; -1 for walls and unreachable."""
    dist = np.full(walls.shape, -1, dtype=np.int64)
    dist[goal_rc] = 0
    queue = deque([goal_rc])
    while queue:
        r, c = queue.popleft()
        for dr, dc in _NEIGHBORS:
            nr, nc = r + dr, c + dc
            if not walls[nr, nc] and dist[nr, nc] < 0:
                dist[nr, nc] = dist[r, c] + 1
                queue.append((nr, nc))
    return dist


def pose_tile(pose) -> tuple[int, int]:
    return int(pose[1]) // TILE, int(pose[0]) // TILE


def navigate(walls: np.ndarray, pose: np.ndarray, dist: np.ndarray) -> int:
    """One greedy step toward the goal of distance map `dist`: head for the center of the next
    tile on the shortest path (or of the goal tile), choosing the action whose result is closest
    to it with the least heading error (one-step lookahead through the real dynamics)."""
    r, c = pose_tile(pose)
    nxt = (r, c)
    if dist[r, c] > 0:
        for dr, dc in _NEIGHBORS:
            if dist[r + dr, c + dc] == dist[r, c] - 1:
                nxt = (r + dr, c + dc)
                break
    waypoint = tile_center(np.array(nxt))
    cand = apply_actions(np.broadcast_to(walls, (len(_MOVE_ACTIONS),) + walls.shape),
                         np.repeat(pose[None], len(_MOVE_ACTIONS), 0), _MOVE_ACTIONS)
    delta = waypoint - cand[:, :2]
    d = np.hypot(delta[:, 0], delta[:, 1])
    bearing = np.arctan2(delta[:, 1], delta[:, 0])
    err = np.abs((bearing - 2 * np.pi * cand[:, 2] / N_HEADINGS + np.pi) % (2 * np.pi) - np.pi)
    err = np.where(d < 1e-6, 0.0, err) / (2 * np.pi / N_HEADINGS)  # in turn steps
    return int(_MOVE_ACTIONS[np.argmin(d + 3.0 * err)])


class MazePolicy:
    """A scripted policy for env i of a `MazeBatch`. `reset` at each new maze, then `act`."""

    name = "policy"

    def reset(self, sim: MazeBatch, i: int, rng: np.random.Generator) -> None:
        self.rng = rng

    def act(self, sim: MazeBatch, i: int) -> int:
        raise NotImplementedError


class RandomPolicy(MazePolicy):
    name = "random"

    def act(self, sim, i):
        return int(self.rng.integers(N_ACTIONS))


class _Navigating(MazePolicy):
    """Shared machinery: epsilon noise, goal distance maps, escaping when stuck."""

    def __init__(self, epsilon: float = 0.1):
        self.epsilon = epsilon

    def reset(self, sim, i, rng):
        super().reset(sim, i, rng)
        self.goal: tuple[int, int] | None = None
        self.dist: np.ndarray | None = None
        self.last_xy = None
        self.stuck = 0

    def set_goal(self, walls: np.ndarray, goal: tuple[int, int]) -> None:
        if goal != self.goal:
            self.goal, self.dist = goal, tile_distances(walls, goal)

    def step_toward_goal(self, sim, i) -> int:
        pose = sim.pose[i]
        xy = tuple(pose[:2])
        self.stuck = self.stuck + 1 if xy == self.last_xy else 0
        self.last_xy = xy
        if self.rng.random() < self.epsilon or self.stuck > 6:
            return int(self.rng.integers(1, N_ACTIONS))
        return navigate(sim.walls[i], pose, self.dist)


class ExplorePolicy(_Navigating):
    """Go to the nearest least-visited tile; repeat. Covers the maze and revisits it."""

    name = "explore"

    def reset(self, sim, i, rng):
        super().reset(sim, i, rng)
        self.visits = np.where(sim.walls[i], np.iinfo(np.int64).max // 2, 0).astype(np.int64)

    def act(self, sim, i):
        walls, here = sim.walls[i], pose_tile(sim.pose[i])
        self.visits[here] += 1
        if self.goal is None or here == self.goal:
            from_here = tile_distances(walls, here)
            reachable = from_here >= 0
            score = np.where(reachable, self.visits * 1000 + from_here, np.iinfo(np.int64).max)
            score[here] = np.iinfo(np.int64).max  # somewhere else
            best = np.argwhere(score == score.min())
            self.set_goal(walls, tuple(best[int(self.rng.integers(len(best)))]))
        return self.step_toward_goal(sim, i)


class OraclePolicy(_Navigating):
    """Shortest tile path to the current target ball."""

    name = "oracle"

    def __init__(self, epsilon: float = 0.0):
        super().__init__(epsilon)

    def act(self, sim, i):
        self.set_goal(sim.walls[i], pose_tile(sim.object_pos[i, sim.target[i]]))
        return self.step_toward_goal(sim, i)


class StumblePolicy(ExplorePolicy):
    """Explore, but now and then keep moving forward (straight, or veering left or right) for a
    few steps whether or not a wall is in the way, as an untrained agent does.

    Why: a world model learns that walls stop the agent only from data where they do. The explore
    policy's forward moves are blocked about 2% of the time and the oracle's 0.4%; the random
    policy's 80%, but it hardly leaves its start. A model trained on those kept an imagined agent
    walking on into a wall (see the lab notebook, session 21), which teaches agents in
    imagination that walking forward always gets somewhere.
    """

    name = "stumble"

    def __init__(self, epsilon: float = 0.1, burst_prob: float = 0.06, burst_len: tuple[int, int] = (2, 10)):
        super().__init__(epsilon)
        if not 0.0 <= burst_prob <= 1.0 or not 1 <= burst_len[0] <= burst_len[1]:
            raise ValueError(f"need 0 <= burst_prob <= 1 and 1 <= min <= max burst length, got {burst_prob}, {burst_len}")
        self.burst_prob, self.burst_len = burst_prob, burst_len

    def reset(self, sim, i, rng):
        super().reset(sim, i, rng)
        self.burst_left, self.burst_action = 0, 1

    def act(self, sim, i):
        if self.burst_left == 0 and self.rng.random() < self.burst_prob:
            self.burst_left = int(self.rng.integers(self.burst_len[0], self.burst_len[1] + 1))
            self.burst_action = int(self.rng.choice(_FORWARD_ACTIONS))
        if self.burst_left > 0:
            self.burst_left -= 1
            return self.burst_action
        return super().act(sim, i)


POLICIES = {"explore": ExplorePolicy, "oracle": OraclePolicy, "random": RandomPolicy, "stumble": StumblePolicy}


def make_policy(name: str) -> MazePolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from {sorted(POLICIES)}")
    return POLICIES[name]()


# ---------------------------------------------------------------------------------------------
# Exact returns: shortest action sequences in the pose graph, and revisit routes.


def _pose_key(pose: np.ndarray, size: int) -> np.ndarray:
    side = size * TILE
    return (pose[..., 1] * side + pose[..., 0]) * N_HEADINGS + pose[..., 2]


def shortest_actions(walls: np.ndarray, start: np.ndarray, goal: np.ndarray, max_steps: int = 10_000) -> np.ndarray:
    """Shortest action sequence taking pose `start` exactly to pose `goal` (BFS over the pose
    lattice, all frontier poses expanded in one vectorised call). Raises if unreachable."""
    size = walls.shape[0]
    n_keys = (size * TILE) ** 2 * N_HEADINGS
    parent = np.full(n_keys, -1, dtype=np.int64)
    parent_action = np.zeros(n_keys, dtype=np.int64)
    start_key, goal_key = int(_pose_key(start, size)), int(_pose_key(goal, size))
    parent[start_key] = start_key
    frontier = np.asarray(start, dtype=np.int64)[None]
    for _ in range(max_steps):
        if parent[goal_key] >= 0 or len(frontier) == 0:
            break
        k = len(_MOVE_ACTIONS)
        src = np.repeat(frontier, k, 0)
        acts = np.tile(_MOVE_ACTIONS, len(frontier))
        nxt = apply_actions(np.broadcast_to(walls, (len(src),) + walls.shape), src, acts)
        keys = _pose_key(nxt, size)
        keys, first = np.unique(keys, return_index=True)
        new = parent[keys] < 0
        keys, first = keys[new], first[new]
        parent[keys] = _pose_key(src[first], size)
        parent_action[keys] = acts[first]
        frontier = nxt[first]
    if parent[goal_key] < 0:
        raise ValueError(f"pose {goal.tolist()} is not reachable from {start.tolist()}")
    actions, key = [], goal_key
    while key != start_key:
        actions.append(parent_action[key])
        key = parent[key]
    return np.array(actions[::-1], dtype=np.int64)


def rollout_poses(walls: np.ndarray, start: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """Poses (T+1, 3) visited by taking `actions` from `start` (dynamics only, no rendering)."""
    poses = [np.asarray(start, dtype=np.int64)]
    for a in actions:
        poses.append(apply_actions(walls[None], poses[-1][None], np.array([a]))[0])
    return np.stack(poses)


def revisit_gaps(poses: np.ndarray) -> np.ndarray:
    """For each step t, how many steps ago the same pose was last seen (-1 if never)."""
    last: dict[tuple, int] = {}
    gaps = np.full(len(poses), -1, dtype=np.int64)
    for t, p in enumerate(map(tuple, np.asarray(poses).tolist())):
        if p in last:
            gaps[t] = t - last[p]
        last[p] = t
    return gaps


@dataclass
class RevisitRoute:
    """A route through one maze: actions from the maze's start pose, and what they revisit."""

    actions: np.ndarray  # (T,) int64
    poses: np.ndarray  # (T+1, 3) int64, poses[0] = start pose
    phase: np.ndarray  # (T+1,) 0 = exploration (context), 1 = returning, 2 = retracing
    retrace_of: np.ndarray  # (T+1,) for retracing steps, the earlier step with the same pose; -1 else
    context_len: int  # number of frames of the exploration phase (poses[:context_len])


def revisit_route(
    maze: Maze,
    rng: np.random.Generator,
    explore_steps: int = 400,
    n_revisits: int = 4,
    retrace_len: int = 50,
) -> RevisitRoute:
    """Explore for `explore_steps` steps, then `n_revisits` times: go back to an earlier pose of
    the exploration by the shortest exact route and replay the actions taken from it for
    `retrace_len` steps, so that each retraced frame equals a frame seen during exploration.
    Earlier poses are drawn uniformly from the exploration, so the gaps spread from short to
    about the whole route length."""
    if retrace_len >= explore_steps:
        raise ValueError(f"retrace_len ({retrace_len}) must be shorter than explore_steps ({explore_steps})")
    sim = MazeBatch(1, maze.size, len(maze.object_pos))
    sim.set_maze(0, maze)
    explorer = ExplorePolicy(epsilon=0.1)
    explorer.reset(sim, 0, rng)
    actions = []
    for _ in range(explore_steps):
        a = explorer.act(sim, 0)
        sim.pose = apply_actions(sim.walls, sim.pose, np.array([a]))
        actions.append(a)
    poses = rollout_poses(maze.walls, maze.start_pose, np.array(actions))
    phase = [0] * (explore_steps + 1)
    retrace_of = [-1] * (explore_steps + 1)
    for _ in range(n_revisits):
        t0 = int(rng.integers(0, explore_steps - retrace_len + 1))
        back = shortest_actions(maze.walls, poses[-1], poses[t0])
        replay = np.array(actions[t0 : t0 + retrace_len])
        seg = rollout_poses(maze.walls, poses[-1], np.concatenate([back, replay]))[1:]
        phase += [1] * len(back) + [2] * len(replay)
        retrace_of += [-1] * len(back) + list(range(t0 + 1, t0 + 1 + len(replay)))
        actions += back.tolist() + replay.tolist()
        poses = np.concatenate([poses, seg])
    return RevisitRoute(np.array(actions, dtype=np.int64), poses, np.array(phase), np.array(retrace_of), explore_steps + 1)
