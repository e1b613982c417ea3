"""The ensemble engine (ssm_gym/rollout/ensemble.py) and its penalty in SSMWorld-Maze-v0, on tiny
randomly initialised models: the driver's episode is unchanged, each member's disagreement equals
the hand-made loop it stands for, and the env pays the penalty it is asked to."""

import csv
import dataclasses

import gymnasium as gym
import numpy as np
import pytest
import torch

import ssm_gym  # noqa: F401
from agents.ppo import Args as PPOArgs
from agents.ppo import make_env, train as train_ppo
from ssm_gym.envs.sb3 import SB3VecEnv
from ssm_gym.model.checkpoint import save_model
from ssm_gym.rollout.engine import RolloutEngine
from ssm_gym.rollout.ensemble import EnsembleEngine, frame_disagreement


def first_frames(seeds):
    env = gym.make("SSMWorld-MazeReal-v0")
    return torch.from_numpy(np.stack([env.reset(seed=s)[0] for s in seeds]))


@pytest.fixture(scope="module")
def member(latent_model):
    return latent_model  # another network (a latent one) over the same 64x64x3 frames


def test_frame_disagreement_by_hand():
    f = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    p1, p2 = f.clone(), f.clone()
    p1[0] = 255  # env 0 all wrong in one prediction
    p2[1, :2] = 51  # env 1: half the pixels off by 0.2 in the other
    d = frame_disagreement(f, [p1, p2])
    torch.testing.assert_close(d, torch.tensor([0.5, 0.05]))
    assert frame_disagreement(f, [f]).abs().max() == 0


@pytest.mark.parametrize("context", [False, True])
def test_ensemble_equals_the_loop_it_stands_for(model, member, context):
    """Driver frames, rewards and terminations as a plain engine's with the same seed; the
    member predicts from its own state, then advances on the driver's frame."""
    n, acts = 3, torch.tensor([[1, 2, 0], [4, 1, 3], [5, 5, 2], [1, 0, 1]])
    frames = first_frames([10, 11, 12])
    if context:
        frames = torch.stack([frames, first_frames([13, 14, 15])], 1)
    ctx = torch.tensor([[1], [2], [3]]) if context else None
    ens = EnsembleEngine(RolloutEngine(model, n, seed=5), [RolloutEngine(member, n, seed=9)])
    ens.reset(torch.ones(n, dtype=torch.bool), frames, ctx, seeds=[1, 2, 3])
    driver, other = RolloutEngine(model, n, seed=5), RolloutEngine(member, n, seed=9)
    driver.reset(torch.ones(n, dtype=torch.bool), frames, ctx, seeds=[1, 2, 3])
    other.reset(torch.ones(n, dtype=torch.bool), frames, ctx, seeds=[2, 3, 4])  # members' seeds offset by 1
    for a in acts:
        got = ens.step(a)
        predicted = other.predict(a)
        want = driver.step(a)
        other.observe(want[0], a)
        for x, y in zip(got, want):
            assert torch.equal(x, y)
        torch.testing.assert_close(ens.disagreement,
                                   (predicted.float() - want[0].float()).abs().mean((1, 2, 3)) / 255)
        assert (ens.disagreement > 0).all()  # two different networks
    assert torch.equal(ens.frames, driver.frames) and torch.equal(ens.steps, driver.steps)
    assert ens.state_nbytes() == driver.state_nbytes() + other.state_nbytes()


def test_ensemble_fork_and_reset_mask(model, member):
    ens = EnsembleEngine(RolloutEngine(model, 2, seed=1), [RolloutEngine(member, 2, seed=2)])
    ens.reset(torch.ones(2, dtype=torch.bool), first_frames([0, 1]))
    ens.step(torch.tensor([1, 1]))
    twin = ens.fork(torch.tensor([1, 1]))
    assert torch.equal(twin.disagreement, ens.disagreement[[1, 1]])
    # by hand: forks of the driver and the member, stepped as the ensemble steps
    driver, other = ens.driver.fork(torch.tensor([1, 1])), ens.members[0].fork(torch.tensor([1, 1]))
    for a in (torch.tensor([2, 2]), torch.tensor([1, 4])):
        got = twin.step(a)
        predicted = other.predict(a)
        want = driver.step(a)
        other.observe(want[0], a)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(twin.disagreement, frame_disagreement(want[0], [predicted]))
    ens.reset(torch.tensor([True, False]), first_frames([7]))
    assert ens.disagreement[0] == 0 and ens.disagreement[1] > 0
    with pytest.raises(ValueError, match="does not match the driver"):
        EnsembleEngine(RolloutEngine(model, 2), [RolloutEngine(member, 3)])
    with pytest.raises(ValueError, match="at least one member"):
        EnsembleEngine(RolloutEngine(model, 2), [])


