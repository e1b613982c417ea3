"""Ground-truth maze: generation, dynamics, rendering."""

import numpy as np
import torch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssm_gym.maze.layout import N_HEADINGS, STEP, TILE, generate_maze, tile_center
from ssm_gym.maze.policies import tile_distances
from ssm_gym.maze.sim import MOVES, MazeBatch, apply_actions, check_actions


def make_sim(seed=0, n=1, **kw):
    sim = MazeBatch(n, **kw)
    for i in range(n):
        sim.reset_env(i, np.random.default_rng(seed + i))
    return sim


@given(seed=st.integers(0, 10_000), size=st.sampled_from([5, 7, 9, 11, 15]))
@settings(max_examples=30, deadline=None)
def test_generated_maze_is_connected_bordered_and_seeded(seed, size):
    maze = generate_maze(np.random.default_rng(seed), size, n_objects=3)
    assert maze.walls.shape == (size, size)
    assert maze.walls[0].all() and maze.walls[-1].all() and maze.walls[:, 0].all() and maze.walls[:, -1].all()
    start = (int(maze.start_pose[1]) // TILE, int(maze.start_pose[0]) // TILE)
    dist = tile_distances(maze.walls, start)
    assert ((dist >= 0) == ~maze.walls).all(), "every free tile is reachable"
    for x, y in maze.object_pos:
        assert not maze.walls[y // TILE, x // TILE]
    again = generate_maze(np.random.default_rng(seed), size, n_objects=3)
    assert (again.walls == maze.walls).all() and (again.object_pos == maze.object_pos).all()
    assert (again.start_pose == maze.start_pose).all() and (again.wall_rgb == maze.wall_rgb).all()


def test_bad_maze_arguments_are_rejected():
    with pytest.raises(ValueError, match="odd"):
        MazeBatch(1, maze_size=8)
    with pytest.raises(ValueError, match="n_objects"):
        MazeBatch(1, n_objects=1)  # one ball would pay reward on every step spent touching it
    with pytest.raises(ValueError, match="too few"):
        MazeBatch(1, maze_size=5, n_objects=4)


def test_moves_are_odd_symmetric_so_paths_retrace_exactly():
    for h in range(N_HEADINGS):
        assert (MOVES[h] == -MOVES[(h + N_HEADINGS // 2) % N_HEADINGS]).all()
        assert abs(np.hypot(*MOVES[h]) - STEP) < 0.5


def test_collision_with_walls_stops_the_agent():
    sim = make_sim(3)
    walls = sim.walls[0]
    free = np.argwhere(~walls)
    # A free tile with a wall to the east and open to the west; face east and push forward.
    r, c = next((r, c) for r, c in free if walls[r, c + 1] and not walls[r, c - 1])
    x, y = tile_center(np.array([r, c]))
    pose = np.array([[x, y, 0]])
    for _ in range(5):
        pose = apply_actions(walls[None], pose, np.array([1]))
    # From the tile center a full step would push the agent square into the wall: it stays.
    assert pose[0, 0] == x and pose[0, 1] == y
    # Facing west into the open tile it moves.
    assert apply_actions(walls[None], np.array([[x, y, 8]]), np.array([1]))[0, 0] == x - STEP
    # Turning is never blocked.
    assert apply_actions(walls[None], pose, np.array([3]))[0, 2] == 1


@given(seed=st.integers(0, 1000), actions=st.lists(st.integers(0, 5), min_size=1, max_size=300))
@settings(max_examples=25, deadline=None)
def test_agent_never_overlaps_a_wall(seed, actions):
    sim = make_sim(seed)
    for a in actions:
        sim.step(np.array([a]))
        x, y, _ = sim.pose[0]
        for cx in (x - 3, x + 2):
            for cy in (y - 3, y + 2):
                assert not sim.walls[0, cy // TILE, cx // TILE]


def test_same_pose_renders_identical_frame_after_a_loop():
    sim = make_sim(1)
    first = sim.render()[0]
    pose0 = sim.pose.copy()
    for _ in range(N_HEADINGS):  # a full turn in place
        sim.step(np.array([3]))
    assert (sim.pose == pose0).all()
    assert np.array_equal(sim.render()[0], first)


def test_frames_differ_between_poses_and_mazes():
    a, b = make_sim(0), make_sim(1)
    assert not np.array_equal(a.render(), b.render())
    before = a.render()
    a.step(np.array([2]))
    assert not np.array_equal(before, a.render())


def test_target_border_and_reward_on_touch():
    sim = make_sim(2)
    target = int(sim.target[0])
    frame = sim.render()[0]
    assert (frame[0, :] == sim.object_rgb[0, target]).all() and (frame[:, -1] == sim.object_rgb[0, target]).all()
    # Teleport the agent next to the target ball, facing it, and walk into it.
    ox, oy = sim.object_pos[0, target]
    walls = sim.walls[0]
    r, c = oy // TILE, ox // TILE
    (dr, dc), heading = next(((dr, dc), h) for (dr, dc), h in (((0, -1), 0), ((-1, 0), 4), ((0, 1), 8), ((1, 0), 12))
                             if not walls[r + dr, c + dc])
    sim.pose[0] = [ox + dc * TILE, oy + dr * TILE, heading]
    rewards = [sim.step(np.array([1]))[0] for _ in range(3)]
    assert sum(rewards) == 1.0 and rewards[-1] == 0.0
    assert sim.target[0] != target, "a new target is drawn after a touch"
    assert (sim.render()[0][0, 0] == sim.object_rgb[0, sim.target[0]]).all()


def test_batch_equals_separate_simulators():
    batch = make_sim(10, n=5)
    singles = [make_sim(10 + i) for i in range(5)]
    rng = np.random.default_rng(0)
    for _ in range(60):
        acts = rng.integers(0, 6, size=5)
        rb = batch.step(acts)
        for i, s in enumerate(singles):
            assert s.step(acts[i : i + 1])[0] == rb[i]
        frames = batch.render()
        for i, s in enumerate(singles):
            assert np.array_equal(s.render()[0], frames[i])


@pytest.mark.parametrize(
    "bad, err, match",
    [
        (np.array([1, 2]), ValueError, "shape"),
        (np.array([[1]]), ValueError, "shape"),
        (np.array([6]), ValueError, "out of range"),
        (np.array([-1]), ValueError, "out of range"),
        (np.array([0.5]), TypeError, "integers"),
        (np.array(["a"]), TypeError, "integers"),
    ],
)
def test_bad_actions_rejected(bad, err, match):
    with pytest.raises(err, match=match):
        check_actions(bad, 1)


def test_place_at_recorded_moment_replays_the_recording():
    """From any recorded frame, the recorded actions replay the rest of the episode exactly
    (poses, rewards, frames, next targets after touches). Another maze or other objects are refused."""
    from ssm_gym.maze.dataset import episode_actions
    from ssm_gym.maze.record import place_at_recorded_moment, record_episodes

    ep = record_episodes([5], ["oracle"], steps=150)[0]  # the oracle touches targets
    actions = episode_actions(ep)
    touches = np.flatnonzero(ep["reward"])
    assert len(touches) >= 3
    sim = MazeBatch(2)
    for t0 in (0, 40, int(touches[1])):  # from the start, mid-way, and after two touches
        place_at_recorded_moment(sim, 1, ep, t0)
        assert (sim.render()[1] == ep["image"][t0]).all()
        for t in range(t0, len(actions)):
            r = sim.step(np.array([0, actions[t]]))[1]
            assert (sim.pose[1] == ep["agent_pose"][t + 1]).all() and r == ep["reward"][t + 1]
            assert sim.target[1] == ep["target_index"][t + 1]
            assert (sim.render()[1] == ep["image"][t + 1]).all()
    with pytest.raises(ValueError, match="t must be"):
        place_at_recorded_moment(sim, 0, ep, 151)
    other = dict(ep, maze_layout=np.zeros_like(ep["maze_layout"]))
    with pytest.raises(ValueError, match="maze_layout"):
        place_at_recorded_moment(sim, 0, other, 3)
    with pytest.raises(ValueError, match="targets_pos"):  # same walls, another number of objects
        place_at_recorded_moment(MazeBatch(1, n_objects=4), 0, ep, 3)


def test_object_mask_finds_exactly_the_ball_pixels():
    """The same views rendered with and without the balls differ exactly where object_mask says
    (walls, sky, floor and fog never pass for a ball; the target-color border is excluded)."""
    from ssm_gym.maze.render import object_mask
    from ssm_gym.maze.sim import MazeBatch

    sim = MazeBatch(64, n_objects=6)
    for i in range(64):
        sim.reset_env(i, np.random.default_rng(i))
    rng = np.random.default_rng(0)
    shown = 0
    for t in range(14):  # random moves, then straight on until pressed to a wall (the nearest, brightest walls)
        sim.step(rng.integers(0, 6, 64) if t < 6 else np.ones(64, dtype=np.int64))
        with_balls = sim.render()
        kept = sim.object_pos.copy()
        sim.object_pos[:] = -10_000  # far behind every wall
        without = sim.render()
        sim.object_pos[:] = kept
        differs = (with_balls != without).any(-1)
        differs[:, :2], differs[:, -2:], differs[:, :, :2], differs[:, :, -2:] = False, False, False, False
        mask = object_mask(with_balls)
        assert np.array_equal(mask, differs)
        assert np.array_equal(object_mask(torch.from_numpy(with_balls)).numpy(), mask)  # the torch path
        shown += int(mask.any((1, 2)).sum())
    assert shown > 20, "the test saw balls in enough views"
