"""Re-fit the reward and termination head on what it reads in imagination (training.tune_reward_head).

An agent trained in `SSMWorld-Maze-v0` is paid by the reward head read on each imagined frame.
Session 30 measured that head along imagined episodes of 8 steps: it paid 12 of 13 touches on the
first imagined step and 7 of 58 on steps 3-8, while an agent paid the real maze's reward on the
same imagined frames reached 83% of the real-trained agent's return (62% with the head). The
frames carry enough; the head, trained mostly on real histories, does not read them out there.

Here the network is frozen and only the head (``WorldModel.head``: two linear layers on the
mean of the last layer's tokens) is fitted again, on the inputs it receives in imagination:
from a real context of recorded frames, the model imagines ``horizon`` steps with the recorded
actions (as `SSMWorld-Maze-v0` does, the head read on each generated frame), and each imagined
step is labelled with the recorded reward and termination. Windows are drawn around every
recorded touch (the touch at a random imagined step) and at random places; the head's inputs on
the real context frames are kept in the fit, so it still reads real frames (the planner's
re-sync, the env's context). The head does not feed back into the frames, so the old and the new
head can be compared on exactly the same imagined steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ssm_gym.eval.prediction import reward_metrics
from ssm_gym.maze.dataset import context_window, episode_prev_actions, load_episode
from ssm_gym.rollout.engine import RolloutEngine


@dataclass
class HeadInputs:
    """What the head read in imagined windows, with the recorded labels. W windows, H imagined
    steps, C real context frames, D model width."""
    imagined: Tensor  # (W, H, D) float32: the head's input on imagined step 1..H
    rewards: Tensor  # (W, H) float32: the recorded reward of those steps
    terminals: Tensor  # (W, H) float32
    real: Tensor  # (W, C, D) float32: the head's input on the real context frames
    real_rewards: Tensor  # (W, C)
    real_terminals: Tensor  # (W, C)

    def __len__(self) -> int:
        return self.imagined.shape[0]

    @staticmethod
    def cat(parts: Sequence["HeadInputs"]) -> "HeadInputs":
        return HeadInputs(*(torch.cat([getattr(p, f) for p in parts]) for f in HeadInputs.__dataclass_fields__))


def head_windows(rewards: np.ndarray, context: int, horizon: int, rng: np.random.Generator,
                 per_touch: int = 1, random_windows: int = 0) -> list[int]:
    """Where windows end their real context (index of the last real frame) in an episode with
    ``rewards`` (T,): ``per_touch`` per recorded touch, each placing the touch at a different
    random imagined step 1..horizon, and ``random_windows`` anywhere. Only windows with
    ``context`` real frames and ``horizon`` recorded steps after them; a touch too near the
    episode's start or end gets fewer. ``per_touch`` above ``horizon`` gives ``horizon``."""
    if context < 1 or horizon < 1 or per_touch < 0 or random_windows < 0:
        raise ValueError(f"need context, horizon >= 1 and counts >= 0, got {context}, {horizon}, {per_touch}, {random_windows}")
    lo, hi = context - 1, len(rewards) - 1 - horizon  # last real frame s: s - context + 1 >= 0, s + horizon <= T - 1
    if hi < lo:
        return []
    ends = []
    for t in np.flatnonzero(rewards > 0.5):
        ks = rng.permutation(horizon)[:per_touch] + 1
        ends += [int(t - k) for k in ks if lo <= t - k <= hi]
    ends += rng.integers(lo, hi + 1, size=random_windows).tolist()
    return ends


class _HeadInputTap:
    """Records the input of every call of ``model.head`` while active."""

    def __init__(self, head: nn.Module):
        self.calls: list[Tensor] = []
        self._hook = head.register_forward_pre_hook(lambda _m, args: self.calls.append(args[0].detach()))

    def close(self) -> None:
        self._hook.remove()