def test_env_pays_the_penalty_and_logs_disagreement(model, member):
    kw = dict(num_envs=3, model=model, max_episode_steps=4, autoreset_mode="SameStep")
    plain = gym.make_vec("SSMWorld-Maze-v0", reward_mode="expected", **kw)
    ens = gym.make_vec("SSMWorld-Maze-v0", reward_mode="expected", ensemble=[member], disagreement_penalty=2.0, **kw)
    o1, _ = plain.reset(seed=4)
    o2, _ = ens.reset(seed=4)
    assert np.array_equal(o1, o2)
    for t in range(6):  # across an autoreset
        a = np.array([1, 3, t % 6])
        o1, r1, *_ , i1 = plain.step(a)
        o2, r2, *_, i2 = ens.step(a)
        assert np.array_equal(o1, o2), "the ensemble does not change the episode shown"
        d = i2["disagreement"]
        assert d.shape == (3,) and (d >= 0).all() and (d <= 1).all()
        np.testing.assert_allclose(r2, r1 - 2.0 * d, atol=1e-6)
    # NEXT_STEP autoreset: the step that restarts a finished episode pays nothing and shows no disagreement
    nxt = gym.make_vec("SSMWorld-Maze-v0", num_envs=2, model=model, max_episode_steps=2, ensemble=[member],
                       disagreement_penalty=1.0, reward_mode="expected")
    nxt.reset(seed=1)
    for t in range(3):
        _, r, _, trunc, info = nxt.step(np.array([1, 2]))
        if t < 2:
            assert (info["disagreement"] > 0).all()
    assert (info["disagreement"] == 0).all() and (r == 0).all()
    single = gym.make("SSMWorld-Maze-v0", model=model, ensemble=[member], disagreement_penalty=1.0,
                      reward_mode="expected")
    single.reset(seed=4)
    _, r, _, _, info = single.step(1)
    assert isinstance(info["disagreement"], float) and r == pytest.approx(min(max(info["reward_raw"], 0), 1)
                                                                          - info["disagreement"], abs=1e-6)
    with pytest.raises(TypeError, match="ensemble must be a list"):
        gym.make("SSMWorld-Maze-v0", model=model, ensemble="maze-latent")
    with pytest.raises(ValueError, match="disagreement_penalty needs ensemble"):
        gym.make("SSMWorld-Maze-v0", model=model, disagreement_penalty=1.0)
    with pytest.raises(ValueError, match="disagreement_penalty must be >= 0"):
        gym.make("SSMWorld-Maze-v0", model=model, ensemble=[member], disagreement_penalty=-1.0)


def test_ppo_with_an_ensemble_logs_disagreement(model, member, tmp_path):
    driver, other = save_model(tmp_path / "driver", model), save_model(tmp_path / "member", member)
    args = PPOArgs(checkpoint=driver, ensemble=(str(other),), disagreement_penalty=0.5, total_steps=128, num_envs=4,
                   max_episode_steps=8, n_steps=32, batch_size=64, n_epochs=1, eval_every=64, eval_episodes=1,
                   eval_max_steps=5, out_dir=tmp_path / "ppo")
    venv = make_env(args)
    assert isinstance(venv, SB3VecEnv) and venv.venv.unwrapped.disagreement_penalty == 0.5
    venv.reset()
    _, _, _, infos = venv.step(np.zeros(4, dtype=np.int64))
    assert all(0 <= info["disagreement"] <= 1 for info in infos)
    assert train_ppo(args).is_file()
    rows = list(csv.DictReader((tmp_path / "ppo" / "curve.csv").open()))
    stepped = [r for r in rows if r["paid_per_step"] != "nan"]  # rows with steps since the last
    assert stepped and all(0 < float(r["disagreement"]) <= 1 for r in stepped)
    with pytest.raises(ValueError, match="--env real pays the real maze's"):
        make_env(dataclasses.replace(args, env="real"))


def test_ensemble_disagreement_example(model, member, dataset, tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "ensemble_disagreement.py"
    spec = importlib.util.spec_from_file_location("ensemble_disagreement", path)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example
    spec.loader.exec_module(example)
    driver, other = save_model(tmp_path / "driver", model), save_model(tmp_path / "member", member)
    rows = example.main(example.Args(driver=str(driver), member=str(other), context_data=dataset, num_envs=4,
                                     horizon=3, episodes=2))
    assert 0 < rows["all"] <= 1 and set(rows) == {"all", "forward, moved", "forward, blocked by a wall", "turn", "no-op"}
