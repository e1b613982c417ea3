"""Does the imagined agent stop at walls? A check of the world model's physics against the truth.

    python -m ssm_gym.eval.wall_stops --checkpoint runs/a/model

N imagined envs start after real history drawn from held-out episodes (`--context-data`, as
`agents.ppo --context-data` starts them) and repeat one forward action for `--horizon` steps,
with the ground-truth maze stepped beside them from the same recorded moments. In the real maze
a forward move into a wall is cancelled, so walking straight on ends with the agent pressed to a
wall and its frame frozen. Reported per action, over the steps where the real move was blocked
and over those where it was not:

- the mean change between consecutive imagined frames (grey levels, 0-255); on blocked forward
  steps the real frame does not change at all, so what the imagined one does is *phantom motion*;
- the share of blocked steps where the imagined frame stays still (changes by less than
  `--still-below` grey levels), i.e. where the model stops the agent too, next to the same share
  on free steps (a model whose imagined world freezes is still on both);
- the imagined frame's distance from the real one;
- the share of blocked steps still, by imagined step (1, 2-4, 5 on): at step 1 the history is
  real; after it the model presses on against the wall from its own frames. A model that stops
  the agent settles there into a still frame (`maze-latent`: 82% from step 5 on); one trained on
  its own imagination keeps its frame moving (`maze-latent-ol`: 1%; session 24).

A model that walks an imagined agent on through walls pays an agent in imagination for walking
forward anywhere, which it then does in the real maze, into the first wall (see the lab notebook,
session 21). `forward_left` and `forward_right` still turn when blocked, so only their distance
from the real frame is comparable across blocked and free steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import gymnasium as gym
import numpy as np
import torch

import ssm_gym  # noqa: F401  (registers the envs)
from ssm_gym.maze.sim import ACTION_NAMES, FORWARD_ACTIONS


@dataclass
class Args:
    checkpoint: Optional[Path] = None
    """World model (default: the shipped model)."""
    context_data: Path = Path("data/maze-val")
    """Real episodes to start from (held-out mazes), recorded by `training.collect` so that the
    ground-truth maze can be rebuilt at each start."""
    context_len: int = 16
    horizon: int = 16
    """Imagined steps per start (agents.ppo's --max-episode-steps)."""
    num_envs: int = 32
    start_batches: int = 2
    """Batches of num_envs real starts."""
    sampling_steps: Optional[int] = 1
    precision: str = "fp32"
    still_below: float = 2.0
    """An imagined frame that changes by less than this (mean grey levels) counts as still."""
    seed: int = 0
    device: str = "cpu"
    json: Optional[Path] = None
    """Also write the results here."""


STEP_WINDOWS = ((1, 1), (2, 4), (5, 10**9))
"""Imagined steps (1-based, inclusive) over which the still share of blocked steps is also reported."""


def frame_change(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute difference per frame (grey levels) of two uint8 batches (N, H, W, C)."""
    return np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(axis=(1, 2, 3))


def repeat_action(env, seed: int, action: int, horizon: int) -> dict[str, np.ndarray]:
    """Repeat `action` for `horizon` steps from the real starts that `seed` draws. Returns
    (horizon, N) arrays: `blocked` (the real agent did not move), the consecutive-frame changes
    `imagined_change` and `real_change`, and `error` (imagined vs real frame)."""
    u = env.unwrapped
    obs, _ = env.reset(seed=seed)
    real = u.real.render()
    pose = u.real.pose.copy()
    out = {k: [] for k in ("blocked", "imagined_change", "real_change", "error")}
    for _ in range(horizon):
        new_obs, *_ = env.step(np.full(env.num_envs, action))
        new_real, new_pose = u.real.render(), u.real.pose.copy()
        out["blocked"].append((new_pose[:, :2] == pose[:, :2]).all(1))
        out["imagined_change"].append(frame_change(new_obs, obs))
        out["real_change"].append(frame_change(new_real, real))
        out["error"].append(frame_change(new_obs, new_real))
        obs, real, pose = new_obs, new_real, new_pose
    return {k: np.stack(v) for k, v in out.items()}


def summarise(runs: dict[str, np.ndarray], still_below: float) -> dict[str, float | None]:
    """The numbers of the table for one action, from `repeat_action`'s arrays (any batching)."""
    b = runs["blocked"]

    def mean(x, m):
        return round(float(x[m].mean()), 2) if m.any() else None

    def still(m):
        return round(float((runs["imagined_change"][m] < still_below).mean()), 3) if m.any() else None

    step = np.arange(1, len(b) + 1)[:, None]  # rows are imagined steps
    by_step = {}
    for lo, hi in STEP_WINDOWS:
        hi = min(hi, len(b))
        if lo <= hi:
            by_step[f"{lo}" if lo == hi else f"{lo}-{hi}"] = still(b & (step >= lo) & (step <= hi))
    return {"blocked_share": round(float(b.mean()), 3),
            "imagined_change_blocked": mean(runs["imagined_change"], b),
            "imagined_change_moving": mean(runs["imagined_change"], ~b),
            "real_change_blocked": mean(runs["real_change"], b),
            "real_change_moving": mean(runs["real_change"], ~b),
            "still_share_blocked": still(b), "still_share_moving": still(~b),
            "error_blocked": mean(runs["error"], b), "error_moving": mean(runs["error"], ~b),
            "still_share_blocked_by_step": by_step}


def main(args: Args) -> dict:
    if args.horizon < 1 or args.num_envs < 1 or args.start_batches < 1:
        raise ValueError("horizon, num_envs and start_batches must be >= 1")
    # reward_mode "real" places the ground-truth maze at every start or raises (strict); one step
    # more than the horizon so that no autoreset replaces a frame
    env = gym.make_vec("SSMWorld-Maze-v0", num_envs=args.num_envs, checkpoint=args.checkpoint, device=args.device,
                       sampling_steps=args.sampling_steps, reward_mode="real", context_data=args.context_data,
                       context_len=args.context_len, max_episode_steps=args.horizon + 1, precision=args.precision)
    out = {"starts": args.num_envs * args.start_batches, "actions": {},
           "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    for action in FORWARD_ACTIONS:
        runs = [repeat_action(env, args.seed + b * args.num_envs, action, args.horizon) for b in range(args.start_batches)]
        merged = {k: np.concatenate([r[k] for r in runs], axis=1) for k in runs[0]}
        out["actions"][ACTION_NAMES[action]] = summarise(merged, args.still_below)
    env.close()

    print(f"{out['starts']} real starts from {args.context_data}, each action repeated {args.horizon} steps; "
          "changes between consecutive frames and distances to the real frame in grey levels (0-255)")
    print(f"{'action':>13} | blocked | imagined change: blocked / moving | real: blocked / moving | "
          f"imagined still: blocked / moving | error: blocked / moving")
    fmt = lambda v: "  -  " if v is None else f"{v:5.2f}"  # noqa: E731
    pct = lambda v: "  -  " if v is None else f"{v:5.1%}"  # noqa: E731
    for name, r in out["actions"].items():
        print(f"{name:>13} | {r['blocked_share']:6.1%} | {fmt(r['imagined_change_blocked']):>15} / "
              f"{fmt(r['imagined_change_moving'])} | {fmt(r['real_change_blocked']):>10} / {fmt(r['real_change_moving'])} | "
              f"{pct(r['still_share_blocked']):>22} / {pct(r['still_share_moving'])} | "
              f"{fmt(r['error_blocked']):>14} / {fmt(r['error_moving'])}")
    steps = out["actions"]["forward"]["still_share_blocked_by_step"]
    print("forward, blocked steps still by imagined step: " + ", ".join(
        f"{k}: {pct(v).strip()}" for k, v in steps.items()))
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    import tyro

    torch.set_grad_enabled(False)
    main(tyro.cli(Args))
