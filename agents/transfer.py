"""Where does training in imagination break? Score agents on real and on imagined frames, with
the truth as the reward in both.

    python -m agents.transfer --agents outputs/agents/ppo/agent.zip outputs/agents/ppo-real/agent.zip \
        --checkpoint runs/a/model --context-data data/maze

Every agent, and a random policy, acts for `--horizon` steps from the same recorded moments of
`--context-data` (after `--context-len` real frames), twice: seeing the real maze's frames
(`SSMWorld-MazeReal-v0` started there), and seeing the world model's imagined frames while a
ground-truth maze follows its actions (`SSMWorld-Maze-v0`'s `info["reward_real"]`). Reported for
each: the real reward per episode and how often it takes each action.

On the imagined frames it also reports how the world model's reward head lines up with the real
touches along those episodes (`head`): the share of real touches it pays (above
`--reward-threshold`) on their step and within one step, payouts with no real touch within a
step, and the touches paid by imagined step. Session 30 found this the limit of the best model:
paid the true reward on its frames agents reach 83% of the real agents, paid by its head 62%,
which pays almost every touch on the first imagined step and few after the second.

How to read it: an agent trained in the real maze that earns as much on imagined frames as on real
ones finds in the imagined frames what it uses in the real ones; one that falls to random there,
or repeats one action, does not. An agent trained in imagination (say with `--reward-mode real`,
true rewards) that beats random on imagined frames but not on real ones learned the model's
frames, not the maze; one that repeats a single action in both learned nothing from what it saw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import gymnasium as gym
import numpy as np
import tyro

import ssm_gym  # noqa: F401  (registers the envs)
from agents.evaluate import ActFn, load_agent, sb3_act_fn
from ssm_gym.eval.prediction import reward_metrics
from ssm_gym.maze.sim import ACTION_NAMES, N_ACTIONS


@dataclass
class Args:
    agents: tuple[Path, ...] = ()
    """Saved SB3 agents (.zip); a random policy is always scored beside them."""
    checkpoint: Optional[Path] = None
    """World model for the imagined frames: a folder or a shipped model's name (default: the shipped default model, ssm_gym.checkpoints.DEFAULT)."""
    context_data: Path = Path("data/maze")
    """Recorded episodes to start from (a `training.collect` folder)."""
    context_len: int = 16
    horizon: int = 16
    """Steps per episode (the imagined horizon agents.ppo trains on with --max-episode-steps)."""
    num_envs: int = 16
    batches: int = 8
    """Batches of num_envs starts; every policy on both kinds of frames starts from the same ones."""
    sampling_steps: Optional[int] = 1
    action_guidance: Optional[float] = None
    deterministic: bool = False
    """Act with the policy's most likely action instead of sampling (as agents.evaluate)."""
    reward_threshold: float = 0.5
    """The head pays a step whose reading is above this (SSMWorld-Maze-v0's reward_threshold), for
    the head's report on the imagined frames."""
    seed: int = 0
    device: str = "cpu"
    json: Optional[Path] = None
    """Also write the results here."""


def run(env, act: ActFn, args: Args) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray], np.ndarray, np.ndarray]:
    """Real reward of every episode (batches x num_envs) and the action counts. `env` is either
    vector env; the reward read is the real maze's in both (for the imagined one, the truth that
    follows its actions, since it is reset from context_data starts and paid with reward_mode "real").
    Also, per episode and step (episodes, horizon): the world model's head reading (None for the
    real maze), the real reward, and whether the step is still in the row's first episode."""
    returns, counts, raws, reals, ends = [], np.zeros(N_ACTIONS, dtype=np.int64), [], [], []
    for b in range(args.batches):
        obs, _ = env.reset(seed=args.seed + b * args.num_envs)
        total = np.zeros(args.num_envs)
        starts = np.ones(args.num_envs, dtype=bool)
        for _ in range(args.horizon):
            a = np.asarray(act(obs, starts)).reshape(args.num_envs)
            obs, rewards, terminated, truncated, info = env.step(a)
            total += rewards
            counts += np.bincount(a, minlength=N_ACTIONS)
            starts[:] = False
            reals.append(np.asarray(rewards, dtype=float))
            ends.append(np.asarray(terminated) | np.asarray(truncated))
            if "reward_raw" in info:
                raws.append(np.asarray(info["reward_raw"], dtype=float))
        returns.append(total)

    def per_episode(steps: list) -> np.ndarray:  # (batches * horizon, N) -> (batches * N, horizon)
        x = np.stack(steps).reshape(args.batches, args.horizon, args.num_envs)
        return x.transpose(0, 2, 1).reshape(-1, args.horizon)

    # a step belongs to the row's first episode until that episode ends (an imagined one can end
    # early, when the termination head fires; the next episode then starts in the same row)
    ended = per_episode(ends).astype(bool)
    first = np.ones_like(ended)
    first[:, 1:] = ~np.logical_or.accumulate(ended, axis=1)[:, :-1]
    return np.concatenate(returns), counts, per_episode(raws) if raws else None, per_episode(reals), first


