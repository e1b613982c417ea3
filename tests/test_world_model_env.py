"""Rollout engine and SSMWorld-Maze-v0 (single, vector, SB3) on a tiny randomly initialised model.

The checks are about the plumbing (shapes, seeding, resets, forks, constant memory, errors),
which do not depend on how well the model is trained."""

import dataclasses
import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import ssm_gym  # noqa: F401
from ssm_gym.envs.maze_real import MazeRealEnv
from ssm_gym.envs.sb3 import SB3VecEnv
from ssm_gym.envs.world_model_env import WorldModelEnv, WorldModelVectorEnv, pay
from ssm_gym.maze.dataset import DatasetError, load_episode, save_episode
from ssm_gym.maze.record import record_episodes
from ssm_gym.model.checkpoint import CheckpointError, save_model
from ssm_gym.rollout.engine import RolloutEngine


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("ckpt") / "tiny", model)


def real_first_frames(seeds):
    env = gym.make("SSMWorld-MazeReal-v0")
    return torch.from_numpy(np.stack([env.reset(seed=s)[0] for s in seeds]))


def test_engine_step_shapes_and_determinism(model):
    def run(seed):
        eng = RolloutEngine(model, 3, seed=seed)
        eng.reset(torch.ones(3, dtype=torch.bool), real_first_frames([0, 1, 2]))
        out = [eng.step(torch.tensor([1, 2, 5]))[0].clone() for _ in range(4)]
        return torch.stack(out)

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (4, 3, 64, 64, 3) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_engine_memory_does_not_grow(model):
    eng = RolloutEngine(model, 2)
    eng.reset(torch.ones(2, dtype=torch.bool), real_first_frames([0, 1]))
    before = eng.state_nbytes()
    ptrs = [t.data_ptr() for t in (eng.frames, eng.steps)]
    for _ in range(12):  # well past the attention window
        eng.step(torch.tensor([1, 3]))
    assert eng.state_nbytes() == before
    assert [t.data_ptr() for t in (eng.frames, eng.steps)] == ptrs, "state stays in its preallocated tensors"


@pytest.mark.parametrize("which", ["model", "prev_frame_model"])
def test_engine_reset_mask_leaves_other_envs_alone(request, which):
    model = request.getfixturevalue(which)
    eng = RolloutEngine(model, 3)
    eng.reset(torch.ones(3, dtype=torch.bool), real_first_frames([0, 1, 2]))
    eng.step(torch.tensor([1, 1, 1]))
    twin = eng.fork(torch.arange(3))
    new = real_first_frames([7])
    eng.reset(torch.tensor([False, True, False]), new)
    assert torch.equal(eng.frames[1], new[0]) and eng.steps.tolist() == [1, 0, 1]
    a = eng.step(torch.tensor([2, 2, 2]))[0]
    b = twin.step(torch.tensor([2, 2, 2]))[0]
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


@pytest.mark.parametrize("which", ["model", "prev_frame_model"])
def test_fork_continues_exactly_like_the_original(request, which):
    model = request.getfixturevalue(which)
    eng = RolloutEngine(model, 2, seed=5)
    eng.reset(torch.ones(2, dtype=torch.bool), real_first_frames([3, 4]))
    eng.step(torch.tensor([1, 4]))
    fork = eng.fork(torch.tensor([1, 1, 0]))
    orig = eng.step(torch.tensor([3, 3]))[0].clone()
    forked = fork.step(torch.tensor([3, 3, 3]))[0]
    assert torch.equal(forked[0], orig[1]) and torch.equal(forked[1], orig[1]) and torch.equal(forked[2], orig[0])
    with pytest.raises(ValueError, match="fork indices"):
        eng.fork(torch.tensor([2]))


