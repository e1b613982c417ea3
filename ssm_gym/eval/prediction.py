"""How well a world model predicts held-out episodes: frames (one-step and open-loop n-step
PSNR) and rewards (the reward head, judged against the real maze's rewards).

    python -m ssm_gym.eval.prediction --checkpoints runs/a/model ssm_gym/checkpoints/maze-cpu \
        --val-dir data/maze-val --episodes 8 --context 32 --horizon 100 --sampling-steps 1 3

The model sees `context` real frames (with the actions that led to them), then predicts the
next `horizon` frames for the real actions two ways:
- one-step (teacher-forced): each frame predicted from the *real* history, then the state is
  advanced on the real frame;
- open-loop: each frame predicted from the model's own previous predictions (what an agent
  training in imagination sees).
Rewards are judged the way the imagined env pays them (1 when the head predicts more than 0.5):
the share of real reward events (touching the target) the head pays for, and the false payouts
per 1,000 steps without one, for the one-step and open-loop predictions and for the head on the
real frames themselves (whole episodes, teacher-forced: the head's own accuracy).

Two more checks say whether the model has learned dynamics at all: the scores of trivial
predictors on the same clips (the last real frame as the next one; the mean context frame as
every future one), and the action sensitivity (the next frame imagined for every action from
the same state and noise: is the one for the action actually taken the closest to the truth?).

And the denoising curve: the real next frame, noised at a few levels sigma, denoised once from
the real history. A denoiser that cannot remove small noise leaves multi-step samples grainy
(every step but the first works at small sigma), whatever its one-step score.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch

from ssm_gym.eval.metrics import psnr
from ssm_gym.maze.dataset import episode_prev_actions, list_episodes, load_episode
from ssm_gym.maze.sim import N_ACTIONS


class Clips(NamedTuple):
    frames: torch.Tensor  # (N, T, 64, 64, 3) uint8
    prev_actions: torch.Tensor  # (N, T) long: the action that led to each frame
    rewards: torch.Tensor  # (N, T) float: the real reward received on arriving at each frame


def load_clips(folder: str | Path, episodes: int, length: int, windows: int = 1) -> Clips:
    """Clips of `length` frames, the actions that led to them and the rewards received on
    arriving at them, from the first `episodes` episodes of a folder that are long enough: the
    first `windows` consecutive non-overlapping stretches of each (episode-major order)."""
    if windows < 1:
        raise ValueError(f"windows must be >= 1, got {windows}")
    files = [p for p, t in list_episodes(folder) if t + 1 >= windows * length][:episodes]
    if not files:
        raise ValueError(f"{folder}: no episode with {windows} x {length} frames")
    eps = [load_episode(p) for p in files]
    cut = lambda x: x[:windows * length].reshape(windows, length, *x.shape[1:])  # noqa: E731
    frames = torch.from_numpy(np.concatenate([cut(e["image"]) for e in eps]))
    prev = np.concatenate([cut(episode_prev_actions(e)) for e in eps])
    rewards = np.concatenate([cut(e["reward"]) for e in eps]).astype(np.float32)
    return Clips(frames, torch.from_numpy(prev), torch.from_numpy(rewards))


def _warmed_up(model, frames: torch.Tensor, prev_actions: torch.Tensor, context: int, after: int, seed: int):
    """Checks that `after` frames follow the context, moves the clips to the model's device and
    warms a state up on the context: ``(frames, prev_actions, device, generator, state)``."""
    total = frames.shape[1]
    if total < context + after:
        raise ValueError(f"need {context + after} frames, got {total}")
    dev = next(model.parameters()).device
    frames, prev_actions = frames.to(dev), prev_actions.to(dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    state = model.init_state(frames.shape[0], dev)
    model.observe_clip(state, frames[:, :context], prev_actions[:, :context])
    return frames, prev_actions, dev, gen, state


@torch.no_grad()
def predict_episodes(model, frames: torch.Tensor, prev_actions: torch.Tensor, context: int, horizon: int,
                     steps: int | None = None, seed: int = 0, reward_from: str = "frame",
                     action_guidance: float | None = None) -> dict[str, np.ndarray]:
    """frames (N, context + horizon, 64, 64, 3) uint8; prev_actions (N, context + horizon) long
    (the action that led to each frame). Returns uint8 arrays `one_step` and `open_loop`
    (N, horizon, 64, 64, 3) and `real`, and the predicted rewards `one_step_reward`,
    `open_loop_reward` (N, horizon) float, read where ``reward_from`` says (see
    ``WorldModel.generate``, as is ``action_guidance``)."""
    frames, prev_actions, _, gen, state = _warmed_up(model, frames, prev_actions, context, horizon, seed)
    open_state = state.clone()
    one_step, open_loop, one_r, open_r = [], [], [], []
    for h in range(context, context + horizon):
        a = prev_actions[:, h]
        frame, reward, _ = model.generate(state.clone(), a, steps=steps, generator=gen, reward_from=reward_from,
                                          action_guidance=action_guidance)
        one_step.append(frame), one_r.append(reward)
        model.observe(state, frames[:, h], a)
        frame, reward, _ = model.generate(open_state, a, steps=steps, generator=gen, reward_from=reward_from,
                                          action_guidance=action_guidance)
        open_loop.append(frame), open_r.append(reward)
    to_np = lambda xs: torch.stack(xs, 1).cpu().numpy()  # noqa: E731
    return {"one_step": to_np(one_step), "open_loop": to_np(open_loop),
            "real": frames[:, context : context + horizon].cpu().numpy(),
            "one_step_reward": to_np(one_r), "open_loop_reward": to_np(open_r)}


@torch.no_grad()
def action_sensitivity(model, frames: torch.Tensor, prev_actions: torch.Tensor, context: int, positions: int = 8,
                       steps: int | None = None, seed: int = 0, action_guidance: float | None = None) -> dict:
    """Does the imagined next frame depend on the action taken? At `positions` consecutive steps
    after `context` real frames (teacher-forced: the state follows the real frames), imagine the
    next frame once for every action, from the same state and the same noise, and compare with the
    real next frame (reached by the action actually taken).

    Returns ``psnr_true_action`` (the prediction for the action taken), ``psnr_other_actions``
    (mean over the other actions), ``true_action_best`` (how often the action taken gives the
    prediction closest to the real frame; chance is 1/N_ACTIONS) and ``psnr_between_actions``
    (mean PSNR between the predictions for two different actions: high means the model ignores
    the action). A world model an agent can learn from has ``true_action_best`` near 1.
    Also ``expected_reward_by_action``: the mean expected reward (the head on the first denoising
    pass, as ``reward_mode="expected"`` pays) of each action over these states, and
    ``expected_reward_argmax_share``: how often each action has the highest. An action favoured
    everywhere is a prior the head learned (touches follow moves), which an agent in imagination
    exploits by repeating it; the envs' ``reward_baseline`` subtracts it."""
    n, k = frames.shape[0], N_ACTIONS
    frames, prev_actions, dev, gen, state = _warmed_up(model, frames, prev_actions, context, positions, seed)
    rows = torch.arange(n, device=dev).repeat_interleave(k)  # env j*k + a: clip j, action a
    acts = torch.arange(k, device=dev).repeat(n)
    true_p, other_p, best, between, rewards = [], [], [], [], []
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    for h in range(context, context + positions):
        noise = torch.randn((n, 1, *model.config.space_shape), generator=gen, device=dev).repeat_interleave(k, 0)
        pred, reward, _ = model.generate(state.index_select(rows), acts, steps=steps, noise=noise,
                                         action_guidance=action_guidance, reward_from="denoiser")
        rewards.append(reward.reshape(n, k).float().cpu().numpy())
        pred = pred.reshape(n, k, *frames.shape[2:]).cpu().numpy()
        real = frames[:, h].cpu().numpy()
        p = psnr(pred, np.repeat(real[:, None], k, 1))  # (n, k)
        taken = prev_actions[:, h].cpu().numpy()
        is_taken = np.arange(k)[None] == taken[:, None]
        true_p.append(p[is_taken]), other_p.append(p[~is_taken].reshape(n, k - 1).mean(1))
        best.append(p.argmax(1) == taken)
        between.append(np.stack([psnr(pred[:, i], pred[:, j]) for i, j in pairs], 1).mean(1))
        model.observe(state, frames[:, h], prev_actions[:, h])
    r = np.concatenate(rewards)
    return {"psnr_true_action": float(np.mean(true_p)), "psnr_other_actions": float(np.mean(other_p)),
            "true_action_best": float(np.mean(best)), "psnr_between_actions": float(np.mean(between)),
            "samples": n * positions, "expected_reward_by_action": [round(float(v), 5) for v in r.mean(0)],
            "expected_reward_argmax_share": [round(float(v), 3) for v in np.bincount(r.argmax(1), minlength=k) / len(r)]}