def head_recall(raw: np.ndarray, real: np.ndarray, threshold: float, valid: Optional[np.ndarray] = None) -> dict:
    """How a reward head's readings raw (episodes, steps) line up with the real rewards (same
    shape; a touch is > 0.5): touches; the share paid (raw above threshold) on their step and
    within one step of it in the same episode; payouts with no touch within one step, per 1,000
    steps (all steps: touches are rare); the AUC of the reading (``reward_metrics``); and
    [touches, paid on the step] by step. valid (same shape, bool): the steps to count (the rest of
    a row after its episode ended early)."""
    valid = np.ones(real.shape, bool) if valid is None else valid
    touch, paid = (real > 0.5) & valid, (raw > threshold) & valid

    def near(x: np.ndarray) -> np.ndarray:  # x or its neighbour step inside the episode
        out = x.copy()
        out[:, 1:] |= x[:, :-1]
        out[:, :-1] |= x[:, 1:]
        return out

    n, on_step = int(touch.sum()), reward_metrics(raw[valid], real[valid], threshold)  # recall and AUC on the step
    return {"touches": n, "steps": int(valid.sum()),
            "paid_on_step": on_step["reward_recall"],
            "paid_within_one": float((near(paid) & touch).sum() / n) if n else None,
            "unmatched_payouts_per_1k_steps": 1000.0 * float((paid & ~near(touch)).sum()) / max(int(valid.sum()), 1),
            "auc": on_step["auc"],
            "by_step": [[int(touch[:, k].sum()), int((paid & touch)[:, k].sum())] for k in range(raw.shape[1])]}


def main(args: Args) -> dict:
    if args.horizon < 1 or args.num_envs < 1 or args.batches < 1:
        raise ValueError("horizon, num_envs and batches must be >= 1")
    common = dict(num_envs=args.num_envs, context_data=args.context_data, context_len=args.context_len,
                  max_episode_steps=args.horizon, autoreset_mode="SameStep")
    envs = {"real frames": gym.make_vec("SSMWorld-MazeReal-v0", **common),
            "imagined frames": gym.make_vec("SSMWorld-Maze-v0", checkpoint=args.checkpoint, device=args.device,
                                            sampling_steps=args.sampling_steps, action_guidance=args.action_guidance,
                                            reward_mode="real", **common)}
    policies: dict[str, object] = {str(p): p for p in args.agents}
    policies["random"] = None
    out: dict = {"policies": {}, "episodes": args.batches * args.num_envs,
                 "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    out["settings"]["agents"] = [str(p) for p in args.agents]
    for name, path in policies.items():
        out["policies"][name] = {}
        agent = None if path is None else load_agent(path)
        for frames, env in envs.items():
            if agent is None:
                rng = np.random.default_rng(args.seed)
                act: ActFn = lambda obs, starts: rng.integers(0, N_ACTIONS, len(obs))  # noqa: E731, B023
            else:
                act = sb3_act_fn(agent, args.deterministic)
            returns, counts, raw, real, first = run(env, act, args)
            out["policies"][name][frames] = {
                "mean": round(float(returns.mean()), 4),
                "stderr": round(float(returns.std(ddof=1) / np.sqrt(len(returns))), 4) if len(returns) > 1 else 0.0,
                "action_share": {ACTION_NAMES[k]: round(float(c / counts.sum()), 3) for k, c in enumerate(counts)}}
            if raw is not None:
                out["policies"][name]["head"] = head_recall(raw, real, args.reward_threshold, first)
    for env in envs.values():
        env.close()

    print(f"real reward per {args.horizon}-step episode ({out['episodes']} episodes from recorded moments of "
          f"{args.context_data}), seeing real or imagined frames; most frequent action in brackets")
    print(f"{'policy':>40} | {'real frames':>24} | {'imagined frames':>24}")
    for name, r in out["policies"].items():
        cells = []
        for frames in envs:
            c = r[frames]
            top = max(c["action_share"], key=c["action_share"].get)
            cells.append(f"{c['mean']:.3f} +- {c['stderr']:.3f} ({top} {c['action_share'][top]:.0%})")
        print(f"{name[-40:]:>40} | {cells[0]:>24} | {cells[1]:>24}")
    print(f"the head on the imagined frames (paid above {args.reward_threshold}): real touches paid on their step / "
          f"within one step, payouts with no touch within one step per 1k steps; paid by imagined step")
    for name, r in out["policies"].items():
        h = r["head"]
        share = "-" if not h["touches"] else f"{h['paid_on_step']:.0%} / {h['paid_within_one']:.0%}"
        steps = ", ".join(f"{k + 1}: {p}/{t}" for k, (t, p) in enumerate(h["by_step"]))
        print(f"{name[-40:]:>40} | {h['touches']} touches, {share}, {h['unmatched_payouts_per_1k_steps']:.1f} | {steps}")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main(tyro.cli(Args))