@pytest.mark.parametrize("which", ["model", "prev_frame_model"])
def test_engine_context_reset_equals_parallel_warmup(request, which):
    model = request.getfixturevalue(which)
    env = gym.make("SSMWorld-MazeReal-v0")
    obs, _ = env.reset(seed=0)
    ctx, acts = [obs], [1, 1, 3, 4, 1]
    for a in acts:
        ctx.append(env.step(a)[0])
    ctx = torch.from_numpy(np.stack(ctx))
    eng = RolloutEngine(model, 1)
    eng.reset(torch.ones(1, dtype=torch.bool), ctx[None], torch.tensor([acts]))
    step_by_step = RolloutEngine(model, 1)
    step_by_step.reset(torch.ones(1, dtype=torch.bool), ctx[:1])
    for t, a in enumerate(acts):
        model.observe(step_by_step.state, ctx[t + 1][None], torch.tensor([a]))
    for x, y in zip(eng.state.ssm, step_by_step.state.ssm):
        if x is not None:
            for u, v in zip(x, y):
                torch.testing.assert_close(u, v, atol=1e-4, rtol=1e-4)
    if eng.state.prev is not None:
        torch.testing.assert_close(eng.state.prev, step_by_step.state.prev)
    assert torch.equal(eng.frames[0], ctx[-1]), "the current frame is the last context frame"


@pytest.mark.parametrize(
    "actions, err, match",
    [(torch.tensor([1]), ValueError, "shape"), (torch.tensor([1.0, 2.0]), TypeError, "integers"),
     (torch.tensor([1, 6]), ValueError, "out of range")],
)
def test_engine_rejects_bad_actions(model, actions, err, match):
    eng = RolloutEngine(model, 2)
    with pytest.raises(err, match=match):
        eng.step(actions)


def test_env_api_and_check_env(checkpoint):
    env = gym.make("SSMWorld-Maze-v0", checkpoint=checkpoint, max_episode_steps=5)
    check_env(env.unwrapped)
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    sb3_check_env(WorldModelEnv(checkpoint=checkpoint), warn=True)
    obs, info = env.reset(seed=3)
    real, _ = gym.make("SSMWorld-MazeReal-v0").reset(seed=3)
    assert np.array_equal(obs, real), "the first frame is the real maze's first frame for the seed"
    assert env.observation_space == gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
    for t in range(5):
        obs, r, term, trunc, info = env.step(env.action_space.sample())
        assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8 and r in (0.0, 1.0)
    assert trunc and info["step"] == 5


def test_env_context_reset_and_errors(checkpoint):
    env = WorldModelEnv(checkpoint=checkpoint)
    ctx = np.stack([real_first_frames([s])[0].numpy() for s in range(4)])
    obs, info = env.reset(options={"context_obs": ctx, "context_actions": np.array([1, 2, 3])})
    assert np.array_equal(obs, ctx[-1]) and info["context_len"] == 4
    with pytest.raises(ValueError, match="context_actions must have shape"):
        env.reset(options={"context_obs": ctx, "context_actions": np.array([1, 2])})
    with pytest.raises(ValueError, match="context_obs must have shape"):
        env.reset(options={"context_obs": ctx[:, :32], "context_actions": np.array([1, 2, 3])})
    with pytest.raises(TypeError, match="uint8"):
        env.reset(options={"context_obs": ctx.astype(np.float32), "context_actions": np.array([1, 2, 3])})
    with pytest.raises(ValueError, match="out of range"):
        env.reset(options={"context_obs": ctx, "context_actions": np.array([1, 2, 9])})
    with pytest.raises(ValueError, match="both"):
        env.reset(options={"context_obs": ctx})
    env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.array([1, 2]))
    with pytest.raises(ValueError, match="out of range"):
        env.step(7)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        WorldModelEnv(checkpoint=tmp_path / "missing")


@pytest.mark.parametrize("mode, starts", [("NextStep", False), ("SameStep", False), ("NextStep", True),
                                          ("SameStep", True)])
