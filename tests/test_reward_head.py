"""Re-fitting the reward head on imagination (ssm_gym/train/reward_head.py, training.tune_reward_head):
the windows place touches where they say, the collected head inputs are exactly what the env's
head reads (checked against a plain engine run), fitting learns a known rule, and the CLI writes
a checkpoint that differs from its source only in the head."""

import json

import numpy as np
import pytest
import torch

from ssm_gym.maze.dataset import episode_prev_actions, load_episode
from ssm_gym.model.checkpoint import load_model, read_config
from ssm_gym.rollout.engine import RolloutEngine
from ssm_gym.train.reward_head import HeadInputs, fit_head, head_report, head_windows, imagine_head_inputs
from training import tune_reward_head


def test_windows_place_each_touch_at_a_distinct_imagined_step():
    rewards = np.zeros(60)
    rewards[[20, 45]] = 1
    rng = np.random.default_rng(0)
    ends = head_windows(rewards, context=8, horizon=4, rng=rng, per_touch=4)
    assert len(ends) == 8
    for t, group in ((20, ends[:4]), (45, ends[4:])):
        assert sorted(t - s for s in group) == [1, 2, 3, 4]  # the touch once at each imagined step
    # bounds: 8 frames of context (s >= 7) and 4 recorded steps after (s <= 55)
    assert head_windows(np.r_[np.zeros(8), 1.0, np.zeros(4)], 8, 4, rng, per_touch=4) == [7]
    rand = head_windows(rewards, 8, 4, rng, per_touch=0, random_windows=200)
    assert len(rand) == 200 and min(rand) >= 7 and max(rand) <= 55
    assert head_windows(np.zeros(10), 8, 4, rng, random_windows=3) == []  # too short for any window
    with pytest.raises(ValueError, match="horizon"):
        head_windows(rewards, 8, 0, rng)


@pytest.mark.parametrize("which, precision, guidance", [("model", "fp32", None), ("model", "bf16", None),
                                                        ("null_action_model", "fp32", 2.0)])
def test_inputs_are_what_the_env_head_reads(which, precision, guidance, touches_data, request):
    """The tapped inputs, read by the head, give the rewards the engine pays (in bf16 within its
    rounding; with action guidance, whose extra passes also call the head, exactly)."""
    model = request.getfixturevalue(which)
    ep = load_episode(sorted(touches_data.glob("*.npz"))[0])
    ends = [10, 20, 33]
    data = imagine_head_inputs(model, [(ep, s) for s in ends], context=6, horizon=3, batch=2, seed=5,
                               precision=precision, action_guidance=guidance)
    assert data.imagined.shape == (3, 3, model.config.d_model) and data.real.shape == (3, 6, model.config.d_model)
    prev = episode_prev_actions(ep)
    for i, s in enumerate(ends):
        assert torch.equal(data.rewards[i], torch.from_numpy(ep["reward"][s + 1:s + 4]).float())
        assert torch.equal(data.real_rewards[i], torch.from_numpy(ep["reward"][s - 5:s + 1]).float())
    tol = 2e-2 if precision == "bf16" else 1e-5
    # the same windows through a plain engine (batches of 2: seeds 5 and 5 + 2, as the collection numbers them)
    with torch.no_grad():
        for b0, rows in ((0, [0, 1]), (2, [2])):
            eng = RolloutEngine(model, len(rows), sampling_steps=None, seed=5 + b0, precision=precision,
                                action_guidance=guidance)
            eng.reset(torch.ones(len(rows), dtype=torch.bool),
                      torch.from_numpy(np.stack([ep["image"][ends[r] - 5:ends[r] + 1] for r in rows])),
                      torch.from_numpy(np.stack([prev[ends[r] - 4:ends[r] + 1] for r in rows])))
            for j in range(3):
                _, reward, term = eng.step(torch.tensor([prev[ends[r] + 1 + j] for r in rows]))
                out = model.head(data.imagined[rows, j])
                assert out[:, 0] == pytest.approx(reward.float(), abs=tol)
                if precision == "fp32":
                    assert torch.equal(out[:, 1] > 0, term)
        if precision == "fp32" and guidance is None:  # the real context: the model's own reading of the recorded frames
            s = ends[0]
            frames = torch.from_numpy(ep["image"][s - 5:s + 1])[None]
            acts = torch.cat([torch.tensor([model.START]), torch.from_numpy(prev[s - 4:s + 1])])[None]
            out = model.observe_clip(model.init_state(1), frames, acts)
            assert model.head(data.real[0])[:, 0] == pytest.approx(out.reward[0], abs=1e-5)


def test_fit_learns_a_known_rule():
    torch.manual_seed(0)
    d, w, h = 16, 400, 4
    x = torch.randn(w, h, d)
    rewards = (x[..., 0] > 1.0).float()  # a touch where the first feature is high (~16%),
    x[..., 0] += 2 * rewards  # with a margin
    data = HeadInputs(x, rewards, torch.zeros(w, h), torch.randn(w, 2, d), torch.zeros(w, 2), torch.zeros(w, 2))
    head = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.SiLU(), torch.nn.Linear(d, 2))
    before = head_report(head, data)
    losses = fit_head(head, data, steps=400, lr=3e-3, batch=256)
    after = head_report(head, data)
    assert losses[-1] < 0.3 * losses[0]
    assert after["imagined"]["auc"] > 0.97 and after["imagined"]["paid"] > 0.7 > before["imagined"]["paid"]
    assert after["real"]["touches"] == 0 and after["real"]["false_per_1k"] < 50
    assert set(after["by_step"]) == {"1", "2", "3", "4"} and after["steps_3_on"]["touches"] == int(rewards[:, 2:].sum())


def test_cli_writes_a_checkpoint_that_differs_only_in_the_head(tiny_checkpoint, touches_data, tmp_path, capsys):
    args = tune_reward_head.Args(out=tmp_path / "tuned", checkpoint=str(tiny_checkpoint), data=touches_data,
                                 val_data=touches_data, context=6, horizon=3, per_touch=1, random_per_episode=2,
                                 val_per_touch=3, val_random_per_episode=2, batch=8, precision="fp32", steps=30,
                                 cache=tmp_path / "inputs.pt", json=tmp_path / "report.json")
    report = tune_reward_head.main(args)
    old, new = load_model(tiny_checkpoint).state_dict(), load_model(args.out).state_dict()
    changed = sorted(k for k in old if not torch.equal(old[k], new[k]))
    assert changed and all(k.startswith("head.") for k in changed)
    _, meta = read_config(args.out)
    assert meta["reward_head_tuned"]["held_out"]["new"] == report["new"]["val"]
    assert json.loads((tmp_path / "report.json").read_text())["new"]["val"]["imagined"] == report["new"]["val"]["imagined"]
    # the cache is read back (same inputs, same fit), and refused for other settings or when corrupt
    capsys.readouterr()
    again = tune_reward_head.main(args)
    assert again["new"]["val"] == report["new"]["val"] and "head inputs from" in capsys.readouterr().out
    with pytest.raises(ValueError, match="other settings.*horizon"):
        tune_reward_head.main(tune_reward_head.Args(**{**vars(args), "horizon": 2}))
    with pytest.raises(ValueError, match="source checkpoint"):
        tune_reward_head.main(tune_reward_head.Args(**{**vars(args), "out": tiny_checkpoint}))
    (tmp_path / "inputs.pt").write_bytes(b"not a cache")
    with pytest.raises(ValueError, match="not a readable head-input cache"):
        tune_reward_head.main(args)
