"""Rendering of the ground-truth maze: a batched first-person raycaster and a top-down map.

The first-person view is a classic grid raycaster (one ray per image column, DDA through the
tile grid) run for all environments and columns at once in numpy. Walls are shaded by face
(east/west faces darker), by distance (fog) and carry dark seams at tile edges, so motion and
place are visible; objects are shaded balls standing on the floor, occluded by walls through a
per-column depth buffer. The current target's color is drawn as the image border.

Rendering is a pure function of (maze, pose, target): the same pose renders the same frame.
"""

from __future__ import annotations

import numpy as np

from ssm_gym.maze.layout import N_HEADINGS, OBJECT_COLORS, REGION_COLORS, TILE, TILE_JITTER

IMAGE_SIZE = 64
BORDER = 2  # pixels of target color around the image
FOV_DEG = 80.0
BALL_RADIUS = 0.2  # tiles
CAMERA_HEIGHT = 0.5  # tiles; walls are 1 tile high

BALL_SHADE_MIN = 0.55  # a ball's edge is shaded to this fraction of its color (see render_first_person)

HEADING_ANGLES = 2 * np.pi * np.arange(N_HEADINGS) / N_HEADINGS
FOG_RGB = np.array([70.0, 70.0, 80.0], dtype=np.float32)


def _background(size: int) -> np.ndarray:
    """Sky gradient above the horizon, floor gradient (darker far away) below."""
    t = (np.arange(size) + 0.5) / size
    sky = np.array([170, 190, 215.0]) * (1.0 - 0.35 * t[:, None] * 2)
    floor = np.array([95, 85, 75.0]) * (0.45 + 1.1 * (t[:, None] - 0.5))
    rows = np.where(t[:, None] < 0.5, sky, floor)
    return np.broadcast_to(np.clip(rows, 0, 255).astype(np.uint8)[:, None, :], (size, size, 3)).copy()


_BACKGROUND = _background(IMAGE_SIZE)


def raycast(walls: np.ndarray, pose: np.ndarray, width: int, fov_deg: float = FOV_DEG):
    """Cast one ray per column for every environment.

    walls: (N, S, S) bool; pose: (N, 3) int (x, y, heading) in lattice units.
    Returns (perp_dist, hit_row, hit_col, side, wall_frac), each (N, width); perp_dist in tiles
    along the viewing direction (fish-eye corrected); side 0 = east/west face, 1 = north/south.
    """
    n, size = walls.shape[0], walls.shape[1]
    px = pose[:, 0:1] / TILE  # (N, 1)
    py = pose[:, 1:2] / TILE
    theta = HEADING_ANGLES[pose[:, 2]][:, None]
    cam = np.tan(np.deg2rad(fov_deg) / 2) * (2 * (np.arange(width) + 0.5) / width - 1)  # (W,)
    dx = np.cos(theta) - np.sin(theta) * cam  # direction + camera plane (to the right)
    dy = np.sin(theta) + np.cos(theta) * cam
    with np.errstate(divide="ignore"):
        delta_x = np.where(dx == 0, 1e30, np.abs(1.0 / dx))
        delta_y = np.where(dy == 0, 1e30, np.abs(1.0 / dy))
    map_x = np.broadcast_to(np.floor(px).astype(np.int64), dx.shape).copy()
    map_y = np.broadcast_to(np.floor(py).astype(np.int64), dy.shape).copy()
    step_x = np.where(dx < 0, -1, 1)
    step_y = np.where(dy < 0, -1, 1)
    side_x = np.where(dx < 0, (px - map_x) * delta_x, (map_x + 1 - px) * delta_x)
    side_y = np.where(dy < 0, (py - map_y) * delta_y, (map_y + 1 - py) * delta_y)
    side = np.zeros(dx.shape, dtype=np.int8)
    hit = np.zeros(dx.shape, dtype=bool)
    env = np.broadcast_to(np.arange(n)[:, None], dx.shape)
    for _ in range(4 * size):  # border walls guarantee a hit well before this
        go_x = (side_x < side_y) & ~hit
        go_y = ~go_x & ~hit
        side_x = np.where(go_x, side_x + delta_x, side_x)
        map_x = np.where(go_x, map_x + step_x, map_x)
        side_y = np.where(go_y, side_y + delta_y, side_y)
        map_y = np.where(go_y, map_y + step_y, map_y)
        side = np.where(go_x, 0, np.where(go_y, 1, side)).astype(np.int8)
        hit |= walls[env, map_y, map_x]
        if hit.all():
            break
    perp = np.where(side == 0, side_x - delta_x, side_y - delta_y)
    perp = np.maximum(perp, 1e-3)
    along = np.where(side == 0, py + perp * dy, px + perp * dx)
    frac = along - np.floor(along)
    return perp, map_y, map_x, side, frac