def test_vector_env_equals_n_single_envs(checkpoint, dataset, mode, starts):
    n, horizon = 3, 4
    kw = dict(checkpoint=checkpoint, max_episode_steps=horizon, context_data=dataset if starts else None, context_len=5)
    venv = gym.make_vec("SSMWorld-Maze-v0", num_envs=n, autoreset_mode=mode, **kw)
    singles = [WorldModelEnv(**kw) for _ in range(n)]
    vobs, _ = venv.reset(seed=10)
    sobs = [e.reset(seed=10 + i)[0] for i, e in enumerate(singles)]
    np.testing.assert_array_equal(vobs, np.stack(sobs))
    rng = np.random.default_rng(0)
    pending = [False] * n
    max_diff = 0
    for _ in range(2 * horizon + 2):
        actions = rng.integers(0, 6, size=n)
        vobs, vrew, vterm, vtrunc, vinfo = venv.step(actions)
        for i, env in enumerate(singles):
            if pending[i]:
                obs, _ = env.reset()
                pending[i] = False
            else:
                obs, rew, term, trunc, info = env.step(actions[i])
                assert vtrunc[i] == trunc and vterm[i] == term and vrew[i] == rew
                assert vinfo["reward_real"][i] == info["reward_real"]  # the same real maze beside
                if (term or trunc) and mode == "SameStep":
                    max_diff = max(max_diff, np.abs(vinfo["final_obs"][i].astype(int) - obs).max())
                    assert vinfo["_final_info"][i] and vinfo["final_info"]["step"][i] == horizon
                    obs, _ = env.reset()
                elif term or trunc:
                    pending[i] = True
            max_diff = max(max_diff, np.abs(vobs[i].astype(int) - obs).max())
    # Batched and single matrix products may round differently in the last bit; frames are
    # uint8, so allow a difference of a few intensity levels, nothing more.
    assert max_diff <= 3


def test_dataset_starts_are_real_history(checkpoint, dataset):
    """With context_data, a reset warms the model up on a random stretch of a real episode: the
    same as passing that stretch as context, and seeded."""
    env = WorldModelEnv(checkpoint=checkpoint, context_data=dataset, context_len=6)
    obs, info = env.reset(seed=4)
    ep = load_episode(dataset / info["context_episode"])
    t0 = info["context_start"]
    assert info["context_len"] == 6 and 0 <= t0 <= len(ep["image"]) - 6
    np.testing.assert_array_equal(obs, ep["image"][t0 + 5])
    starts = {(i["context_episode"], i["context_start"]) for i in (env.reset()[1] for _ in range(8))}
    assert len(starts) > 1  # every reset draws a new stretch
    assert env.reset(seed=4)[1]["context_start"] == t0  # ... from the seeded generator
    given = WorldModelEnv(checkpoint=checkpoint)
    given.reset(seed=4, options={"context_obs": ep["image"][t0:t0 + 6],
                                 "context_actions": ep["action"][t0 + 1:t0 + 6].argmax(-1)})
    given.engine.generators[0].set_state(env.engine.generators[0].get_state())  # the same noise from here
    for a in [1, 3, 0]:  # same history and same noise: the same imagined future
        np.testing.assert_array_equal(env.step(a)[0], given.step(a)[0])
    with pytest.raises(ValueError, match="context_len"):
        WorldModelEnv(checkpoint=checkpoint, context_data=dataset, context_len=0)
    with pytest.raises(ValueError, match="context_len 500 is longer than every episode"):
        WorldModelEnv(checkpoint=checkpoint, context_data=dataset, context_len=500)
    with pytest.raises(DatasetError, match="not a directory"):
        WorldModelEnv(checkpoint=checkpoint, context_data=dataset / "missing")


