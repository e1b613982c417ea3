"""ssm_gym.eval.reward_sight: the imagined touch steps are the recorded ones (checked against a
plain engine run per touch and lookahead), and the report's numbers are in range."""

import json

import numpy as np
import pytest
import torch

from ssm_gym.eval import reward_sight
from ssm_gym.maze.dataset import episode_prev_actions, load_episode
from ssm_gym.rollout.engine import RolloutEngine


def test_imagined_touches_are_the_recorded_ones(model, touches_data):
    args = reward_sight.Args(data=touches_data, context=8, lookahead=3, touches_per_episode=3, seed=7)
    ep = load_episode(sorted(touches_data.glob("*.npz"))[0])
    touches = reward_sight.touch_starts(ep, args.context, args.lookahead, args.touches_per_episode)
    assert touches and all(ep["reward"][t] > 0.5 for t in touches)
    at, before = reward_sight.imagine_touches(model, ep, touches, args)
    assert at.shape == (len(touches), 3) and [len(b) for b in before] == [0, len(touches), 2 * len(touches)]
    prev = episode_prev_actions(ep)
    for i, t in enumerate(touches):
        for k in (1, 3):
            s = t - k  # the last real frame: warm up on 8 frames up to it, then take the k recorded actions
            eng = RolloutEngine(model, 1, sampling_steps=1)
            eng.reset(torch.ones(1, dtype=torch.bool), torch.from_numpy(ep["image"][s - 7:s + 1])[None],
                      torch.from_numpy(prev[s - 6:s + 1])[None], seeds=[7 + s])
            raws = [float(eng.step(torch.tensor([prev[s + j]]))[1][0]) for j in range(1, k + 1)]
            assert at[i, k - 1] == pytest.approx(raws[-1], abs=1e-4)
            if k == 3:
                n = len(touches)  # step by step, every touch's reading in turn
                assert [before[2][i], before[2][n + i]] == pytest.approx(raws[:2], abs=1e-4)


def test_report(tiny_checkpoint, touches_data, tmp_path):
    out = reward_sight.main(reward_sight.Args(checkpoint=tiny_checkpoint, data=touches_data, context=8, lookahead=2,
                                              json=tmp_path / "sight.json"))
    assert out["touches"] > 0 and out["quiet_steps"] == out["touches"]  # one step before each touch at k = 2
    for r in out["by_lookahead"].values():
        assert 0 <= r["paid"] <= 1 and (r["auc"] is None or 0 <= r["auc"] <= 1)
    assert json.loads((tmp_path / "sight.json").read_text())["touches"] == out["touches"]
    with pytest.raises(ValueError, match="no touch"):
        reward_sight.main(reward_sight.Args(checkpoint=tiny_checkpoint, data=touches_data, context=200))
