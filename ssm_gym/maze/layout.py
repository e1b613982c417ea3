"""Procedural maze generation: walls, colored wall regions, objects, start pose.

A maze is a square grid of `size` x `size` tiles (odd size, border included, like Memory Maze's
9x9). Tiles at odd (row, col) are rooms; a randomized depth-first search carves corridors between
them, then a few extra walls are knocked out so the maze has loops (revisits by other routes).
Every wall tile gets the color of its region (a Voronoi partition of the maze into a few regions)
with a small per-tile brightness jitter, so that places look different and can be recognised.

Everything is drawn from one `numpy.random.Generator`, so a seed fixes the whole maze.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Pose lattice: positions are integers in units of 1/TILE of a tile; headings are integers in
# [0, N_HEADINGS). Integer poses make revisits exact: the same pose renders the same frame.
TILE = 12
STEP = 4  # forward step length in lattice units (1/3 tile)
N_HEADINGS = 16  # 22.5 degrees per turn
AGENT_HALF = 3  # agent is a square of half-size 3 units (1/4 tile) for collisions
TOUCH_RADIUS = 5  # agent center within 5 units (0.42 tile) of an object center touches it

# Distinct, saturated object colors (Memory Maze uses the same kind of palette).
OBJECT_COLORS = np.array(
    [
        [230, 40, 40],  # red
        [40, 200, 60],  # green
        [50, 90, 240],  # blue
        [240, 220, 40],  # yellow
        [220, 60, 220],  # magenta
        [40, 220, 230],  # cyan
    ],
    dtype=np.uint8,
)
MAX_OBJECTS = len(OBJECT_COLORS)

# Muted wall colors, one per region, far from the object colors.
REGION_COLORS = np.array(
    [
        [150, 110, 80],  # brown
        [110, 130, 150],  # slate
        [150, 150, 110],  # olive
        [130, 100, 140],  # plum
        [100, 140, 110],  # sage
        [160, 130, 120],  # rose-grey
        [120, 120, 120],  # grey
        [90, 110, 160],  # dusk blue
    ],
    dtype=np.float32,
)


@dataclass
class Maze:
    """One generated maze. Arrays are numpy; positions in lattice units (see TILE)."""

    walls: np.ndarray  # (size, size) bool, True = wall, indexed [row=y, col=x]
    wall_rgb: np.ndarray  # (size, size, 3) float32 wall color per tile (0..255)
    object_pos: np.ndarray  # (K, 2) int64 object centers (x, y) in lattice units
    object_rgb: np.ndarray  # (K, 3) uint8 object colors
    start_pose: np.ndarray  # (3,) int64 (x, y, heading)
    first_target: int

    @property
    def size(self) -> int:
        return self.walls.shape[0]


def validate_maze_args(size: int, n_objects: int) -> None:
    if not isinstance(size, (int, np.integer)) or size < 5 or size % 2 == 0:
        raise ValueError(f"maze_size must be an odd integer >= 5 (border included), got {size!r}")
    # At least 2: touching the target moves the target elsewhere, so reward needs travel.
    if not isinstance(n_objects, (int, np.integer)) or not 2 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be an integer in [2, {MAX_OBJECTS}], got {n_objects!r}")
    n_rooms = ((size - 1) // 2) ** 2
    if n_objects + 1 > n_rooms:
        raise ValueError(f"maze_size={size} has {n_rooms} rooms, too few for {n_objects} objects plus the agent")


def carve_walls(size: int, rng: np.random.Generator, loop_fraction: float = 0.15) -> np.ndarray:
    """Randomized DFS over the rooms at odd coordinates, then knock out extra walls for loops."""
    walls = np.ones((size, size), dtype=bool)
    n = (size - 1) // 2
    visited = np.zeros((n, n), dtype=bool)
    start = (int(rng.integers(n)), int(rng.integers(n)))
    stack = [start]
    visited[start] = True
    walls[2 * start[0] + 1, 2 * start[1] + 1] = False
    while stack:
        r, c = stack[-1]
        options = [
            (r + dr, c + dc)
            for dr, dc in ((0, 1), (1, 0), (0, -1), (-1, 0))
            if 0 <= r + dr < n and 0 <= c + dc < n and not visited[r + dr, c + dc]
        ]
        if not options:
            stack.pop()
            continue
        nr, nc = options[int(rng.integers(len(options)))]
        walls[r + nr + 1, c + nc + 1] = False  # the wall between the two rooms
        walls[2 * nr + 1, 2 * nc + 1] = False
        visited[nr, nc] = True
        stack.append((nr, nc))
    # Interior walls that separate two rooms (exactly one odd coordinate): remove some for loops.
    inner = [
        (r, c)
        for r in range(1, size - 1)
        for c in range(1, size - 1)
        if walls[r, c] and (r % 2) != (c % 2)
    ]
    k = int(round(loop_fraction * len(inner)))
    for i in rng.permutation(len(inner))[:k]:
        walls[inner[i]] = False
    return walls


TILE_JITTER = (0.8, 1.15)  # per-tile brightness factor of the wall colors


def region_colors(walls: np.ndarray, rng: np.random.Generator, n_regions: int = 4) -> np.ndarray:
    """Voronoi regions over tiles, each a distinct muted color, with a per-tile jitter."""
    size = walls.shape[0]
    seeds = rng.uniform(0, size, size=(n_regions, 2))
    ys, xs = np.mgrid[0:size, 0:size]
    d = (ys[..., None] + 0.5 - seeds[:, 0]) ** 2 + (xs[..., None] + 0.5 - seeds[:, 1]) ** 2
    region = d.argmin(-1)
    palette = REGION_COLORS[rng.permutation(len(REGION_COLORS))[:n_regions]]
    jitter = rng.uniform(*TILE_JITTER, size=(size, size, 1)).astype(np.float32)
    return np.clip(palette[region] * jitter, 0, 255).astype(np.float32)


def tile_center(tile_rc: np.ndarray) -> np.ndarray:
    """(row, col) tile indices -> (x, y) lattice position of the tile center."""
    tile_rc = np.asarray(tile_rc)
    return np.stack([tile_rc[..., 1] * TILE + TILE // 2, tile_rc[..., 0] * TILE + TILE // 2], -1).astype(np.int64)


def generate_maze(rng: np.random.Generator, size: int = 9, n_objects: int = 3) -> Maze:
    validate_maze_args(size, n_objects)
    walls = carve_walls(size, rng)
    wall_rgb = region_colors(walls, rng)
    free = np.argwhere(~walls)  # (M, 2) row, col
    picks = rng.choice(len(free), size=n_objects + 1, replace=False)
    object_pos = tile_center(free[picks[:n_objects]])
    object_rgb = OBJECT_COLORS[rng.choice(MAX_OBJECTS, size=n_objects, replace=False)]
    sx, sy = tile_center(free[picks[n_objects]])
    start_pose = np.array([sx, sy, int(rng.integers(N_HEADINGS))], dtype=np.int64)
    first_target = int(rng.integers(n_objects))
    return Maze(walls, wall_rgb, object_pos, object_rgb, start_pose, first_target)