def test_the_real_maze_beside_the_imagined_one(checkpoint, dataset, tmp_path):
    """info["reward_real"] is what the ground-truth maze pays for the same actions from the same
    start: from a context_data start, the recorded actions earn the recorded rewards; from a
    seeded fresh maze, what SSMWorld-MazeReal-v0 pays; NaN after given context or from data the
    real maze cannot rebuild. reward_mode "real" pays it."""
    from ssm_gym.maze.dataset import episode_actions

    env = WorldModelEnv(checkpoint=checkpoint, context_data=dataset, context_len=4, reward_mode="real")
    real_starts = MazeRealEnv(context_data=dataset, context_len=4)
    checked = 0
    for seed in range(64):  # until a replayed stretch held a touch (the oracle episode's)
        if checked and seed >= 6:
            break
        obs, info = env.reset(seed=seed)
        # a seed draws the same recorded moment as the real maze started from the same data
        np.testing.assert_array_equal(obs, real_starts.reset(seed=seed)[0])
        ep = load_episode(dataset / info["context_episode"])
        t = info["context_start"] + 3
        assert (env.real.sim.pose[0] == ep["agent_pose"][t]).all()  # the last context frame's moment
        for a, r in zip(episode_actions(ep)[t:], ep["reward"][t + 1:]):
            _, paid, _, _, step_info = env.step(a)
            assert step_info["reward_real"] == r == paid
            checked += int(r)
    assert checked >= 1  # touches were among the replayed steps
    fresh = WorldModelEnv(checkpoint=checkpoint, reward_mode="expected")
    real = gym.make("SSMWorld-MazeReal-v0")
    fresh.reset(seed=7), real.reset(seed=7)
    oracle = record_episodes([7], ["oracle"], steps=60)[0]  # a path that touches targets
    assert oracle["reward"].sum() >= 1
    for a in episode_actions(oracle):
        assert fresh.step(a)[4]["reward_real"] == real.step(a)[1]
    given = WorldModelEnv(checkpoint=checkpoint)
    given.reset(options={"context_obs": ep["image"][:3], "context_actions": episode_actions(ep)[:2]})
    assert np.isnan(given.step(1)[4]["reward_real"])
    with pytest.raises(ValueError, match="cannot follow a start from given context_obs"):
        env.reset(options={"context_obs": ep["image"][:3], "context_actions": episode_actions(ep)[:2]})
    # data the real maze cannot rebuild (no seed: e.g. Memory Maze's): NaN, or an error for reward_mode "real"
    foreign = tmp_path / "foreign"
    for f in sorted(dataset.glob("*.npz")):
        e = dict(load_episode(f))
        del e["seed"]
        save_episode(foreign / f.name, e)
    unknown = WorldModelEnv(checkpoint=checkpoint, context_data=foreign, context_len=4)
    unknown.reset(seed=0)
    assert np.isnan(unknown.step(1)[4]["reward_real"])
    with pytest.raises(DatasetError, match="no 'seed' array"):
        WorldModelEnv(checkpoint=checkpoint, context_data=foreign, context_len=4, reward_mode="real").reset(seed=0)
    venv = WorldModelVectorEnv(num_envs=2, checkpoint=checkpoint, reward_mode="real")
    with pytest.raises(ValueError, match="cannot follow a start from given context_obs"):
        venv.reset(options={"context_obs": np.stack([ep["image"][:3]] * 2),
                            "context_actions": np.stack([episode_actions(ep)[:2]] * 2)})


def test_vector_reset_with_some_seeds_none(checkpoint):
    venv = WorldModelVectorEnv(num_envs=2, checkpoint=checkpoint)
    obs, info = venv.reset(seed=[5, None])
    assert info["maze_seed"][0] == 5 and info["maze_seed"][1] >= 0
    assert np.array_equal(obs[0], real_first_frames([5])[0].numpy())
    with pytest.raises(ValueError, match="max_episode_steps"):
        WorldModelVectorEnv(num_envs=2, checkpoint=checkpoint, max_episode_steps=0)


def test_sb3_adapter_trains_ppo(checkpoint):
    from stable_baselines3 import PPO

    venv = SB3VecEnv(gym.make_vec("SSMWorld-Maze-v0", num_envs=4, checkpoint=checkpoint, max_episode_steps=16,
                                  autoreset_mode="SameStep", sampling_steps=1))
    venv.seed(0)
    model = PPO("CnnPolicy", venv, n_steps=32, batch_size=64, n_epochs=1, seed=0, device="cpu",
                policy_kwargs={"normalize_images": True})
    model.learn(total_timesteps=256)
    assert model.num_timesteps >= 256
    obs = venv.reset()
    obs, rewards, dones, infos = venv.step(np.zeros(4, dtype=np.int64))
    assert obs.shape == (4, 64, 64, 3) and rewards.shape == (4,) and dones.dtype == bool
    with pytest.raises(ValueError, match="SAME_STEP"):
        SB3VecEnv(gym.make_vec("SSMWorld-Maze-v0", num_envs=2, checkpoint=checkpoint))