def render_first_person(
    walls: np.ndarray,
    wall_rgb: np.ndarray,
    object_pos: np.ndarray,
    object_rgb: np.ndarray,
    target: np.ndarray,
    pose: np.ndarray,
    fov_deg: float = FOV_DEG,
    size: int = IMAGE_SIZE,
) -> np.ndarray:
    """Render (N, size, size, 3) uint8 first-person frames for N mazes and poses."""
    n = walls.shape[0]
    perp, hit_r, hit_c, side, frac = raycast(walls, pose, size, fov_deg)
    env = np.arange(n)[:, None]
    focal = (size / 2) / np.tan(np.deg2rad(fov_deg) / 2)

    # Wall color per column: region color, face shading, seams at tile edges, distance fog.
    col = wall_rgb[env, hit_r, hit_c]  # (N, W, 3)
    shade = np.where(side == 0, 0.72, 1.0) * np.where((frac < 0.05) | (frac > 0.95), 0.55, 1.0)
    fog = (1.0 / (1.0 + 0.22 * perp))[..., None]
    col = col * shade[..., None] * fog + FOG_RGB * (1.0 - fog)
    wall_col = np.clip(col, 0, 255).astype(np.uint8)

    half = focal / perp / 2  # half wall height in pixels
    rows = np.arange(size, dtype=np.float32) + 0.5
    wall_mask = np.abs(rows[None, :, None] - size / 2) < half[:, None, :]  # (N, H, W)
    # Compose in packed RGBX uint32 (one element per pixel): several times faster than RGB.
    bg = _pack(_BACKGROUND if size == IMAGE_SIZE else _background(size))
    img = np.where(wall_mask, _pack(wall_col)[:, None, :], bg[None])

    # Objects: balls on the floor, painted far to near, hidden behind nearer walls.
    theta = HEADING_ANGLES[pose[:, 2]]
    fwd = np.stack([np.cos(theta), np.sin(theta)], -1)  # (N, 2)
    right = np.stack([-np.sin(theta), np.cos(theta)], -1)
    rel = (object_pos - pose[:, None, :2]) / TILE  # (N, K, 2) in tiles
    depth = np.einsum("nkd,nd->nk", rel, fwd)
    lateral = np.einsum("nkd,nd->nk", rel, right)
    order = np.argsort(-depth, axis=1, kind="stable")  # far first
    cols = np.arange(size, dtype=np.float32) + 0.5
    for rank in range(object_pos.shape[1]):
        k = order[:, rank]
        d = depth[np.arange(n), k]
        safe_d = np.where(d > 0.05, d, 1.0)
        sx = size / 2 + focal * lateral[np.arange(n), k] / safe_d
        rad = focal * BALL_RADIUS / safe_d
        # Only the envs where this ball is in front of the camera and overlaps the screen.
        sel = np.flatnonzero((d > 0.05) & (sx + rad > 0) & (sx - rad < size))
        if sel.size == 0:
            continue
        d, sx, rad = d[sel], sx[sel], rad[sel]
        sy = size / 2 + focal * (CAMERA_HEIGHT - BALL_RADIUS) / d
        inv = (1.0 / rad**2).astype(np.float32)[:, None]
        cx = ((cols[None] - sx[:, None].astype(np.float32)) ** 2) * inv  # (M, W)
        ry = ((rows[None] - sy[:, None].astype(np.float32)) ** 2) * inv  # (M, H)
        r2 = ry[:, :, None] + cx[:, None, :]  # (M, H, W) squared radius in ball units
        m, r, c = np.nonzero((r2 < 1.0) & (d[:, None, None] < perp[sel][:, None, :]))
        shade = 1.0 - (1.0 - BALL_SHADE_MIN) * r2[m, r, c]
        rgb = object_rgb[sel[m], k[sel[m]]].astype(np.float32) * shade[:, None]
        img[sel[m], r, c] = _pack(rgb.astype(np.uint8))

    # Target color as the image border.
    t_rgb = _pack(object_rgb[np.arange(n), target])[:, None, None]
    img[:, :BORDER] = t_rgb
    img[:, -BORDER:] = t_rgb
    img[:, :, :BORDER] = t_rgb
    img[:, :, -BORDER:] = t_rgb
    return _unpack(img)


