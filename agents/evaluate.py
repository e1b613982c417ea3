"""Evaluate agents in the real maze: mean return and standard error over K maze seeds, next to a
random policy and the shortest-path oracle.

    python -m agents.evaluate --agent outputs/agents/ppo-imagination/agent.zip --episodes 16

Seeds are held out from training data (`--first-seed`, default 3,000,000). Every episode has the
same length (`--max-steps`), so returns are comparable across agents.

`--view model --checkpoint M`: the agent still acts in the real maze and is paid by it, but sees,
at every step, world model M's prediction of the real frame from the real history before it (M
re-synced on every real frame): the kind of frame an agent trained in M's imagination learned
from, where the real maze's sharp frames are new to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import gymnasium as gym
import numpy as np
import tyro

import ssm_gym  # noqa: F401
from ssm_gym.maze.policies import make_policy
from ssm_gym.maze.sim import ACTION_NAMES, FORWARD_ACTIONS, N_ACTIONS
# act(observations (N, 64, 64, 3) uint8, episode_starts (N,) bool) -> actions (N,)
ActFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _step(venv, actions: np.ndarray, record: Optional[dict]):
    """One step of a real vector env; with `record`, append the actions and which of them were
    forward moves a wall stopped (the agent did not move)."""
    before = venv.sim.pose[:, :2].copy()
    out = venv.step(actions)
    if record is not None:
        record.setdefault("actions", []).append(actions.copy())
        record.setdefault("blocked", []).append(np.isin(actions, FORWARD_ACTIONS) & (venv.sim.pose[:, :2] == before).all(1))
    return out


def behaviour(record: dict) -> dict:
    """How a policy moved: the share of each action, and of its forward moves the share that walked
    into a wall (cancelled: the agent stays). Agents trained in a world model that lets them walk
    on through walls press against the first wall of a long real episode."""
    a, blocked = np.stack(record["actions"]), np.stack(record["blocked"])
    forward = np.isin(a, FORWARD_ACTIONS)
    return {"action_share": {ACTION_NAMES[k]: round(float((a == k).mean()), 3) for k in range(N_ACTIONS)},
            "forward_blocked_share": round(float(blocked.sum() / max(forward.sum(), 1)), 3)}


def real_returns(act: ActFn, seeds: list[int], max_steps: int, record: Optional[dict] = None) -> np.ndarray:
    """Return of each episode (one per seed, all run together as a vector env); `record`: see `_step`."""
    venv = gym.make_vec("SSMWorld-MazeReal-v0", num_envs=len(seeds), max_episode_steps=max_steps)
    obs, _ = venv.reset(seed=list(seeds))
    total = np.zeros(len(seeds))
    starts = np.ones(len(seeds), dtype=bool)
    for _ in range(max_steps):
        obs, rewards, _, _, _ = _step(venv, np.asarray(act(obs, starts)).reshape(len(seeds)), record)
        total += rewards
        starts[:] = False
    return total


def model_view_returns(act: ActFn, seeds: list[int], max_steps: int, checkpoint, precision: str = "fp32",
                       sampling_steps: Optional[int] = None, record: Optional[dict] = None) -> np.ndarray:
    """``real_returns`` with the agent seeing the world model's prediction of each real frame
    (after the first, which it sees as it is): predict from the real history and the action,
    step the real maze, observe its frame. `record`: see `_step` (the moves in the real maze)."""
    import torch

    from ssm_gym.checkpoints import load_world_model
    from ssm_gym.rollout.engine import RolloutEngine

    n = len(seeds)
    model = load_world_model(checkpoint, "cpu")
    engine = RolloutEngine(model, n, sampling_steps=sampling_steps, seed=seeds[0], precision=precision)
    venv = gym.make_vec("SSMWorld-MazeReal-v0", num_envs=n, max_episode_steps=max_steps)
    view, _ = venv.reset(seed=list(seeds))
    engine.reset(torch.ones(n, dtype=torch.bool), torch.from_numpy(view))
    total = np.zeros(n)
    starts = np.ones(n, dtype=bool)
    for _ in range(max_steps):
        actions = np.asarray(act(view, starts)).reshape(n)
        predicted = engine.predict(torch.from_numpy(actions)).cpu().numpy()
        obs, rewards, _, _, _ = _step(venv, actions, record)
        engine.observe(torch.from_numpy(obs), torch.from_numpy(actions))
        view = predicted
        total += rewards
        starts[:] = False
    return total


def scripted_returns(name: str, seeds: list[int], max_steps: int, record: Optional[dict] = None) -> np.ndarray:
    """Return of a scripted policy (random, oracle) that reads the simulator state; `record`: see `_step`."""
    venv = gym.make_vec("SSMWorld-MazeReal-v0", num_envs=len(seeds), max_episode_steps=max_steps)
    venv.reset(seed=list(seeds))
    sim = venv.sim
    policies = [make_policy(name) for _ in seeds]
    for i, p in enumerate(policies):
        p.reset(sim, i, np.random.default_rng([seeds[i], 3]))
    total = np.zeros(len(seeds))
    for _ in range(max_steps):
        total += _step(venv, np.array([p.act(sim, i) for i, p in enumerate(policies)]), record)[1]
    return total


def sb3_act_fn(agent, deterministic: bool = False) -> ActFn:
    """Wrap a stable-baselines3 (or sb3-contrib recurrent) model as an ActFn."""
    state = {"lstm": None}

    def act(obs: np.ndarray, starts: np.ndarray) -> np.ndarray:
        actions, state["lstm"] = agent.predict(obs, state=state["lstm"], episode_start=starts, deterministic=deterministic)
        return actions

    return act


def load_agent(path: Path):
    """Load a saved SB3 agent (PPO or RecurrentPPO) with SB3's own `load`."""
    from stable_baselines3 import PPO

    if Path(path).is_dir() and (Path(path) / "agent.zip").is_file():  # an `agents.ppo --out-dir` folder
        path = Path(path) / "agent.zip"
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no saved agent (expected an SB3 .zip, or a folder holding agent.zip)")
    try:
        return PPO.load(path, device="cpu")
    except Exception as first:  # a recurrent agent saved by sb3-contrib
        try:
            from sb3_contrib import RecurrentPPO

            return RecurrentPPO.load(path, device="cpu")
        except Exception:
            raise ValueError(f"{path}: not a loadable SB3 PPO/RecurrentPPO agent ({first})") from None