def test_shipped_model_loads_and_runs_by_default():
    env = gym.make("SSMWorld-Maze-v0")  # no checkpoint: the model shipped in ssm_gym/checkpoints/
    obs, _ = env.reset(seed=0)
    obs, reward, terminated, truncated, _ = env.step(1)
    assert obs.shape == (64, 64, 3) and not terminated and reward in (0.0, 1.0)


def test_shipped_models_by_name_and_clear_errors(tmp_path, monkeypatch):
    from ssm_gym.checkpoints import DEFAULT, resolve_checkpoint, shipped_checkpoint, shipped_names

    assert {"maze-cpu", "maze-latent"} <= set(shipped_names()) and resolve_checkpoint(None).name == DEFAULT
    env = gym.make("SSMWorld-Maze-v0", checkpoint="maze-latent", max_episode_steps=20)
    model = env.unwrapped.engine.model
    assert model.codec is not None and model.config.sample_steps == 1
    obs, _ = env.reset(seed=0)
    real = gym.make("SSMWorld-MazeReal-v0")
    real_obs, _ = real.reset(seed=0)
    assert np.array_equal(obs, real_obs)  # starts from the real maze's first frame
    for _ in range(20):
        obs, reward, terminated, truncated, _ = env.step(int(env.action_space.sample()))
        assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8 and not terminated
    assert truncated
    # a model folder of the same name in the working directory wins over the shipped model; an
    # empty one does not; a run folder resolves to its model/
    monkeypatch.chdir(tmp_path)
    (tmp_path / "maze-latent").mkdir()
    assert resolve_checkpoint("maze-latent") == resolve_checkpoint(shipped_checkpoint("maze-latent"))
    save_model(tmp_path / "run" / "model", model)
    save_model(tmp_path / "maze-latent", model)
    assert resolve_checkpoint("maze-latent") == Path("maze-latent")
    assert resolve_checkpoint("run") == Path("run") / "model"
    assert resolve_checkpoint("./maze-cpu") == Path("maze-cpu")  # a path, not a name: load_model says it is missing
    with pytest.raises(CheckpointError, match="nor a shipped model of that name .*maze-latent"):
        gym.make("SSMWorld-Maze-v0", checkpoint="maze-lattent")
    with pytest.raises(CheckpointError, match="not found"):
        gym.make("SSMWorld-Maze-v0", checkpoint="runs/none/model")


def test_expected_reward_mode_pays_the_head_on_the_first_denoising_pass(model, checkpoint):
    """reward_from="denoiser" is the head on the first denoising pass (pure noise at sigma_max, the
    state's history and the action); the env's "expected" mode pays it clipped to [0, 1]."""
    frames = real_first_frames([1, 2])
    a = torch.tensor([2, 4])
    noise = torch.randn((2, 1, 64, 64, 3), generator=torch.Generator().manual_seed(0))
    state = model.init_state(2)
    model.observe(state, frames, torch.full((2,), model.START))
    before = state.clone()
    sigma = torch.full((2, 1), model.config.sigma_max)
    with torch.no_grad():
        manual = model(noise * model.config.sigma_max, sigma, a[:, None], state=before, update="none").reward[:, 0]
    frame_d, reward_d, _ = model.generate(state.clone(), a, steps=2, noise=noise, reward_from="denoiser")
    frame_f, reward_f, _ = model.generate(state.clone(), a, steps=2, noise=noise)
    torch.testing.assert_close(reward_d, manual)
    assert torch.equal(frame_d, frame_f) and not torch.equal(reward_d, reward_f)

    env = WorldModelEnv(checkpoint=checkpoint, reward_mode="expected")
    env.reset(seed=1)
    for _ in range(3):
        _, r, *_, info = env.step(0)
        assert r == pytest.approx(min(max(info["reward_raw"], 0.0), 1.0))
    venv = gym.make_vec("SSMWorld-Maze-v0", num_envs=2, checkpoint=checkpoint, reward_mode="expected")
    venv.reset(seed=1)
    _, r, *_, info = venv.step(np.array([0, 1]))
    np.testing.assert_allclose(r, np.clip(info["reward_raw"], 0, 1))
    # "soft" pays the reading on the generated frame (the threshold mode's) as is, clipped
    soft, hard = (WorldModelEnv(checkpoint=checkpoint, reward_mode=m) for m in ("soft", "threshold"))
    soft.reset(seed=1), hard.reset(seed=1)
    for a in (0, 2, 1):
        _, r_soft, *_, info_soft = soft.step(a)
        _, r_hard, *_, info_hard = hard.step(a)
        assert info_soft["reward_raw"] == info_hard["reward_raw"]
        assert r_soft == pytest.approx(min(max(info_soft["reward_raw"], 0.0), 1.0))
        assert r_hard == float(info_hard["reward_raw"] > 0.5)
    np.testing.assert_allclose(pay(np.array([-0.2, 0.3, 1.4]), "soft", 0.5), [0.0, 0.3, 1.0])
    with pytest.raises(ValueError, match="reward_mode"):
        WorldModelEnv(checkpoint=checkpoint, reward_mode="sometimes")
    with pytest.raises(ValueError, match="reward_from"):
        model.generate(model.init_state(1), 0, reward_from="sky")


