"""SSMWorld-MazeReal-v0: Gymnasium API, registration, vector == N single envs."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode

import ssm_gym  # noqa: F401  (registers the ids)
from ssm_gym.envs.maze_real import MazeRealEnv, MazeRealVectorEnv


def test_registered_with_entry_points():
    spec = gym.spec("SSMWorld-MazeReal-v0")
    assert spec.entry_point and spec.vector_entry_point
    assert isinstance(gym.make("SSMWorld-MazeReal-v0").unwrapped, MazeRealEnv)
    assert isinstance(gym.make_vec("SSMWorld-MazeReal-v0", num_envs=3), MazeRealVectorEnv)


def test_check_env_passes():
    check_env(gym.make("SSMWorld-MazeReal-v0", render_mode="rgb_array").unwrapped, skip_render_check=False)


def test_spaces():
    env = gym.make("SSMWorld-MazeReal-v0")
    assert env.observation_space == gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
    assert env.action_space == gym.spaces.Discrete(6)


def test_seeding_is_deterministic_and_seeds_differ():
    def run(seed):
        env = MazeRealEnv()
        obs, info = env.reset(seed=seed)
        env.action_space.seed(seed)
        frames, rewards = [obs], []
        for _ in range(100):
            obs, r, *_ = env.step(env.action_space.sample())
            frames.append(obs)
            rewards.append(r)
        return np.stack(frames), np.array(rewards), info["maze_layout"]

    a, b, c = run(7), run(7), run(8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[2], c[2]) or not np.array_equal(a[0], c[0])


def test_unseeded_resets_give_new_mazes():
    env = MazeRealEnv()
    env.reset(seed=0)
    _, i1 = env.reset()
    _, i2 = env.reset()
    assert not np.array_equal(i1["maze_layout"], i2["maze_layout"])


def test_info_contents():
    env = MazeRealEnv(maze_size=11, n_objects=4)
    _, info = env.reset(seed=3)
    assert info["maze_layout"].shape == (11, 11)
    _, _, term, trunc, info = env.step(1)
    assert not term and not trunc
    assert info["agent_pose"].shape == (3,) and info["targets_pos"].shape == (4, 2)
    assert np.isclose(np.linalg.norm(info["agent_dir"]), 1.0)
    assert "maze_layout" not in info


def test_truncation_at_max_episode_steps():
    env = MazeRealEnv(max_episode_steps=5)
    env.reset(seed=0)
    truncs = [env.step(0)[3] for _ in range(5)]
    assert truncs == [False] * 4 + [True]


def test_render_modes():
    env = MazeRealEnv(render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    assert np.array_equal(env.render(), obs)
    top = MazeRealEnv(render_mode="top_down")
    top.reset(seed=0)
    img = top.render()
    assert img.dtype == np.uint8 and img.shape == (9 * 16, 9 * 16, 3)
    with pytest.raises(ValueError, match="render_mode"):
        MazeRealEnv(render_mode="human")


@pytest.mark.parametrize("bad", [np.array([1, 2]), 6, -1, 2.5, "forward"])
def test_bad_actions_rejected_with_clear_error(bad):
    env = MazeRealEnv()
    env.reset(seed=0)
    with pytest.raises((ValueError, TypeError), match="action"):
        env.step(bad)


def test_step_before_reset_is_an_error():
    with pytest.raises(RuntimeError, match="reset"):
        MazeRealEnv().step(0)


@pytest.mark.parametrize("starts", ["new mazes", "recorded moments"])
@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_vector_env_equals_n_single_envs(mode, starts, dataset):
    n, horizon = 4, 12
    kw = {} if starts == "new mazes" else {"context_data": dataset, "context_len": 8}
    venv = gym.make_vec("SSMWorld-MazeReal-v0", num_envs=n, max_episode_steps=horizon, autoreset_mode=mode, **kw)
    singles = [MazeRealEnv(max_episode_steps=horizon, **kw) for _ in range(n)]
    vobs, vinfo = venv.reset(seed=100)
    sobs = [e.reset(seed=100 + i) for i, e in enumerate(singles)]
    for i in range(n):
        assert np.array_equal(vobs[i], sobs[i][0])
        assert np.array_equal(vinfo["maze_layout"][i], sobs[i][1]["maze_layout"])
    rng = np.random.default_rng(0)
    need_reset = [False] * n
    for _ in range(3 * horizon + 2):
        actions = rng.integers(0, 6, size=n)
        vobs, vrew, vterm, vtrunc, vinfo = venv.step(actions)
        for i, env in enumerate(singles):
            if need_reset[i]:  # NEXT_STEP: this step resets the sub-env
                obs, info = env.reset()
                assert np.array_equal(vobs[i], obs) and vrew[i] == 0 and not vtrunc[i]
                assert vinfo["_maze_layout"][i] and np.array_equal(vinfo["maze_layout"][i], info["maze_layout"])
                need_reset[i] = False
                continue
            obs, rew, term, trunc, info = env.step(actions[i])
            assert vrew[i] == rew and vterm[i] == term and vtrunc[i] == trunc
            if trunc and mode == AutoresetMode.SAME_STEP:
                assert np.array_equal(vinfo["final_obs"][i], obs)
                assert np.array_equal(vinfo["final_info"]["agent_pose"][i], info["agent_pose"])
                obs, info = env.reset()
                assert np.array_equal(vinfo["maze_layout"][i], info["maze_layout"])
            assert np.array_equal(vinfo["agent_pose"][i], info["agent_pose"])
            if trunc and mode == AutoresetMode.NEXT_STEP:
                need_reset[i] = True
            assert np.array_equal(vobs[i], obs)


def test_vector_reset_mask_and_bad_actions():
    venv = MazeRealVectorEnv(num_envs=3)
    obs, _ = venv.reset(seed=0)
    moved = venv.step(np.array([1, 3, 4]))[0]
    obs2, info = venv.reset(options={"reset_mask": np.array([True, False, False])})
    assert np.array_equal(obs2[1:], moved[1:])
    assert info["_maze_layout"].tolist() == [True, False, False]
    with pytest.raises(ValueError, match="shape"):
        venv.step(np.array([1, 1]))
    with pytest.raises(ValueError, match="out of range"):
        venv.step(np.array([1, 1, 9]))


def test_starts_at_recorded_moments(dataset):
    """With context_data every start is a recorded frame after at least context_len - 1 others,
    and the maze continues from there exactly as recorded under the recorded actions."""
    from ssm_gym.maze.dataset import episode_actions, load_episode

    episodes = [load_episode(f) for f in sorted(dataset.glob("*.npz"))]
    env = MazeRealEnv(context_data=dataset, context_len=8)
    seen = set()
    for seed in range(12):
        obs, info = env.reset(seed=seed)
        # the recorded frames with this state (a still agent repeats one; any of them continues alike)
        hits = [(k, t) for k, ep in enumerate(episodes) for t in range(7, len(ep["image"]))
                if (ep["image"][t] == obs).all() and (ep["agent_pose"][t] == info["agent_pose"]).all()
                and ep["target_index"][t] == info["target_index"]]
        assert hits
        k, t = hits[0]
        seen.add(hits[0])
        for a, r, pose in zip(episode_actions(episodes[k])[t:], episodes[k]["reward"][t + 1:], episodes[k]["agent_pose"][t + 1:]):
            obs, reward, _, _, info = env.step(a)
            assert reward == r and (info["agent_pose"] == pose).all()
    assert len(seen) > 6  # the seeds draw different moments
    with pytest.raises(ValueError, match="context_len"):
        MazeRealEnv(context_data=dataset, context_len=100)