DENOISE_SIGMAS = (0.05, 0.1, 0.3, 1.0, 5.0)  # small levels (the sampler's last steps) to pure noise


@torch.no_grad()
def denoising_curve(model, frames: torch.Tensor, prev_actions: torch.Tensor, context: int,
                    sigmas: tuple[float, ...] = DENOISE_SIGMAS, positions: int = 4,
                    seed: int = 0) -> dict[str, dict[str, float]]:
    """For each noise level: PSNR of the noised real frame (``input``) and of the model's one-pass
    denoised estimate (``denoised``) against the clean frame, at `positions` consecutive steps
    after `context` real frames, the state following the real frames. Keys are the sigmas as
    strings (JSON). The denoiser is the plain one (no action guidance, whatever the model's
    default): this measures the network, not the sampler."""
    if not sigmas or min(sigmas) <= 0:
        raise ValueError(f"noise levels must be > 0, got {tuple(sigmas)}")
    n = frames.shape[0]
    frames, prev_actions, dev, gen, state = _warmed_up(model, frames, prev_actions, context, positions, seed)
    scores = {s: ([], []) for s in sigmas}
    for h in range(context, context + positions):
        clean = model.to_space(frames[:, h:h + 1])  # (a latent-space model: noised and judged decoded)
        real = frames[:, h:h + 1].cpu().numpy()
        for s in sigmas:
            noisy = clean + s * torch.randn(clean.shape, generator=gen, device=dev)
            out = model(noisy, torch.full((n, 1), s, device=dev), prev_actions[:, h:h + 1], state=state, update="none")
            scores[s][0].append(psnr(model.to_frames(noisy).cpu().numpy(), real))
            scores[s][1].append(psnr(model.to_frames(out.denoised).cpu().numpy(), real))
        model.observe(state, frames[:, h], prev_actions[:, h])
    return {str(s): {"input": float(np.mean(a)), "denoised": float(np.mean(b))} for s, (a, b) in scores.items()}