def summary(returns: np.ndarray) -> dict:
    r = np.asarray(returns, dtype=float)
    return {"mean": float(r.mean()), "stderr": float(r.std(ddof=1) / np.sqrt(len(r))) if len(r) > 1 else 0.0,
            "episodes": int(len(r))}


@dataclass
class Args:
    agent: Optional[Path] = None
    """Saved SB3 agent (.zip, or an `agents.ppo` run folder holding agent.zip); omit to evaluate
    only the references."""
    episodes: int = 16
    max_steps: int = 500
    first_seed: int = 3_000_000
    deterministic: bool = False
    view: str = "real"
    """What the agent sees: "real" (the real maze's frames) or "model" (the world model's
    prediction of each real frame, re-synced on every real frame; needs --checkpoint)."""
    checkpoint: Optional[str] = None
    """World model for --view model (a shipped name or a checkpoint folder)."""
    precision: str = "bf16"
    """The world model's precision for --view model ("fp32" or "bf16")."""
    out: Optional[Path] = None
    """Write the results as JSON here."""


def main(args: Args) -> dict:
    if args.view not in ("real", "model"):
        raise SystemExit(f"--view must be 'real' or 'model', got {args.view!r}")
    if args.view == "model" and (args.checkpoint is None or args.agent is None):
        raise SystemExit("--view model needs --agent and the world model to see through (--checkpoint)")
    seeds = list(range(args.first_seed, args.first_seed + args.episodes))
    records = {"random": {}, "oracle": {}}
    res = {name: summary(scripted_returns(name, seeds, args.max_steps, records[name])) for name in records}
    if args.agent is not None:
        act = sb3_act_fn(load_agent(args.agent), args.deterministic)
        records["agent"] = {}
        if args.view == "real":
            res["agent"] = summary(real_returns(act, seeds, args.max_steps, records["agent"]))
        else:
            res["agent"] = summary(model_view_returns(act, seeds, args.max_steps, args.checkpoint, args.precision,
                                                      record=records["agent"]))
    for name, record in records.items():
        res[name]["behaviour"] = behaviour(record)
    view = "" if args.view == "real" else f", the agent seeing {args.checkpoint}'s view of it"
    print(f"real maze, {args.episodes} seeds from {args.first_seed}, {args.max_steps} steps per episode{view}")
    for name, s in res.items():
        b = s.get("behaviour")
        moves = "" if b is None else (f"; forward moves into a wall {b['forward_blocked_share']:.0%}; most frequent action "
                                      f"{max(b['action_share'], key=b['action_share'].get)} "
                                      f"{max(b['action_share'].values()):.0%}")
        print(f"  {name:>7}: return {s['mean']:.2f} +- {s['stderr']:.2f}{moves}")
    # what makes two results comparable (agents.compare checks it)
    res["setting"] = {"episodes": args.episodes, "max_steps": args.max_steps, "first_seed": args.first_seed,
                      "deterministic": args.deterministic, "view": args.view, "checkpoint": args.checkpoint,
                      "precision": args.precision}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main(tyro.cli(Args))
