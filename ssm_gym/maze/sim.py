"""Batched ground-truth maze: the state of N mazes in numpy arrays, stepped in one call.

`MazeBatch` is the single source of truth for the maze's dynamics; the single Gymnasium env is a
batch of one and the vector env a batch of N, so the two cannot drift apart. Each environment
owns its own `numpy.random.Generator`, so environment i of a vector env seeded with s behaves
exactly like a single env seeded with s + i.

Actions (Memory Maze's set): 0 noop, 1 forward, 2 turn left, 3 turn right, 4 forward + left,
5 forward + right. A forward move that would overlap a wall is cancelled (the agent stays).
"""

from __future__ import annotations

import numpy as np

from ssm_gym.maze.layout import (
    AGENT_HALF,
    N_HEADINGS,
    STEP,
    TILE,
    TOUCH_RADIUS,
    Maze,
    generate_maze,
    validate_maze_args,
)
from ssm_gym.maze.render import FOV_DEG, IMAGE_SIZE, render_first_person, render_top_down

N_ACTIONS = 6
ACTION_NAMES = ("noop", "forward", "left", "right", "forward_left", "forward_right")
_FORWARD = np.array([0, 1, 0, 0, 1, 1], dtype=np.int64)
FORWARD_ACTIONS = tuple(int(a) for a in np.flatnonzero(_FORWARD))  # forward, forward_left, forward_right
_TURN = np.array([0, 0, -1, 1, -1, 1], dtype=np.int64)  # +1 = clockwise on the map = to the right
# Each action with its move taken out (what a wall leaves of it): forward -> noop, forward_left -> left, ...
TURN_ONLY = np.array([0, 0, 2, 3, 2, 3], dtype=np.int64)
# Forward displacement per heading, in lattice units. round() is odd-symmetric, so heading h+8
# moves exactly back: a path can be retraced exactly.
MOVES = np.stack(
    [np.round(STEP * np.cos(2 * np.pi * np.arange(N_HEADINGS) / N_HEADINGS)),
     np.round(STEP * np.sin(2 * np.pi * np.arange(N_HEADINGS) / N_HEADINGS))], -1
).astype(np.int64)


def check_actions(actions, n: int) -> np.ndarray:
    """Validate a batch of n discrete actions; return them as int64 (n,). Raises a clear error."""
    a = np.asarray(actions)
    if a.shape != (n,):
        raise ValueError(f"expected actions of shape ({n},), got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.integer) or (np.issubdtype(a.dtype, np.floating) and np.all(a == np.round(a)))):
        raise TypeError(f"actions must be integers in [0, {N_ACTIONS}), got dtype {a.dtype}")
    a = a.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() >= N_ACTIONS):
        bad = a[(a < 0) | (a >= N_ACTIONS)][0]
        raise ValueError(f"action {bad} out of range: actions are integers in [0, {N_ACTIONS})")
    return a


