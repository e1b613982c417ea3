"""Recall benchmark: the protocol's ground truth, the metrics, and the CLI end to end."""

import dataclasses
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from ssm_gym.eval.metrics import psnr, ssim
from ssm_gym.eval.recall import Args, reasoning_episode, retrieval_episode, run
from ssm_gym.maze.render import BORDER
from ssm_gym.model.checkpoint import save_model
from ssm_gym.model.diffusion import float_to_frames, frames_to_float
from ssm_gym.model.world_model import WorldModel
from ssm_gym.train.config import PRESETS


def test_retrieval_frames_are_revisits_of_the_context():
    ep = retrieval_episode(seed=2_000_000, context=60, n_revisits=3, retrace_len=10)
    later = np.flatnonzero(ep.retrace)
    assert len(later) == 30 and (later >= ep.context).all()
    earlier = ep.source[later]
    assert (earlier < ep.context).all()
    inner = np.s_[:, BORDER:-BORDER, BORDER:-BORDER]
    assert np.array_equal(ep.frames[later][inner], ep.frames[earlier][inner]), "same pose, same view"
    assert (ep.gaps[later] > 0).all() and (ep.gaps[later] <= later - earlier).all()
    assert len(ep.actions) == len(ep.frames) - 1


def test_reasoning_episode_layout():
    ep = reasoning_episode(seed=5, context=30, horizon=20)
    assert len(ep.frames) == 30 + 20 and not ep.retrace.any()