@torch.no_grad()
def imagine_head_inputs(model, windows: Iterable[tuple[dict, int]], context: int, horizon: int,
                        batch: int = 64, sampling_steps: int | None = None, precision: str = "fp32",
                        action_guidance: float | None = None, seed: int = 0,
                        progress: str | None = None) -> HeadInputs:
    """Run the model over ``windows`` ((episode, index of the last real frame) pairs): warm up on
    ``context`` real frames, imagine ``horizon`` steps with the recorded actions, and collect the
    head's inputs (see :class:`HeadInputs`). Runs as `SSMWorld-Maze-v0` does (a RolloutEngine,
    its sampling steps, precision and action guidance); the head is read on each generated
    frame. Under bf16 the env reads the head in bf16 and these inputs are kept in fp32, so a head
    applied to them reads within bf16 rounding of what the env pays. progress: a label for a
    progress bar of windows (None: quiet)."""
    tap = _HeadInputTap(model.head)
    parts, b0 = [], 0
    bar = tqdm(desc=progress, unit="windows", disable=progress is None)
    try:
        for chunk in _batches(windows, batch):  # episodes are dropped once their windows are sliced
            n = len(chunk)
            frames, ctx_acts, acts, rew, term, rr, rt = [], [], [], [], [], [], []
            for ep, s in chunk:
                prev = episode_prev_actions(ep)  # prev[t]: the action that led to frame t
                if s - context + 1 < 0 or s + horizon >= len(prev):
                    raise ValueError(f"window ending at frame {s} needs {context} frames before and {horizon} after "
                                     f"(episode of {len(prev)} frames)")
                f, a = context_window(ep, s, context, prev)
                frames.append(f), ctx_acts.append(a)
                acts.append(prev[s + 1:s + horizon + 1])
                terminal = ep.get("terminal", np.zeros(len(prev), dtype=bool))  # optional in a dataset
                rew.append(ep["reward"][s + 1:s + horizon + 1]), term.append(terminal[s + 1:s + horizon + 1])
                rr.append(ep["reward"][s - context + 1:s + 1]), rt.append(terminal[s - context + 1:s + 1])
            eng = RolloutEngine(model, n, sampling_steps=sampling_steps, seed=seed + b0, precision=precision,
                                action_guidance=action_guidance)
            b0 += n
            tap.calls.clear()
            eng.reset(torch.ones(n, dtype=torch.bool), torch.from_numpy(np.stack(frames)),
                      torch.from_numpy(np.stack(ctx_acts)))
            real = tap.calls[-1].float().cpu()  # (n, context, D): the warm-up on the real frames
            acts = torch.from_numpy(np.stack(acts))
            imagined = []
            for j in range(horizon):
                tap.calls.clear()
                eng.step(acts[:, j])
                # the last head call of a step is the read on the generated frame (the env's reward)
                # (generate always ends by observing the generated frame, whatever the guidance,
                # the denoising steps or a compressed state; the engine here steps all rows at once)
                imagined.append(tap.calls[-1][:, 0].float().cpu())
            f32 = lambda xs: torch.from_numpy(np.stack(xs).astype(np.float32))  # noqa: E731
            parts.append(HeadInputs(torch.stack(imagined, 1), f32(rew), f32(term), real, f32(rr), f32(rt)))
            bar.update(n)
    finally:
        tap.close()
        bar.close()
    if not parts:
        raise ValueError("no windows to imagine (episodes too short, or no touches and no random windows)")
    return HeadInputs.cat(parts)


def _batches(items: Iterable, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def episode_windows(paths: Sequence[Path], context: int, horizon: int, per_touch: int, random_per_episode: int,
                    seed: int = 0) -> Iterable[tuple[dict, int]]:
    """(episode, last real frame) windows over the recorded episodes at ``paths`` (loaded one at a time)."""
    rng = np.random.default_rng(seed)
    for p in paths:
        ep = load_episode(p)
        for s in head_windows(ep["reward"], context, horizon, rng, per_touch, random_per_episode):
            yield ep, s


def head_loss(head: nn.Module, x: Tensor, rewards: Tensor, terminals: Tensor) -> Tensor:
    """The world model's own head loss (squared reward error + termination cross-entropy), per sample."""
    out = head(x)
    return (out[..., 0] - rewards).pow(2) + F.binary_cross_entropy_with_logits(out[..., 1], terminals, reduction="none")


def fit_head(head: nn.Module, data: HeadInputs, steps: int = 2000, lr: float = 1e-3, batch: int = 4096,
             real_weight: float = 0.5, weight_decay: float = 0.01, seed: int = 0) -> list[float]:
    """Fit ``head`` (in place, from its current weights) on the imagined steps of ``data`` and, with
    weight ``real_weight``, its real context frames. Returns the loss every 100 steps."""
    if steps < 1 or batch < 1 or not 0.0 <= real_weight:
        raise ValueError(f"need steps, batch >= 1 and real_weight >= 0, got {steps}, {batch}, {real_weight}")
    d = data.imagined.shape[-1]
    xi, ri, ti = data.imagined.reshape(-1, d), data.rewards.reshape(-1), data.terminals.reshape(-1)
    xr, rr, tr = data.real.reshape(-1, d), data.real_rewards.reshape(-1), data.real_terminals.reshape(-1)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 0.1)
    losses = []
    head.train()
    with torch.enable_grad():
        for step in range(steps):
            i = torch.randint(len(xi), (batch,), generator=gen)
            loss = head_loss(head, xi[i], ri[i], ti[i]).mean()
            if real_weight > 0:
                j = torch.randint(len(xr), (batch,), generator=gen)
                loss = loss + real_weight * head_loss(head, xr[j], rr[j], tr[j]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 100 == 0 or step == steps - 1:
                losses.append(float(loss.detach()))
    head.eval()
    return losses


@torch.no_grad()
def head_report(head: nn.Module, data: HeadInputs, threshold: float = 0.5) -> dict:
    """How ``head`` pays on ``data``'s imagined steps, by imagined step and pooled, and on the real
    context frames: touches, share paid above ``threshold``, false payouts per 1,000 steps
    without a touch, AUC (touch vs no touch at the same step)."""
    def row(x, r):
        m = reward_metrics(head(x)[..., 0].float().numpy().ravel(), r.numpy().ravel(), threshold)
        return {"touches": m["reward_events"], "paid": m["reward_recall"],
                "false_per_1k": m["false_payouts_per_1k"], "auc": m["auc"]}
    by_step = {str(j + 1): row(data.imagined[:, j], data.rewards[:, j]) for j in range(data.imagined.shape[1])}
    h = data.imagined.shape[1]
    return {"by_step": by_step,
            "steps_1_2": row(data.imagined[:, :min(2, h)], data.rewards[:, :min(2, h)]),
            "steps_3_on": row(data.imagined[:, 2:], data.rewards[:, 2:]) if h > 2 else None,
            "imagined": row(data.imagined, data.rewards),
            "real": row(data.real, data.real_rewards)}
