"""The weights shipped in ssm_gym/checkpoints/ predict held-out mazes as their model cards say.

A guard on what users get from `gym.make("SSMWorld-Maze-v0")`: an export from the wrong run, a
config that loads but does not match the weights' training (patch size, codec, normalisation), or
a corrupted file that still parses all load and step without error, and all fail here. Small
sample (6 held-out mazes x 8 teacher-forced steps after 24 real frames), so the bounds sit well
inside what each model measured on 16 mazes (README, Shipped models) and well above what a
broken model scores (a randomly initialised one: one-step about 10 dB, action read at chance)."""

import numpy as np
import pytest

from ssm_gym.checkpoints import DEFAULT, load_world_model, shipped_checkpoint, shipped_names
from ssm_gym.eval.metrics import psnr
from ssm_gym.eval.prediction import action_sensitivity, load_clips, predict_episodes, trivial_baselines
from ssm_gym.maze.sim import N_ACTIONS
from training.collect import Args as CollectArgs, collect

CONTEXT, STEPS, MAZES = 24, 8, 6

# name -> (least one-step PSNR gain over copying the last real frame, least share of steps where
# the frame for the action taken is the closest of all actions' to the real next frame). The
# pixel model v1 is below copying at one step (README: 19.70 against 19.98; 2 dB below on this
# sample), so its bound only says it is not broken.
GATES = {
    "maze-latent-ol": (4.0, 0.75),
    "maze-latent": (4.0, 0.75),
    "maze-latent-walls": (4.0, 0.75),
    "maze-latent-balls": (4.0, 0.75),
    "maze-cpu": (-3.5, 0.25),
}


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """The clips and the one-step PSNR of copying the last real frame on them."""
    folder = tmp_path_factory.mktemp("held_out")
    # maze seeds far above the training data's (training.collect's defaults), the default policy mix
    collect(CollectArgs(out_dir=folder, num_episodes=MAZES, episode_len=CONTEXT + STEPS, seed=2_000_000))
    clips = load_clips(folder, episodes=MAZES, length=CONTEXT + STEPS)
    return clips, trivial_baselines(clips.frames, CONTEXT)["repeat_last_frame_1step"]


def test_every_shipped_model_has_a_gate_and_the_default_is_shipped():
    assert set(shipped_names()) == set(GATES), "add a gate for each shipped model (and drop removed ones)"
    assert DEFAULT in GATES


@pytest.mark.parametrize("name", sorted(GATES))
def test_shipped_model_predicts_held_out_mazes(name, held_out):
    min_gain, min_action_read = GATES[name]
    model = load_world_model(shipped_checkpoint(name))
    (frames, prev, _), copy_last = held_out
    pred = predict_episodes(model, frames, prev, CONTEXT, STEPS, steps=1)
    one_step = float(psnr(pred["one_step"], pred["real"]).mean())
    assert np.isfinite(one_step) and one_step > copy_last + min_gain, (name, one_step, copy_last)
    read = action_sensitivity(model, frames, prev, CONTEXT, positions=STEPS, steps=1)["true_action_best"]
    assert read >= min_action_read > 1 / N_ACTIONS, (name, read)
