"""Where do two world models disagree? One drives SSMWorld-Maze-v0, the other follows as an
ensemble member; random actions from real starts in held-out mazes, the real maze beside them.

    python examples/ensemble_disagreement.py --driver maze-latent-ol --member maze-latent-walls

Prints the mean disagreement (mean absolute pixel difference in [0, 1] between the member's
prediction and the frame shown) by action (forward moves split by whether the real maze let
them through) and by imagined step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import tyro

import ssm_gym  # noqa: F401
from ssm_gym.maze.sim import FORWARD_ACTIONS


@dataclass
class Args:
    driver: str = "maze-latent-ol"
    member: str = "maze-latent-walls"
    context_data: Path = Path("data/maze-val")
    num_envs: int = 32
    horizon: int = 16
    episodes: int = 2
    """Episodes per env (each after 16 real frames)."""
    seed: int = 0


def main(args: Args) -> dict:
    torch.set_num_threads(1)
    env = gym.make_vec("SSMWorld-Maze-v0", num_envs=args.num_envs, checkpoint=args.driver, ensemble=[args.member],
                       context_data=args.context_data, context_len=16, max_episode_steps=args.horizon,
                       precision="bf16", autoreset_mode="SameStep")
    env.reset(seed=args.seed)
    real, rng = env.unwrapped.real, np.random.default_rng(args.seed)
    step, action, moved, d = [], [], [], []
    for t in range(args.horizon * args.episodes):
        a = rng.integers(0, 6, args.num_envs)
        before = real.pose[:, :2].copy()
        info = env.step(a)[-1]
        step.append(np.full(args.num_envs, t % args.horizon + 1))
        action.append(a)
        moved.append((real.pose[:, :2] != before).any(1))
        d.append(info["disagreement"])
    step, action, moved, d = map(np.concatenate, (step, action, moved, d))
    fwd = np.isin(action, FORWARD_ACTIONS)
    groups = {"all": np.ones_like(fwd), "forward, moved": fwd & moved, "forward, blocked by a wall": fwd & ~moved,
              "turn": np.isin(action, [2, 3]), "no-op": action == 0}
    rows = {k: float(d[m].mean()) if m.any() else float("nan") for k, m in groups.items()}
    print(f"{args.driver} driving, {args.member} following: mean disagreement (mean |pixel difference| in [0, 1])")
    for k, v in rows.items():
        print(f"  {k:>28}: {v:.4f}")
    shown = sorted({s for s in (1, 2, 4, 8, args.horizon) if s <= args.horizon})
    print("  by imagined step: " + ", ".join(f"{s}: {d[step == s].mean():.4f}" for s in shown))
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