def test_metrics_on_known_inputs():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    assert np.allclose(ssim(a, a), 1.0) and (psnr(a, a) == 100.0).all()
    b = a.copy()
    b[0, 0, 0, 0] ^= 0xFF
    noisy = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    assert (psnr(b, a)[0] > psnr(noisy, a)).all() and (ssim(noisy, a) < 1).all()
    mse = ((noisy.astype(float) - a) ** 2).reshape(3, -1).mean(1)
    np.testing.assert_allclose(psnr(noisy, a), 10 * np.log10(255**2 / mse), rtol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        psnr(a.astype(np.float32), a)


def test_cli_end_to_end_on_tiny_checkpoints(tmp_path):
    torch.manual_seed(0)
    ckpts = []
    for variant in ("full", "attn_local"):
        cfg = PRESETS["tiny"][1].model
        model = WorldModel(type(cfg)(**{**cfg.__dict__, "variant": variant}))
        ckpts.append(save_model(tmp_path / variant, model))
    args = Args(checkpoints=tuple(ckpts), names=("ours", "local"), num_mazes=2, context=12, n_revisits=1,
                retrace_len=4, reasoning_horizon=3, sampling_steps=1, out_dir=tmp_path / "out")
    res = run(args)
    for f in ("recall.json", "recall.md", "recall_psnr_vs_gap.png", "recall_ssim_vs_gap.png"):
        assert (tmp_path / "out" / f).is_file(), f
    saved = json.loads((tmp_path / "out" / "recall.json").read_text())
    assert set(saved["models"]) == {"ours", "local"}
    r = res["models"]["ours"]["retrieval"]
    assert r["frames"] == 2 * 4 and 0 < r["psnr"] < 100 and sum(b["frames"] for b in r["by_gap"]) == r["frames"]
    assert res["models"]["local"]["reasoning"]["frames"] == 2 * 3
    assert "| ours | full |" in (tmp_path / "out" / "recall.md").read_text()
    with pytest.raises(ValueError, match="names"):
        run(Args(checkpoints=tuple(ckpts), names=("one",)))


def test_merge_combines_per_checkpoint_runs_and_refuses_mixed_protocols(tmp_path):
    import dataclasses

    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "m", WorldModel(PRESETS["tiny"][1].model))
    base = Args(checkpoints=(ckpt,), num_mazes=1, context=12, n_revisits=1, retrace_len=4, reasoning_horizon=3,
                sampling_steps=1, tasks=("retrieval",))
    a = run(dataclasses.replace(base, names=("a",), out_dir=tmp_path / "a"))
    run(dataclasses.replace(base, names=("b",), out_dir=tmp_path / "b"))
    both = run(Args(merge=(tmp_path / "a" / "recall.json", tmp_path / "b" / "recall.json"), out_dir=tmp_path / "ab"))
    assert set(both["models"]) == {"a", "b"} and both["models"]["a"] == a["models"]["a"]
    assert (tmp_path / "ab" / "recall_psnr_vs_gap.png").is_file() and "| b | full |" in (tmp_path / "ab" / "recall.md").read_text()
    run(dataclasses.replace(base, names=("c",), context=14, out_dir=tmp_path / "c"))
    with pytest.raises(ValueError, match="different protocol.*context"):
        run(Args(merge=(tmp_path / "a" / "recall.json", tmp_path / "c" / "recall.json"), out_dir=tmp_path / "x"))
    with pytest.raises(ValueError, match="already present"):
        run(Args(merge=(tmp_path / "a" / "recall.json", tmp_path / "a" / "recall.json"), out_dir=tmp_path / "x"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a recall.json"):
        run(Args(merge=(tmp_path / "bad.json",), out_dir=tmp_path / "x"))
    with pytest.raises(ValueError, match="no --checkpoints"):
        run(Args(out_dir=tmp_path / "x"))


def test_prediction_cli_rows(tmp_path):
    from ssm_gym.eval.prediction import Args as PredArgs
    from ssm_gym.eval.prediction import load_clips
    from ssm_gym.eval.prediction import main as predict_main
    from ssm_gym.maze.dataset import load_episode, save_episode
    from ssm_gym.maze.record import record_episodes

    for s, ep in zip((100, 101), record_episodes([100, 101], ["explore"] * 2, steps=12)):
        save_episode(tmp_path / "val" / f"ep_{s:06d}.npz", ep)
    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "m", WorldModel(PRESETS["tiny"][1].model))
    rows = predict_main(PredArgs(checkpoints=(ckpt,), val_dir=tmp_path / "val", episodes=2, context=4, horizon=6,
                                 sampling_steps=(1, 2), whole_episode_len=13, json=tmp_path / "p.json"))
    base, head, curve, rows_ = rows[0], rows[1], rows[2], rows[3:]
    assert set(base["baselines"]) == {"repeat_last_frame_1step", "context_mean_open_loop", "context_mean_by_window"}
    assert list(base["baselines"]["context_mean_by_window"]) == ["1-6"]
    assert all(list(r["psnr_open_loop_by_window"]) == ["1-6"] for r in rows[3:])
    assert list(curve["denoising_psnr"]) == ["0.05", "0.1", "0.3", "1.0", "5.0"]
    assert head["rewards"] == "head on real frames" and head["frames"] == 2 * 13
    assert [r["sampling_steps"] for r in rows_] == [1, 2] and all(0 < r["psnr_1step"] < 100 for r in rows_)
    assert all(r["open_loop"]["false_payouts_per_1k"] >= 0 for r in rows_)
    assert all(0 <= r["actions"]["true_action_best"] <= 1 and r["actions"]["samples"] == 2 * 6 for r in rows_)
    assert json.loads((tmp_path / "p.json").read_text()) == rows
    with pytest.raises(ValueError, match="no episode with 1 x 40 frames"):
        predict_main(PredArgs(checkpoints=(ckpt,), val_dir=tmp_path / "val", context=20, horizon=20))
    # Windows: consecutive stretches of each episode, episode-major.
    clips = load_clips(tmp_path / "val", 2, 6, windows=2)
    ep = load_episode(tmp_path / "val" / "ep_000101.npz")
    assert clips.frames.shape[:2] == (4, 6) and np.array_equal(clips.frames[3].numpy(), ep["image"][6:12])
    assert np.array_equal(clips.prev_actions[3].numpy(), ep["action"][6:12].argmax(-1))
    assert np.array_equal(clips.rewards[3].numpy(), ep["reward"][6:12])
    rows = predict_main(PredArgs(checkpoints=(ckpt,), val_dir=tmp_path / "val", episodes=2, context=2, horizon=4,
                                 windows=2, sampling_steps=(1,), whole_episodes=False, denoise_sigmas=()))
    assert rows[1]["clips"] == 4 and rows[1]["episodes"] == 2
    # action guidance: a row per weight for a model with the null action, weight 1 only without
    null = save_model(tmp_path / "null", WorldModel(dataclasses.replace(PRESETS["tiny"][1].model, null_action=True)))
    rows = predict_main(PredArgs(checkpoints=(ckpt, null), val_dir=tmp_path / "val", episodes=1, context=2, horizon=3,
                                 sampling_steps=(1,), action_guidance=(1.0, 2.0), whole_episodes=False))
    assert [(Path(r["checkpoint"]).name, r["action_guidance"]) for r in rows[1:] if "action_guidance" in r] == [
        ("m", 1.0), ("null", 1.0), ("null", 2.0)]


class _ActionPainter(torch.nn.Module):
    """A stand-in world model whose imagined frame is a flat image of brightness 40 * action (or
    of a constant when it ignores actions): action sensitivity has a known answer."""

    def __init__(self, uses_actions: bool):
        super().__init__()
        self.uses_actions, self.w = uses_actions, torch.nn.Parameter(torch.zeros(1))
        self.config = types.SimpleNamespace(space_shape=(8, 8, 3))  # (pixel space: the noise's shape)

    def init_state(self, n, device=None):
        return _Rows(n)

    def observe_clip(self, state, frames, actions):
        pass

    def observe(self, state, frame, action):
        pass

    def generate(self, state, actions, steps=None, noise=None, action_guidance=None, reward_from="frame"):
        value = actions * 40 if self.uses_actions else torch.full_like(actions, 40)
        frames = value.to(torch.uint8)[:, None, None, None].expand(len(actions), 8, 8, 3)
        reward = 0.01 * (actions == 4).float()  # an expected reward that favours action 4 everywhere
        return frames, reward, torch.zeros(len(actions), dtype=torch.bool)


class _Rows:
    def __init__(self, n):
        self.n = n

    def index_select(self, idx):
        return _Rows(len(idx))


def test_action_sensitivity_and_trivial_baselines_on_known_cases():
    from ssm_gym.eval.prediction import action_sensitivity, trivial_baselines

    g = torch.Generator().manual_seed(0)
    taken = torch.randint(0, 6, (5, 7), generator=g)
    frames = (taken * 40).to(torch.uint8)[:, :, None, None, None].expand(5, 7, 8, 8, 3).contiguous()
    # the real next frame is exactly what the action-using model paints for the action taken
    good = action_sensitivity(_ActionPainter(True), frames, taken, context=3, positions=4)
    assert good["true_action_best"] == 1.0 and good["psnr_true_action"] == 100.0
    assert good["psnr_other_actions"] < 30 and good["psnr_between_actions"] < 30 and good["samples"] == 20
    assert good["expected_reward_by_action"] == pytest.approx([0, 0, 0, 0, 0.01, 0])
    assert good["expected_reward_argmax_share"] == [0, 0, 0, 0, 1, 0]
    blind = action_sensitivity(_ActionPainter(False), frames, taken, context=3, positions=4)
    assert blind["psnr_between_actions"] == 100.0  # every action gives the same frame
    assert blind["true_action_best"] == pytest.approx((taken[:, 3:7] == 0).float().mean().item())  # ties: action 0
    with pytest.raises(ValueError, match="need 10 frames"):
        action_sensitivity(_ActionPainter(True), frames, taken, context=3, positions=7)
    static = torch.full((2, 6, 8, 8, 3), 77, dtype=torch.uint8)
    assert trivial_baselines(static, 2) == {"repeat_last_frame_1step": 100.0, "context_mean_open_loop": 100.0,
                                            "context_mean_by_window": {"1-4": 100.0}}
    moving = static.clone()
    moving[:, 3:] = 0
    base = trivial_baselines(moving, 3)
    assert base["repeat_last_frame_1step"] < 100 and base["context_mean_open_loop"] < 100


def test_open_loop_windows():
    from ssm_gym.eval.prediction import by_window

    curve = np.arange(1, 251, dtype=np.float64)  # step i scores i
    assert by_window(curve) == {"1-10": 5.5, "11-20": 15.5, "21-50": 35.5, "51-100": 75.5, "101-200": 150.5,
                                "201-250": 225.5}
    assert by_window(curve[:7]) == {"1-7": 4.0} and by_window(curve[:10]) == {"1-10": 5.5}


class _Denoiser(torch.nn.Module):
    """Returns the clean frame it was told (perfect) or its noisy input (does nothing)."""

    def __init__(self, perfect, clean, sigmas):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.perfect, self.clean, self.seen, self.sigmas = perfect, clean, [], list(sigmas)

    def init_state(self, n, dev):
        return None

    def observe_clip(self, state, frames, actions):
        self.seen += range(frames.shape[1])

    def to_space(self, frames):  # a pixel-space model
        return frames_to_float(frames)

    def to_frames(self, x):
        return float_to_frames(x)

    def observe(self, state, frame, action):
        self.seen.append(len(self.seen))

    def forward(self, x, sigma, actions, state=None, update="none"):
        assert update == "none" and sigma.shape == (3, 1)
        s = self.sigmas.pop(0)  # told the level it was noised at, in the order asked
        assert torch.all(sigma == s) and (x - (self.clean[:, len(self.seen):len(self.seen) + 1].float() / 127.5 - 1)).std() > s / 2
        self.sigmas.append(s)
        out = self.clean[:, len(self.seen):len(self.seen) + 1].float() / 127.5 - 1 if self.perfect else x
        return types.SimpleNamespace(denoised=out)


def test_denoising_curve_on_known_denoisers():
    from ssm_gym.eval.prediction import denoising_curve

    g = torch.Generator().manual_seed(0)
    frames = torch.randint(40, 216, (3, 7, 16, 16, 3), generator=g, dtype=torch.uint8)
    actions = torch.zeros(3, 7, dtype=torch.long)
    perfect = denoising_curve(_Denoiser(True, frames, (0.1, 1.0)), frames, actions, context=3, sigmas=(0.1, 1.0), positions=4)
    idle = denoising_curve(_Denoiser(False, frames, (0.1, 1.0)), frames, actions, context=3, sigmas=(0.1, 1.0), positions=4)
    assert perfect["0.1"]["denoised"] == 100.0 and idle["0.1"]["denoised"] == idle["0.1"]["input"]
    # Gaussian noise of std sigma on a [-1, 1] scale: PSNR = 20 log10(2 / sigma) (less clipping)
    assert idle["0.1"]["input"] == pytest.approx(26.0, abs=0.3) and perfect["1.0"]["input"] > 6.0
    with pytest.raises(ValueError, match="need 8 frames"):
        denoising_curve(_Denoiser(True, frames, ()), frames, actions, context=3, positions=5)
    with pytest.raises(ValueError, match="noise levels must be > 0"):
        denoising_curve(_Denoiser(True, frames, ()), frames, actions, context=3, sigmas=(0.0, 0.1))


def test_reward_metrics_count_paid_events_and_false_payouts():
    from ssm_gym.eval.prediction import reward_metrics

    real = np.array([[0, 1, 0, 0, 1, 0, 0, 0, 0, 0]], dtype=np.float32)
    pred = np.array([[0.9, 0.8, 0.1, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    m = reward_metrics(pred, real)
    assert m["reward_events"] == 2 and m["reward_recall"] == 0.5
    assert m["false_payouts_per_1k"] == 1000 / 8 and m["mean_pred_at_events"] == pytest.approx(0.55)
    # AUC: each event (0.8, 0.3) is above 7 of the 8 other steps (all but the 0.9), no ties
    assert m["auc"] == pytest.approx((7 + 7) / 16) and m["mean_pred_elsewhere"] == pytest.approx(1.0 / 8)
    assert reward_metrics(pred, np.zeros_like(real))["auc"] is None


def test_reward_auc_by_step_buckets():
    from ssm_gym.eval.prediction import reward_auc_by_step

    real = np.zeros((2, 10), dtype=np.float32)
    real[0, 0] = real[1, 2] = real[0, 6] = 1  # events at steps 1, 3 and 7
    pred = np.zeros((2, 10), dtype=np.float32)
    pred[0, 0], pred[1, 2], pred[0, 6], pred[1, 5] = 0.9, 0.4, 0.1, 0.2  # the step-7 event ranks below a quiet step
    by = reward_auc_by_step(pred, real)
    assert list(by) == ["1", "2-4", "5-8", "9-10"]
    assert by["1"] == 1.0 and by["2-4"] == 1.0 and by["9-10"] is None
    assert by["5-8"] == pytest.approx((6 + 0) / 7)  # above the 6 zeros of the bucket, below the 0.2