def test_action_guidance_in_the_engine_and_envs(model, null_action_model):
    """The envs pass action_guidance to the engine, whose steps equal the model's guided
    generate; a model without the null action refuses guidance when the env is made."""
    first = real_first_frames([0, 1])
    runs = {}
    for w in (1.0, 3.0):
        eng = RolloutEngine(null_action_model, 2, seed=5, sampling_steps=1, action_guidance=w)
        eng.reset(torch.ones(2, dtype=torch.bool), first)
        state = eng.state.clone()
        noise = torch.stack([torch.randn((1, 64, 64, 3), generator=torch.Generator().manual_seed(5 + i))
                             for i in range(2)])
        frames = eng.step(torch.tensor([2, 3]))[0].clone()
        ref = null_action_model.generate(state, torch.tensor([2, 3]), steps=1, noise=noise, action_guidance=w)[0]
        assert torch.equal(frames, ref)
        assert torch.equal(eng.fork([1]).step(torch.tensor([0]))[0][0],
                           eng.fork([1]).step(torch.tensor([0]))[0][0])  # forks keep the setting
        runs[w] = frames
    assert not torch.equal(runs[1.0], runs[3.0])
    env = gym.make("SSMWorld-Maze-v0", model=null_action_model, sampling_steps=1, action_guidance=3.0)
    env.reset(seed=0)
    assert env.unwrapped.engine.action_guidance == 3.0
    env.step(1)
    vec = gym.make_vec("SSMWorld-Maze-v0", num_envs=2, model=null_action_model, action_guidance=3.0)
    assert vec.unwrapped.engine.action_guidance == 3.0
    with pytest.raises(ValueError, match="null action"):
        gym.make("SSMWorld-Maze-v0", model=model, action_guidance=2.0)


def test_reward_baseline_is_subtracted_per_action(checkpoint):
    """reward_mode="expected" with a per-action baseline pays the expected reward minus the
    baseline of the action taken, clipped to [-1, 1]; single and vector env alike."""
    base = [0.0, 0.1, 0.2, 0.3, 0.4, 5.0]
    env = gym.make("SSMWorld-Maze-v0", checkpoint=checkpoint, reward_mode="expected", reward_baseline=base,
                   sampling_steps=1)
    env.reset(seed=0)
    for a in (2, 5):
        _, r, _, _, info = env.step(a)
        assert r == pytest.approx(np.clip(info["reward_raw"] - base[a], -1, 1), abs=1e-6)
    vec = gym.make_vec("SSMWorld-Maze-v0", num_envs=3, checkpoint=checkpoint, reward_mode="expected",
                       reward_baseline=base, sampling_steps=1)
    vec.reset(seed=0)
    acts = np.array([1, 3, 5])
    _, r, _, _, info = vec.step(acts)
    assert r == pytest.approx(np.clip(info["reward_raw"] - np.array(base)[acts], -1, 1), abs=1e-6)
    with pytest.raises(ValueError, match="reward_mode='expected'"):
        gym.make("SSMWorld-Maze-v0", checkpoint=checkpoint, reward_baseline=base)
    with pytest.raises(ValueError, match="6 finite numbers"):
        gym.make("SSMWorld-Maze-v0", checkpoint=checkpoint, reward_mode="expected", reward_baseline=[0.1] * 5)


