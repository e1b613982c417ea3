"""Scripted policies and revisit routes in the ground-truth maze."""

import numpy as np
import pytest

from ssm_gym.maze.layout import generate_maze
from ssm_gym.maze.policies import (
    make_policy,
    pose_tile,
    revisit_gaps,
    revisit_route,
    rollout_poses,
    shortest_actions,
)
from ssm_gym.maze.sim import MazeBatch, render_first_person


def run_policy(name, seed, steps):
    sim = MazeBatch(1)
    sim.reset_env(0, np.random.default_rng(seed))
    policy = make_policy(name)
    policy.reset(sim, 0, np.random.default_rng(seed))
    tiles, reward = set(), 0.0
    for _ in range(steps):
        reward += sim.step(np.array([policy.act(sim, 0)]))[0]
        tiles.add(pose_tile(sim.pose[0]))
    return sim, tiles, reward


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_explorer_covers_the_maze(seed):
    sim, tiles, _ = run_policy("explore", seed, 600)
    assert len(tiles) == (~sim.walls[0]).sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oracle_collects_far_more_reward_than_random(seed):
    _, _, oracle = run_policy("oracle", seed, 500)
    _, _, rand = run_policy("random", seed, 500)
    assert oracle >= 8 and oracle > 3 * max(rand, 1)


def blocked_forward_share(name, seeds, steps):
    """Share of a policy's forward moves (forward, forward-left, forward-right) that a wall stopped."""
    moves = blocked = 0
    for seed in seeds:
        sim = MazeBatch(1)
        sim.reset_env(0, np.random.default_rng(seed))
        policy = make_policy(name)
        policy.reset(sim, 0, np.random.default_rng(seed))
        for _ in range(steps):
            a = policy.act(sim, 0)
            before = sim.pose[0, :2].copy()
            sim.step(np.array([a]))
            if a in (1, 4, 5):
                moves += 1
                blocked += bool((sim.pose[0, :2] == before).all())
    return blocked / moves


def test_stumble_walks_into_walls_and_still_explores():
    """The stumble policy's data shows walls stopping forward moves several times as often as the
    explore policy's, while it still covers most of the maze; it is deterministic for a seed."""
    stumble, explore = blocked_forward_share("stumble", [0, 1, 2], 400), blocked_forward_share("explore", [0, 1, 2], 400)
    assert stumble > 0.1 and stumble > 4 * explore
    sim, tiles, _ = run_policy("stumble", 3, 800)
    assert len(tiles) >= 0.8 * (~sim.walls[0]).sum()
    assert run_policy("stumble", 5, 200)[0].pose.tolist() == run_policy("stumble", 5, 200)[0].pose.tolist()


def test_stumble_rejects_bad_settings():
    from ssm_gym.maze.policies import StumblePolicy

    with pytest.raises(ValueError, match="burst"):
        StumblePolicy(burst_prob=1.5)
    with pytest.raises(ValueError, match="burst"):
        StumblePolicy(burst_len=(5, 2))


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("teleport")


def test_shortest_actions_reach_the_exact_pose():
    maze = generate_maze(np.random.default_rng(4))
    poses = rollout_poses(maze.walls, maze.start_pose, np.random.default_rng(0).integers(0, 6, 200))
    goal = poses[-1]
    actions = shortest_actions(maze.walls, maze.start_pose, goal)
    assert (rollout_poses(maze.walls, maze.start_pose, actions)[-1] == goal).all()
    assert len(actions) <= 200
    assert len(shortest_actions(maze.walls, goal, goal)) == 0


@pytest.mark.parametrize("seed", [0, 5])
def test_revisit_route_retraces_earlier_frames_exactly(seed):
    maze = generate_maze(np.random.default_rng(seed))
    route = revisit_route(maze, np.random.default_rng(seed), explore_steps=120, n_revisits=3, retrace_len=20)
    assert len(route.poses) == len(route.actions) + 1 == len(route.phase) == len(route.retrace_of)
    assert (rollout_poses(maze.walls, maze.start_pose, route.actions) == route.poses).all()
    later = np.flatnonzero(route.retrace_of >= 0)
    assert len(later) == 3 * 20
    earlier = route.retrace_of[later]
    assert (earlier < route.context_len).all() and (route.poses[later] == route.poses[earlier]).all()
    # Same pose and same target -> the very same frame (rendering is a function of the pose).
    n = len(later)
    def frames(ts):
        return render_first_person(
            np.repeat(maze.walls[None], n, 0), np.repeat(maze.wall_rgb[None], n, 0),
            np.repeat(maze.object_pos[None], n, 0), np.repeat(maze.object_rgb[None], n, 0),
            np.zeros(n, dtype=np.int64), route.poses[ts])
    assert np.array_equal(frames(later), frames(earlier))
    gaps = revisit_gaps(route.poses)
    assert (gaps[later] > 0).all() and (gaps[later] <= later - earlier).all()


def test_revisit_gaps():
    poses = np.array([[0, 0, 0], [1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0], [2, 0, 0]])
    assert revisit_gaps(poses).tolist() == [-1, -1, 2, 2, 2, -1]