@torch.no_grad()
def teacher_forced_rewards(model, frames: torch.Tensor, prev_actions: torch.Tensor, batch: int = 4) -> np.ndarray:
    """The reward head on the real frames of whole episodes (N, T) (one parallel pass per
    ``batch`` episodes): what the head makes of the true frames, generation errors aside."""
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(frames), batch):
        f = frames[i:i + batch].to(dev)
        sigma = torch.zeros(f.shape[:2], device=dev)
        out.append(model(f, sigma, prev_actions[i:i + batch].to(dev)).reward.cpu().numpy())
    return np.concatenate(out)


def reward_metrics(pred: np.ndarray, real: np.ndarray, threshold: float = 0.5) -> dict[str, float | None]:
    """Predicted vs real rewards (same shapes), paid as the imagined env pays them (1 above
    ``threshold``): events (real reward > 0.5), the share of them paid (recall), false payouts
    per 1,000 steps without an event, the mean raw prediction at events and elsewhere, and the
    AUC (how often an event's prediction exceeds another step's; 0.5 = no signal). None where
    undefined (no events, or no other steps)."""
    event, paid = real > 0.5, pred > threshold
    quiet = max(int((~event).sum()), 1)
    auc = None
    if event.any() and (~event).any():
        at, other = np.sort(pred[event]), np.sort(pred[~event])
        below = np.searchsorted(other, at, side="left")  # other steps strictly below each event
        ties = np.searchsorted(other, at, side="right") - below
        auc = float((below + 0.5 * ties).sum() / (len(at) * len(other)))
    return {"reward_events": int(event.sum()),
            "reward_recall": float(paid[event].mean()) if event.any() else None,
            "false_payouts_per_1k": 1000.0 * float((paid & ~event).sum()) / quiet,
            "mean_pred_at_events": float(pred[event].mean()) if event.any() else None,
            "mean_pred_elsewhere": float(pred[~event].mean()) if (~event).any() else None,
            "auc": auc}