def test_cuda_graph_needs_cuda():
    from ssm_gym.model import WorldModel
    from ssm_gym.rollout.engine import RolloutEngine
    from ssm_gym.train.config import PRESETS

    cfg = PRESETS["tiny"][1].model
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        RolloutEngine(WorldModel(cfg), 2, device="cpu", cuda_graph=True)
    # a growing cache (full attention) or packed compressed state cannot be captured, on any device
    full = WorldModel(dataclasses.replace(cfg, variant="attn_full"))
    with pytest.raises(ValueError, match="fixed-size state"):
        RolloutEngine(full, 2, device="cpu", cuda_graph=True)
    with pytest.raises(ValueError, match="fixed-size state"):
        RolloutEngine(WorldModel(cfg), 2, device="cpu", compression="strong", cuda_graph=True)


def test_reward_drift_report(checkpoint, dataset, tmp_path):
    """The exploitation check runs end to end: each repeated action's sum above its random-action
    mean is its episode sum minus horizon x that mean, over the same real starts; the real maze
    beside it pays nothing for actions that do not move (a target is never touched in place)."""
    from ssm_gym.eval.reward_drift import Args, main

    out = main(Args(checkpoint=checkpoint, context_data=dataset, context_len=4, horizon=3, num_envs=2,
                    start_batches=2, json=tmp_path / "drift.json"))
    prior = out["random_action_mean"]
    assert len(prior) == 6 and len(out["repeated"]) == 6 and out["starts"] == 4
    for name, r in out["repeated"].items():
        assert len(r["by_step"]) == 3
        assert r["above_prior_sum"] == pytest.approx(r["episode_sum"] - 3 * prior[name], abs=2e-3)
        assert 0 <= r["real_episode_sum"] <= 3
    for still in ("noop", "left", "right"):
        assert out["repeated"][still]["real_episode_sum"] == 0 and out["real_random_action_mean"][still] == 0
    assert json.loads((tmp_path / "drift.json").read_text())["repeated"] == out["repeated"]
    with pytest.raises(ValueError, match="horizon"):
        main(Args(checkpoint=checkpoint, context_data=dataset, horizon=0))


def test_wall_stops_summary_by_hand():
    """The wall-stop numbers on arrays whose answers are known: two steps blocked (the imagined
    frame moved 0.5 and 9 grey levels), two free."""
    from ssm_gym.eval.wall_stops import summarise

    runs = {"blocked": np.array([[True, False], [True, False]]),
            "imagined_change": np.array([[0.5, 8.0], [9.0, 10.0]]),
            "real_change": np.array([[0.0, 11.0], [0.0, 13.0]]),
            "error": np.array([[1.0, 5.0], [20.0, 7.0]])}
    r = summarise(runs, still_below=2.0)
    assert r == {"blocked_share": 0.5, "imagined_change_blocked": 4.75, "imagined_change_moving": 9.0,
                 "real_change_blocked": 0.0, "real_change_moving": 12.0, "still_share_blocked": 0.5,
                 "still_share_moving": 0.0, "error_blocked": 10.5, "error_moving": 6.0,
                 "still_share_blocked_by_step": {"1": 1.0, "2": 0.0}}
    # by imagined step: rows are steps; windows 1, 2-4, 5 on (cut at the horizon)
    long = {"blocked": np.array([[True], [True], [False], [True], [True], [True]]),
            "imagined_change": np.array([[5.0], [1.0], [9.0], [3.0], [0.0], [0.1]])}
    long.update(real_change=np.zeros((6, 1)), error=np.zeros((6, 1)))
    assert summarise(long, 2.0)["still_share_blocked_by_step"] == {"1": 0.0, "2-4": 0.5, "5-6": 1.0}
    none_blocked = summarise({k: v[:, 1:] for k, v in runs.items()}, 2.0)
    assert none_blocked["blocked_share"] == 0 and none_blocked["still_share_blocked"] is None
    assert none_blocked["still_share_moving"] == 0