def _chroma(rgb):
    """max - min over the channels (numpy or torch), as a signed integer type."""
    if isinstance(rgb, np.ndarray):
        return rgb.max(-1).astype(np.int16) - rgb.min(-1).astype(np.int16)
    return rgb.amax(-1).short() - rgb.amin(-1).short()


# Walls, sky and floor are muted (chroma at most 70 x 1.15 = 80.5 for the brightest jittered wall
# tile, less with shading and fog), balls saturated (at least 0.55 x 160 = 88 at their darkest
# edge): a pixel is a ball's where its chroma is above the midpoint.
OBJECT_CHROMA = (float(_chroma(REGION_COLORS).max()) * TILE_JITTER[1]
                 + BALL_SHADE_MIN * float(_chroma(OBJECT_COLORS).min())) / 2


def object_mask(frames):
    """(..., H, W) bool: the pixels of first-person frames (..., H, W, 3) uint8 (numpy or torch,
    on any device) that show a ball (the target-color border excluded). For weighting a model's
    loss towards the small objects that the reward depends on."""
    mask = _chroma(frames) > OBJECT_CHROMA
    mask[..., :BORDER, :] = False
    mask[..., -BORDER:, :] = False
    mask[..., :, :BORDER] = False
    mask[..., :, -BORDER:] = False
    return mask


def _pack(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> (...) uint32 with R in the lowest byte."""
    rgb = rgb.astype(np.uint32)
    return rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16)


def _unpack(packed: np.ndarray) -> np.ndarray:
    out = np.empty(packed.shape + (3,), dtype=np.uint8)
    v = packed.astype("<u4", copy=False).view(np.uint8).reshape(packed.shape + (4,))
    out[..., 0], out[..., 1], out[..., 2] = v[..., 0], v[..., 1], v[..., 2]
    return out


def render_top_down(
    walls: np.ndarray,
    wall_rgb: np.ndarray,
    object_pos: np.ndarray,
    object_rgb: np.ndarray,
    target: int,
    pose: np.ndarray,
    scale: int = 16,
    trail: np.ndarray | None = None,
) -> np.ndarray:
    """Top-down map of one maze (H, W, 3) uint8: walls, objects (target ringed), the agent
    as a white disk with a heading tick, and optionally a trail of (x, y) lattice positions."""
    size = walls.shape[0]
    px_per_unit = scale / TILE
    img = np.where(walls[..., None], wall_rgb, np.array([40.0, 40.0, 45.0])).astype(np.uint8)
    img = np.repeat(np.repeat(img, scale, 0), scale, 1)
    ys, xs = np.mgrid[0 : size * scale, 0 : size * scale] + 0.5

    def disk(center_xy, radius_px, rgb):
        cx, cy = np.asarray(center_xy, dtype=np.float64) * px_per_unit
        img[(xs - cx) ** 2 + (ys - cy) ** 2 < radius_px**2] = rgb

    if trail is not None and len(trail):
        pts = (np.asarray(trail)[:, :2] * px_per_unit).astype(np.int64)
        r = max(1, scale // 10)
        for dy in range(-r, r):
            for dx in range(-r, r):
                img[np.clip(pts[:, 1] + dy, 0, img.shape[0] - 1), np.clip(pts[:, 0] + dx, 0, img.shape[1] - 1)] = (110, 110, 120)
    for k, (pos, rgb) in enumerate(zip(object_pos, object_rgb)):
        if k == target:
            disk(pos, scale * 0.45, (255, 255, 255))
        disk(pos, scale * 0.3, rgb)
    x, y, h = pose
    disk((x, y), scale * 0.22, (255, 255, 255))
    a = HEADING_ANGLES[h]
    for t in np.linspace(0, 0.45 * TILE, 8):
        disk((x + t * np.cos(a), y + t * np.sin(a)), max(1.0, scale / 12), (255, 255, 255))
    return img