def reward_auc_by_step(pred: np.ndarray, real: np.ndarray) -> dict[str, float | None]:
    """AUC of (N, H) predicted rewards against real ones within buckets of prediction steps
    (1, 2-4, 5-8, 9-16, ...): how fast the reward signal fades as open-loop predictions drift."""
    h, out = pred.shape[1], {}
    lo, hi = 1, 1
    while lo <= h:
        hi = min(hi, h)
        out[f"{lo}-{hi}" if hi > lo else f"{lo}"] = reward_metrics(pred[:, lo - 1:hi], real[:, lo - 1:hi])["auc"]
        lo, hi = hi + 1, max(4, 2 * hi)
    return out


WINDOW_EDGES = (0, 10, 20, 50, 100, 200, 500, 1000)  # open-loop steps, reported as 1-10, 11-20, 21-50, ...


def by_window(curve: np.ndarray) -> dict[str, float]:
    """Mean of a per-step curve (step 1 first) over the windows of WINDOW_EDGES that it reaches
    (the last one cut at its length): how fidelity holds up over a long imagined stretch."""
    out = {}
    for lo, hi in zip(WINDOW_EDGES[:-1], WINDOW_EDGES[1:]):
        if lo >= len(curve):
            break
        out[f"{lo + 1}-{min(hi, len(curve))}"] = float(np.mean(curve[lo:hi]))
    return out


def trivial_baselines(frames: torch.Tensor, context: int) -> dict[str, float | dict[str, float]]:
    """What a model that has learned no dynamics scores: the next frame predicted as the last real
    frame (one-step), and every future frame as the mean of the context frames (open-loop; also
    by window of steps)."""
    f = frames.numpy()
    real = f[:, context:]
    last = psnr(f[:, context - 1:-1], real)
    mean_ctx = np.repeat(f[:, :context].astype(np.float64).mean(1, keepdims=True).round().astype(np.uint8),
                         real.shape[1], 1)
    mean_curve = psnr(mean_ctx, real).mean(0)
    return {"repeat_last_frame_1step": float(last.mean()), "context_mean_open_loop": float(mean_curve.mean()),
            "context_mean_by_window": by_window(mean_curve)}


def prediction_metrics(pred: dict[str, np.ndarray]) -> dict[str, float | list[float]]:
    """Mean one-step PSNR, the open-loop PSNR curve over the horizon, its last value and its
    means by window of steps."""
    one = psnr(pred["one_step"], pred["real"])
    open_curve = psnr(pred["open_loop"], pred["real"]).mean(0)
    return {"psnr_1step": float(one.mean()), "psnr_open_loop_curve": open_curve.tolist(),
            "psnr_open_loop_mean": float(open_curve.mean()), "psnr_open_loop_last": float(open_curve[-1]),
            "psnr_open_loop_by_window": by_window(open_curve)}


def side_by_side_video(pred: dict[str, np.ndarray], index: int = 0, scale: int = 3) -> np.ndarray:
    """(T, H, W', 3) frames: real | open-loop prediction | one-step prediction, for one episode."""
    row = np.concatenate([pred["real"][index], pred["open_loop"][index], pred["one_step"][index]], axis=2)
    return np.repeat(np.repeat(row, scale, 1), scale, 2)


