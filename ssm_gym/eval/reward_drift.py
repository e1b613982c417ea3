"""Can an agent in imagination farm the expected reward by repeating one action? Check a model
before training agents in it.

    python -m ssm_gym.eval.reward_drift --checkpoint runs/a/model --context-data data/maze

N imagined envs start after real history drawn from `--context-data` (as `agents.ppo
--context-data` does) and run `--horizon` imagined steps, once with random actions and once
with each action repeated. Reported: the mean expected reward (the head on the first denoising
pass, what `reward_mode="expected"` pays) of each action under random actions, i.e. the action
prior the head learned, and for every repeated action its mean by imagined step and summed over
the episode. A repeated action whose reward rises above its random-action mean is a drift the
model rewards: the agent steers the imagined world into states the model misreads, which a
per-action baseline (the envs' `reward_baseline`) does not remove (see README, Agents).
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
from ssm_gym.maze.sim import ACTION_NAMES, N_ACTIONS


@dataclass
class Args:
    checkpoint: Optional[Path] = None
    """World model (default: the shipped model)."""
    context_data: Path = Path("data/maze")
    """Real episodes to start from (e.g. the model's training data, as agents.ppo uses)."""
    context_len: int = 16
    horizon: int = 16
    """Imagined steps per episode (agents.ppo's --max-episode-steps)."""
    num_envs: int = 16
    random_episodes: int = 6
    """Episodes of random actions (num_envs each) for the per-action means."""
    sampling_steps: Optional[int] = 1
    action_guidance: Optional[float] = None
    seed: int = 0
    device: str = "cpu"
    json: Optional[Path] = None
    """Also write the results here."""


def expected_rewards(env, policy, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """One episode of `horizon` steps in every env: (actions, raw expected rewards), each (horizon, N)."""
    acts, raws = [], []
    for t in range(horizon):
        a = policy(t)
        _, _, _, _, info = env.step(a)
        acts.append(a), raws.append(info["reward_raw"])
    return np.stack(acts), np.stack(raws)


def main(args: Args) -> dict:
    if args.horizon < 1 or args.num_envs < 1 or args.random_episodes < 1:
        raise ValueError("horizon, num_envs and random_episodes must be >= 1")
    env = gym.make_vec("SSMWorld-Maze-v0", num_envs=args.num_envs, checkpoint=args.checkpoint, device=args.device,
                       sampling_steps=args.sampling_steps, action_guidance=args.action_guidance, reward_mode="expected",
                       context_data=args.context_data, context_len=args.context_len, max_episode_steps=args.horizon,
                       autoreset_mode="SameStep")
    rng = np.random.default_rng(args.seed)
    total, count = np.zeros(N_ACTIONS), np.zeros(N_ACTIONS)
    for e in range(args.random_episodes):
        env.reset(seed=args.seed + e * args.num_envs)
        a, r = expected_rewards(env, lambda t: rng.integers(0, N_ACTIONS, args.num_envs), args.horizon)
        np.add.at(total, a.ravel(), r.ravel())
        np.add.at(count, a.ravel(), 1)
    prior = total / np.maximum(count, 1)
    repeated = {}
    for action in range(N_ACTIONS):
        env.reset(seed=args.seed)  # the same real starts for every action
        _, r = expected_rewards(env, lambda t: np.full(args.num_envs, action), args.horizon)  # noqa: B023
        by_step = r.mean(1)
        repeated[ACTION_NAMES[action]] = {"by_step": [round(float(v), 4) for v in by_step],
                                          "episode_sum": round(float(by_step.sum()), 4),
                                          "above_prior_sum": round(float((by_step - prior[action]).sum()), 4)}
    env.close()
    out = {"random_action_mean": {ACTION_NAMES[i]: round(float(prior[i]), 4) for i in range(N_ACTIONS)},
           "repeated": repeated, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    print("mean expected reward per action under random actions (the head's action prior):")
    print("  " + ", ".join(f"{k} {v:.4f}" for k, v in out["random_action_mean"].items()))
    print(f"each action repeated for {args.horizon} imagined steps ({args.num_envs} envs from real starts):")
    for name, r in repeated.items():
        print(f"  {name:>13}: first {r['by_step'][0]:.4f}, last {r['by_step'][-1]:.4f}, episode sum {r['episode_sum']:.3f}, "
              f"sum above its random-action mean {r['above_prior_sum']:+.3f}")
    best = max(repeated, key=lambda k: repeated[k]["above_prior_sum"])
    print(f"an agent paid expected reward minus the per-action mean earns most by repeating {best}")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    import tyro

    torch.set_grad_enabled(False)
    main(tyro.cli(Args))