def collides(walls: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Does the agent square at lattice position xy (N, 2) overlap a wall? walls (N, S, S)."""
    env = np.arange(xy.shape[0])
    lo = (xy - AGENT_HALF) // TILE
    hi = (xy + AGENT_HALF - 1) // TILE
    return (
        walls[env, lo[:, 1], lo[:, 0]]
        | walls[env, lo[:, 1], hi[:, 0]]
        | walls[env, hi[:, 1], lo[:, 0]]
        | walls[env, hi[:, 1], hi[:, 0]]
    )


def apply_actions(walls: np.ndarray, pose: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """Deterministic pose transition for N agents: move (unless blocked), then turn."""
    xy = pose[:, :2] + MOVES[pose[:, 2]] * _FORWARD[actions][:, None]
    blocked = collides(walls, xy)
    xy = np.where(blocked[:, None], pose[:, :2], xy)
    heading = (pose[:, 2] + _TURN[actions]) % N_HEADINGS
    return np.concatenate([xy, heading[:, None]], axis=1)


def pose_to_continuous(pose: np.ndarray):
    """Lattice pose -> (position in tiles (..., 2) float32, unit heading vector (..., 2) float32)."""
    pose = np.asarray(pose)
    angle = 2 * np.pi * pose[..., 2] / N_HEADINGS
    pos = (pose[..., :2] / TILE).astype(np.float32)
    direction = np.stack([np.cos(angle), np.sin(angle)], -1).astype(np.float32)
    return pos, direction


class MazeBatch:
    """N ground-truth mazes stepped together. All state lives in numpy arrays indexed by env."""

    def __init__(self, num_envs: int, maze_size: int = 9, n_objects: int = 3, fov_deg: float = FOV_DEG):
        validate_maze_args(maze_size, n_objects)
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.num_envs, self.maze_size, self.n_objects, self.fov_deg = num_envs, maze_size, n_objects, fov_deg
        n, s, k = num_envs, maze_size, n_objects
        self.walls = np.ones((n, s, s), dtype=bool)
        self.wall_rgb = np.zeros((n, s, s, 3), dtype=np.float32)
        self.object_pos = np.zeros((n, k, 2), dtype=np.int64)
        self.object_rgb = np.zeros((n, k, 3), dtype=np.uint8)
        self.target = np.zeros(n, dtype=np.int64)
        self.pose = np.zeros((n, 3), dtype=np.int64)
        self.rngs = [np.random.default_rng(i) for i in range(n)]

    def reset_env(self, i: int, rng: np.random.Generator | None = None) -> Maze:
        """Start env i in a new maze drawn from its generator (replaced by `rng` if given)."""
        if rng is not None:
            self.rngs[i] = rng
        maze = generate_maze(self.rngs[i], self.maze_size, self.n_objects)
        self.set_maze(i, maze)
        return maze

    def set_maze(self, i: int, maze: Maze) -> None:
        """Put env i at the start of `maze` (its walls, objects, start pose and first target)."""
        self.walls[i], self.wall_rgb[i] = maze.walls, maze.wall_rgb
        self.object_pos[i], self.object_rgb[i] = maze.object_pos, maze.object_rgb
        self.pose[i], self.target[i] = maze.start_pose, maze.first_target

    def step(self, actions, active: np.ndarray | None = None) -> np.ndarray:
        """Advance all envs (or those where `active` is True) by one action each; returns
        rewards (N,) float32, 0 for inactive envs."""
        actions = check_actions(actions, self.num_envs)
        new_pose = apply_actions(self.walls, self.pose, actions)
        active = np.ones(self.num_envs, bool) if active is None else np.asarray(active, bool)
        self.pose = np.where(active[:, None], new_pose, self.pose)
        target_xy = self.object_pos[np.arange(self.num_envs), self.target]
        touched = active & (((self.pose[:, :2] - target_xy) ** 2).sum(-1) <= TOUCH_RADIUS**2)
        for i in np.flatnonzero(touched):  # rare: new target, a different object
            others = [k for k in range(self.n_objects) if k != self.target[i]]
            self.target[i] = others[int(self.rngs[i].integers(len(others)))]
        return touched.astype(np.float32)

    def render(self) -> np.ndarray:
        return render_first_person(
            self.walls, self.wall_rgb, self.object_pos, self.object_rgb, self.target, self.pose, self.fov_deg, IMAGE_SIZE
        )

    def render_top_down(self, i: int = 0, scale: int = 16, trail=None) -> np.ndarray:
        return render_top_down(
            self.walls[i], self.wall_rgb[i], self.object_pos[i], self.object_rgb[i], int(self.target[i]),
            self.pose[i], scale, trail,
        )

    def info(self, idx=None) -> dict:
        """Per-env facts for `info` dicts (arrays over the chosen envs)."""
        idx = np.arange(self.num_envs) if idx is None else np.asarray(idx)
        pos, direction = pose_to_continuous(self.pose[idx])
        tgt = self.target[idx]
        return {
            "agent_pos": pos,
            "agent_dir": direction,
            "agent_pose": self.pose[idx].copy(),
            "target_index": tgt.copy(),
            "target_color": self.object_rgb[idx, tgt].copy(),
            "target_pos": (self.object_pos[idx, tgt] / TILE).astype(np.float32),
            "targets_pos": (self.object_pos[idx] / TILE).astype(np.float32),
        }