@dataclass
class Args:
    checkpoints: tuple[Path, ...]
    """Model folders (or shipped models' names) to compare."""
    val_dir: Path = Path("data/maze-val")
    """Held-out episodes (other maze seeds than the training data)."""
    episodes: int = 8
    context: int = 32
    horizon: int = 100
    windows: int = 1
    """Clips per episode: consecutive stretches of context + horizon frames (more reward events
    to judge short horizons on, e.g. --horizon 32 --windows 15)."""
    sampling_steps: tuple[int, ...] = (1, 3)
    """Denoising steps to evaluate (each a row)."""
    action_guidance: tuple[float, ...] = (1.0,)
    """Action guidance weights to evaluate (each a row; 1 = off). Models without the null action
    are evaluated at 1 only."""
    device: str = "cpu"
    seed: int = 0
    reward_from: str = "frame"
    """Where imagined rewards are read: "frame" (the generated frame, as reward_mode="threshold")
    or "denoiser" (the first denoising pass, as reward_mode="expected")."""
    whole_episodes: bool = True
    """Also judge the reward head on the real frames of whole episodes (teacher-forced)."""
    whole_episode_len: int = 1001
    action_positions: int = 8
    """Steps per clip at which the action sensitivity is measured (at most --horizon; 0 = skip it)."""
    denoise_sigmas: tuple[float, ...] = DENOISE_SIGMAS
    """Noise levels of the denoising curve (empty = skip it)."""
    denoise_positions: int = 4
    """Steps per clip at which the denoising curve is measured (at most --horizon; 0 = skip it)."""
    json: Optional[Path] = None
    """Also write the rows as JSON here."""


def _rounded(d: dict, digits: int) -> dict:
    return {k: round(v, digits) if isinstance(v, float) else _rounded(v, digits) if isinstance(v, dict) else v
            for k, v in d.items()}


def main(args: Args) -> list[dict]:
    from ssm_gym.checkpoints import load_world_model

    frames, prev, rewards = load_clips(args.val_dir, args.episodes, args.context + args.horizon, args.windows)
    real_r = rewards[:, args.context:].numpy()
    r3 = lambda d: _rounded(d, 3)  # noqa: E731
    if args.whole_episodes:  # for the head on real frames, all of every episode
        whole, whole_prev, whole_r = load_clips(args.val_dir, args.episodes, args.whole_episode_len)
    rows = [{"baselines": _rounded(trivial_baselines(frames, args.context), 2), "clips": len(frames)}]
    print(json.dumps(rows[-1]), flush=True)
    for ckpt in args.checkpoints:
        model = load_world_model(ckpt, args.device)
        if args.whole_episodes:
            m = reward_metrics(teacher_forced_rewards(model, whole, whole_prev), whole_r.numpy())
            rows.append({"checkpoint": str(ckpt), "rewards": "head on real frames", "frames": whole_r.numel(), **r3(m)})
            print(json.dumps(rows[-1]), flush=True)
        if args.denoise_sigmas and args.denoise_positions > 0:
            curve = denoising_curve(model, frames, prev, args.context, args.denoise_sigmas,
                                    min(args.denoise_positions, args.horizon), args.seed)
            rows.append({"checkpoint": str(ckpt), "denoising_psnr": {k: r3(v) for k, v in curve.items()}})
            print(json.dumps(rows[-1]), flush=True)
        weights = args.action_guidance if model.action_null is not None else (1.0,)
        for steps, w in [(s, w) for s in args.sampling_steps for w in weights]:
            pred = predict_episodes(model, frames, prev, args.context, args.horizon, steps, args.seed, args.reward_from, w)
            m = prediction_metrics(pred)
            rows.append({"checkpoint": str(ckpt), "sampling_steps": steps, "action_guidance": w, "episodes": args.episodes,
                         "clips": len(frames), "reward_from": args.reward_from,
                         "psnr_1step": round(m["psnr_1step"], 2), f"psnr_{args.horizon}step": round(m["psnr_open_loop_last"], 2),
                         "psnr_open_loop_mean": round(m["psnr_open_loop_mean"], 2),
                         "psnr_open_loop_by_window": _rounded(m["psnr_open_loop_by_window"], 2),
                         "one_step": r3(reward_metrics(pred["one_step_reward"], real_r)),
                         "open_loop": r3(reward_metrics(pred["open_loop_reward"], real_r)),
                         "open_loop_auc_by_step": r3(reward_auc_by_step(pred["open_loop_reward"], real_r))})
            if args.action_positions:
                act = action_sensitivity(model, frames, prev, args.context, min(args.action_positions, args.horizon),
                                         steps, args.seed, w)
                rows[-1]["actions"] = r3(act)
            print(json.dumps(rows[-1]), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
