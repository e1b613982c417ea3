"""Model-predictive control with the world model: the cross-entropy method over action sequences.

    python -m agents.plan --checkpoint runs/maze-cpu/model --episodes 4 --max-steps 200

At every real step the planner forks the engine's state once per candidate sequence, imagines
`horizon` steps for all candidates in one batch, scores them by predicted reward, refits a
per-step action distribution to the best ones (`iterations` times) and takes the first action
of the best sequence in the real maze; the model is then re-synced on the real frame.

Imagined rewards are paid as `SSMWorld-Maze-v0` pays them (`--reward-mode`): by default 1 where
the head on the generated frame reads above the threshold, else 0. Scoring the head's raw value
(before session 27) let the planner chase its noise, 0.01-0.05 on frames with no target in
reach: it steered towards what the head read as slightly nearer a target. With thresholded
rewards a step where no candidate is paid leaves the plans tied, and the planner takes a
uniformly random first action: it acts as a random policy except where the model shows a touch
within the horizon, which the shipped models do one or two steps ahead
(`python -m ssm_gym.eval.reward_sight`), so it is not yet better than random (README, Agents).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import tyro
from tqdm.auto import tqdm

import ssm_gym  # noqa: F401
from agents.evaluate import scripted_returns, summary
from ssm_gym.checkpoints import load_world_model
from ssm_gym.envs.world_model_env import REWARD_THRESHOLD, check_reward_mode, pay
from ssm_gym.maze.sim import N_ACTIONS
from ssm_gym.rollout.engine import RolloutEngine
from ssm_gym.train.config import config_to_json


def cem_plan(engine, env: int, horizon: int, population: int, elites: int, iterations: int,
             rng: np.random.Generator, smoothing: float = 0.2, discount: float = 0.95,
             score: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> tuple[int, float]:
    """Best first action for env `env` of `engine` (anything with `fork(idx)` and `step(actions)`
    returning (frames, rewards, terminated)), and the predicted discounted return of the best
    sequence. Discounting prefers reward sooner (a receding-horizon plan would otherwise put it
    off); imagined episodes stop collecting reward once they terminate. `score` maps the engine's
    raw rewards (population,) to what a step pays (default: as they are). Ties keep the earliest
    sequence, so with no sequence paid the first action is a draw from the uniform prior."""
    probs = np.full((horizon, N_ACTIONS), 1.0 / N_ACTIONS)
    best_seq, best_ret = None, -np.inf
    for _ in range(iterations):
        seqs = np.stack([[rng.choice(N_ACTIONS, p=probs[h]) for h in range(horizon)] for _ in range(population)])
        if best_seq is not None:
            seqs[0] = best_seq  # keep the incumbent
        sim = engine.fork(torch.full((population,), env, dtype=torch.long))
        total, alive = np.zeros(population), np.ones(population, dtype=bool)
        for h in range(horizon):
            _, rewards, term = sim.step(torch.from_numpy(seqs[:, h]))
            rewards = np.asarray(torch.as_tensor(rewards).float().cpu())
            total += discount**h * (rewards if score is None else score(rewards)) * alive
            alive &= ~np.asarray(torch.as_tensor(term).cpu(), dtype=bool)
        order = np.argsort(-total, kind="stable")
        if total[order[0]] > best_ret:
            best_seq, best_ret = seqs[order[0]].copy(), float(total[order[0]])
        top = seqs[order[:elites]]
        counts = np.stack([np.bincount(top[:, h], minlength=N_ACTIONS) for h in range(horizon)]) / elites
        probs = (1 - smoothing) * counts + smoothing * probs
    return int(best_seq[0]), best_ret


@dataclass
class Args:
    checkpoint: Optional[Path] = None
    """World model: a folder or a shipped model's name (default: the shipped default model, ssm_gym.checkpoints.DEFAULT)."""
    episodes: int = 4
    max_steps: int = 200
    first_seed: int = 3_000_000
    horizon: int = 8
    population: int = 32
    elites: int = 4
    iterations: int = 2
    sampling_steps: Optional[int] = 1
    action_guidance: Optional[float] = None
    """Classifier-free guidance on the action (None = the model's default; see WorldModel.generate)."""
    reward_mode: Literal["threshold", "soft", "expected"] = "threshold"
    """Imagined rewards, as SSMWorld-Maze-v0 pays them: "threshold" 1 where the head on the generated
    frame reads above --reward-threshold, else 0; "soft" that reading clipped to [0, 1]; "expected" the head's expected reward from
    history and action (the first denoising pass), clipped to [0, 1]."""
    reward_threshold: Optional[float] = None
    """With --reward-mode threshold: the head's value above which an imagined step pays 1 (default:
    the env's, 0.5)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """The model's precision while imagining: "bf16" about doubles the imagined steps per second on a
    CPU with AVX-512 BF16 (see ssm_gym/rollout/engine.py; the forks keep it)."""
    threads: Optional[int] = None
    """torch threads (default: torch's choice)."""
    seed: int = 0
    out: Optional[Path] = None
    """Also write the results (returns per episode, mean, standard error, settings) to this JSON file."""


def run_planner(model, seed: int, args: Args, bar: Optional[tqdm] = None) -> float:
    real = gym.make("SSMWorld-MazeReal-v0", max_episode_steps=args.max_steps)
    obs, _ = real.reset(seed=seed)
    engine = RolloutEngine(model, 1, sampling_steps=args.sampling_steps, seed=seed,
                           reward_from=check_reward_mode(args.reward_mode), action_guidance=args.action_guidance,
                           precision=args.precision)
    engine.reset(torch.ones(1, dtype=torch.bool), torch.from_numpy(obs)[None])
    rng = np.random.default_rng([args.seed, seed])
    threshold = REWARD_THRESHOLD if args.reward_threshold is None else args.reward_threshold
    total = 0.0
    for _ in range(args.max_steps):
        a, _ = cem_plan(engine, 0, args.horizon, args.population, args.elites, args.iterations, rng,
                        score=lambda raw: pay(raw, args.reward_mode, threshold))
        obs, r, _, trunc, _ = real.step(a)
        total += r
        if bar is not None:
            bar.update(1)
            bar.set_postfix(seed=seed, episode_return=total)
        engine.observe(torch.from_numpy(obs)[None], torch.tensor([a]))
        if trunc:
            break
    return total


def main(args: Args) -> dict:
    if args.reward_threshold is not None and args.reward_mode != "threshold":
        raise ValueError(f"--reward-threshold applies to --reward-mode threshold, not {args.reward_mode!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_world_model(args.checkpoint)
    seeds = list(range(args.first_seed, args.first_seed + args.episodes))
    with tqdm(total=len(seeds) * args.max_steps, desc="real steps (planning)", unit="step") as bar:
        returns = [run_planner(model, s, args, bar) for s in seeds]
    res = {"planner": summary(returns), "random": summary(scripted_returns("random", seeds, args.max_steps))}
    for name, s in res.items():
        print(f"{name:>8}: real-maze return {s['mean']:.2f} +- {s['stderr']:.2f} ({s['episodes']} episodes)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**res, "planner_returns": returns, "seeds": seeds,
                                        "args": config_to_json(args)}, indent=2))
    return res


if __name__ == "__main__":
    main(tyro.cli(Args))