def test_wall_stops_report(checkpoint, dataset, tmp_path):
    """The wall check runs end to end against the real maze beside the imagined one: a blocked
    forward move leaves the real frame exactly as it was, a free one changes it."""
    from ssm_gym.eval.wall_stops import Args, main

    out = main(Args(checkpoint=checkpoint, context_data=dataset, context_len=4, horizon=12, num_envs=2,
                    start_batches=2, json=tmp_path / "walls.json"))
    assert out["starts"] == 4 and set(out["actions"]) == {"forward", "forward_left", "forward_right"}
    fwd = out["actions"]["forward"]
    assert 0 < fwd["blocked_share"] < 1  # 12 steps straight on from recorded moments meet a wall
    assert fwd["real_change_blocked"] == 0 and fwd["real_change_moving"] > 0
    assert 0 <= fwd["still_share_blocked"] <= 1
    assert json.loads((tmp_path / "walls.json").read_text())["actions"] == out["actions"]
    with pytest.raises(ValueError, match="horizon"):
        main(Args(checkpoint=checkpoint, context_data=dataset, horizon=0))


def test_engine_bf16_precision_is_close_to_fp32_deterministic_and_checked(model):
    """precision="bf16": bf16 autocast and a bf16 attention ring; the first imagined frames stay
    close to fp32's, the rollout is deterministic for a seed, and a bad precision is refused."""
    def run(precision):
        eng = RolloutEngine(model, 3, seed=0, precision=precision)
        eng.reset(torch.ones(3, dtype=torch.bool), real_first_frames([0, 1, 2]))
        frames = torch.stack([eng.step(torch.tensor([1, 2, 5]))[0].clone() for _ in range(3)])
        return frames, eng

    exact, _ = run("fp32")
    half, eng = run("bf16")
    again, _ = run("bf16")
    assert torch.equal(half, again)
    assert all(c.k.dtype == torch.bfloat16 for c in eng.state.kv)
    mse = (half[0].float() - exact[0].float()).pow(2).mean()
    assert 10 * torch.log10(255**2 / mse.clamp_min(1e-9)) > 35  # dB, first imagined frame
    fork = eng.fork([0, 0])
    assert fork.precision == "bf16" and fork.step(torch.tensor([1, 1]))[0].shape == (2, 64, 64, 3)
    with pytest.raises(ValueError, match="precision"):
        RolloutEngine(model, 1, precision="fp16")
    env = gym.make("SSMWorld-Maze-v0", model=model, precision="bf16")
    assert env.unwrapped.engine.precision == "bf16"
    env.reset(seed=0)
    env.step(1)


def test_engine_predict_is_step_without_advancing(model):
    """predict gives the frame step would generate (same noise stream) and leaves state, frames
    and step counts alone; then observing the real frame keeps the model in sync."""
    eng = RolloutEngine(model, 2, seed=3)
    eng.reset(torch.ones(2, dtype=torch.bool), real_first_frames([0, 1]))
    twin = eng.fork(torch.arange(2))
    frames_before, steps_before = eng.frames.clone(), eng.steps.clone()
    predicted = eng.predict(torch.tensor([1, 3]))
    assert torch.equal(eng.frames, frames_before) and torch.equal(eng.steps, steps_before)
    assert torch.equal(predicted, twin.step(torch.tensor([1, 3]))[0])
    real = real_first_frames([5, 6])
    eng.observe(real, torch.tensor([1, 3]))  # the state after the real frame, as a warm-up on both
    warm = RolloutEngine(model, 2)
    warm.reset(torch.ones(2, dtype=torch.bool), torch.stack([real_first_frames([0, 1]), real], 1),
               context_actions=torch.tensor([[1], [3]]))
    for x, y in zip(eng.state.ssm, warm.state.ssm):
        if x is not None:
            for u, v in zip(x, y):
                torch.testing.assert_close(u, v, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError):
        eng.predict(torch.tensor([1, 2, 3]))
