"""Can an agent in imagination farm the expected reward by repeating one action? Check a model
before training agents in it, against the ground-truth maze.

    python -m ssm_gym.eval.reward_drift --checkpoint runs/a/model --context-data data/maze

N imagined envs start after real history drawn from `--context-data` (as `agents.ppo
--context-data` does) and run `--horizon` imagined steps, once with random actions and once
with each action repeated, every policy from the same real starts and with the same noise.
Reported: the mean expected reward (the head on the first denoising pass, what
`reward_mode="expected"` pays) of each action under random actions, i.e. the action prior the
head learned, and for every repeated action its mean by imagined step and summed over the
episode. A repeated action whose reward rises above its random-action mean is a drift the
model rewards: the agent steers the imagined world into states the model misreads, which a
per-action baseline (the envs' `reward_baseline`) does not remove (see README, Agents).

The truth beside it: the env steps a ground-truth maze from the same recorded moments with the
same actions (`info["reward_real"]`), so every policy's imagined reward sits next to the reward
it really earns.
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
    """Real episodes to start from (e.g. the model's training data, as agents.ppo uses); recorded
    by `training.collect`, so that the ground-truth maze can be rebuilt at each start."""
    context_len: int = 16
    horizon: int = 16
    """Imagined steps per episode (agents.ppo's --max-episode-steps)."""
    num_envs: int = 16
    start_batches: int = 6
    """Batches of num_envs real starts; every policy runs from all of them."""
    sampling_steps: Optional[int] = 1
    action_guidance: Optional[float] = None
    seed: int = 0
    device: str = "cpu"
    json: Optional[Path] = None
    """Also write the results here."""


def run_policy(env, seed: int, policy, horizon: int):
    """One episode of `horizon` steps from the real starts that `seed` draws: (actions, the model's
    raw expected rewards, the real maze's rewards for the same actions), each (horizon, N)."""
    env.reset(seed=seed)
    acts, raws, reals = [], [], []
    for t in range(horizon):
        a = policy(t)
        _, _, _, _, info = env.step(a)
        acts.append(a), raws.append(info["reward_raw"]), reals.append(info["reward_real"])
    return np.stack(acts), np.stack(raws), np.stack(reals)


def main(args: Args) -> dict:
    if args.horizon < 1 or args.num_envs < 1 or args.start_batches < 1:
        raise ValueError("horizon, num_envs and start_batches must be >= 1")
    n = args.num_envs
    # every reset draws real history from context_data with the sub-envs' generators, so a seed
    # gives the same starts (and noise) to every policy; the env steps the real maze beside
    env = gym.make_vec("SSMWorld-Maze-v0", num_envs=n, checkpoint=args.checkpoint, device=args.device,
                       sampling_steps=args.sampling_steps, action_guidance=args.action_guidance, reward_mode="expected",
                       context_data=args.context_data, context_len=args.context_len, max_episode_steps=args.horizon,
                       autoreset_mode="SameStep")

    def run(policy):  # every batch of starts
        runs = [run_policy(env, args.seed + b * n, policy, args.horizon) for b in range(args.start_batches)]
        return tuple(np.concatenate(x, axis=1) for x in zip(*runs))  # (horizon, N * batches) each

    rng = np.random.default_rng(args.seed + 1)
    a, raw, real = run(lambda t: rng.integers(0, N_ACTIONS, n))
    prior = np.array([raw[a == k].mean() if (a == k).any() else 0.0 for k in range(N_ACTIONS)])
    real_prior = np.array([real[a == k].mean() if (a == k).any() else 0.0 for k in range(N_ACTIONS)])

    def summary(raw, real) -> dict:
        sums = real.sum(0)
        return {"episode_sum": round(float(raw.mean(1).sum()), 4), "real_episode_sum": round(float(sums.mean()), 4),
                "real_episode_sum_se": round(float(sums.std(ddof=1) / np.sqrt(len(sums))), 4) if len(sums) > 1 else 0.0}

    out = {"random_action_mean": {ACTION_NAMES[k]: round(float(prior[k]), 4) for k in range(N_ACTIONS)},
           "real_random_action_mean": {ACTION_NAMES[k]: round(float(real_prior[k]), 4) for k in range(N_ACTIONS)},
           "random": summary(raw, real), "repeated": {}, "starts": n * args.start_batches,
           "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    for action in range(N_ACTIONS):
        _, raw, real = run(lambda t: np.full(n, action))  # noqa: B023
        by_step = raw.mean(1)
        out["repeated"][ACTION_NAMES[action]] = {
            "by_step": [round(float(v), 4) for v in by_step], **summary(raw, real),
            "above_prior_sum": round(float((by_step - prior[action]).sum()), 4)}
    env.close()

    print(f"{out['starts']} real starts, {args.horizon} imagined steps each; model = expected reward (what "
          "reward_mode='expected' pays), real = the ground-truth maze from the same moments")
    print("per action under random actions, model vs real:")
    print("  " + ", ".join(f"{ACTION_NAMES[k]} {prior[k]:.4f} vs {real_prior[k]:.4f}" for k in range(N_ACTIONS)))
    print(f"{'policy':>13} | model, per episode | real, per episode | model, first -> last step | above its random mean")
    r = out["random"]
    print(f"{'random':>13} | {r['episode_sum']:18.3f} | {r['real_episode_sum']:7.3f} +- {r['real_episode_sum_se']:.3f} |")
    for name, r in out["repeated"].items():
        print(f"{name:>13} | {r['episode_sum']:18.3f} | {r['real_episode_sum']:7.3f} +- {r['real_episode_sum_se']:.3f} | "
              f"{r['by_step'][0]:.4f} -> {r['by_step'][-1]:.4f}        | {r['above_prior_sum']:+.3f}")
    best = max(out["repeated"], key=lambda k: out["repeated"][k]["above_prior_sum"])
    print(f"an agent paid expected reward minus the per-action mean earns most by repeating {best}")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    import tyro

    torch.set_grad_enabled(False)
    main(tyro.cli(Args))
