"""How many steps ahead does the world model see a reward coming?

    python -m ssm_gym.eval.reward_sight --checkpoint maze-latent-ol

For every recorded touch of a target in held-out episodes (`--data`) and every k = 1..`--lookahead`,
the model is warmed up on the real frames up to k steps before the touch and imagines the k
recorded actions that led to it. The reward head is read where `SSMWorld-Maze-v0`'s
`--reward-mode` reads it, and a step counts as paid above `--threshold`. Reported per k: the
share of touches paid on the imagined touch step, the mean reading there, and the AUC of those
readings against the readings on all imagined steps before the touches (no touch there in the
recording; pooled over every k; 0.5: no signal). Once for those steps: false payouts per 1,000
and their mean reading.

Why it matters: a planner (`agents.plan`) can only plan for rewards the model shows within its
horizon, and an agent trained in imagination is paid only for touches the model imagines: one
that sees a target one step ahead but not three learns little about walking up to it (session
27: `maze-latent-ol` pays 97% of touches one step ahead, 42% two steps, 9% three).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from ssm_gym.checkpoints import load_world_model
from ssm_gym.envs.world_model_env import REWARD_THRESHOLD, check_reward_mode
from ssm_gym.eval.prediction import reward_metrics
from ssm_gym.maze.dataset import context_window, episode_prev_actions, list_episodes, load_episode
from ssm_gym.rollout.engine import RolloutEngine


@dataclass
class Args:
    checkpoint: Optional[Path] = None
    """World model (default: the shipped model)."""
    data: Path = Path("data/maze-val")
    """Recorded episodes with touches (held-out mazes)."""
    episodes: int = 12
    touches_per_episode: int = 6
    """At most this many touches of each episode (the first ones after the context)."""
    context: int = 32
    """Real frames the model is warmed up on before imagining."""
    lookahead: int = 4
    """Imagine from 1..lookahead steps before each touch."""
    reward_mode: Literal["threshold", "expected"] = "threshold"
    """As SSMWorld-Maze-v0's: the head on the generated frame, or its expected reward from the
    first denoising pass (history and action alone)."""
    threshold: float = REWARD_THRESHOLD
    """A step pays when the reading is above this (the env's reward_threshold)."""
    sampling_steps: Optional[int] = 1
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    json: Optional[Path] = None
    """Also write the results here."""


def touch_starts(episode: dict, context: int, lookahead: int, limit: int) -> list[int]:
    """Steps T (frame index) of the episode's first `limit` touches with `context + lookahead`
    frames before them and no other touch in the `lookahead` steps before."""
    touched = np.flatnonzero(episode["reward"] > 0.5)
    ok = [int(t) for t in touched if t >= context + lookahead and not (episode["reward"][t - lookahead:t] > 0.5).any()]
    return ok[:limit]


def imagine_touches(model, episode: dict, touches: list[int], args: Args) -> tuple[np.ndarray, list[list[float]]]:
    """Raw readings (touches, lookahead): at the touch step imagined from k steps before (column k-1);
    and for each k the readings on the imagined steps before the touch (no touch recorded there)."""
    k_max, n = args.lookahead, len(touches)
    prev = episode_prev_actions(episode)  # prev[t]: the action that led to frame t
    eng = RolloutEngine(model, n * k_max, sampling_steps=args.sampling_steps, seed=args.seed,
                        reward_from=check_reward_mode(args.reward_mode), precision=args.precision)
    rows = lambda k: torch.arange(n) * k_max + (k - 1)  # noqa: E731  (env of touch i, lookahead k)
    for k in range(1, k_max + 1):
        last = [t - k for t in touches]  # the last real frame
        windows = [context_window(episode, s, args.context, prev) for s in last]
        frames, acts = np.stack([w[0] for w in windows]), np.stack([w[1] for w in windows])
        mask = torch.zeros(n * k_max, dtype=torch.bool)
        mask[rows(k)] = True
        eng.reset(mask, torch.from_numpy(frames), torch.from_numpy(acts), seeds=[args.seed + s for s in last])
    at_touch = np.zeros((n, k_max))
    before: list[list[float]] = [[] for _ in range(k_max)]
    for j in range(k_max):  # imagined step j+1; env (i, k) takes the action that led to frame t_i - k + j + 1
        a = torch.tensor([prev[min(t - k + j + 1, t)] for t in touches for k in range(1, k_max + 1)])
        raw = eng.step(a)[1].float().cpu().numpy().reshape(n, k_max)
        for k in range(1, k_max + 1):
            if j == k - 1:
                at_touch[:, k - 1] = raw[:, k - 1]
            elif j < k - 1:
                before[k - 1].extend(raw[:, k - 1].tolist())
    return at_touch, before


def main(args: Args) -> dict:
    if args.lookahead < 1 or args.context < 1 or args.episodes < 1:
        raise ValueError("lookahead, context and episodes must be >= 1")
    model = load_world_model(args.checkpoint)
    at, before = [], [[] for _ in range(args.lookahead)]
    for path, _ in list_episodes(args.data)[:args.episodes]:
        ep = load_episode(path)
        touches = touch_starts(ep, args.context, args.lookahead, args.touches_per_episode)
        if touches:
            a, b = imagine_touches(model, ep, touches, args)
            at.append(a)
            for k in range(args.lookahead):
                before[k].extend(b[k])
    if not at:
        raise ValueError(f"no touch in the first {args.episodes} episodes of {args.data} with {args.context} + "
                         f"{args.lookahead} frames before it")
    at = np.concatenate(at)
    quiet = np.concatenate([np.asarray(b, dtype=float) for b in before])  # imagined steps with no touch
    out = {"touches": len(at), "quiet_steps": len(quiet),
           "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "by_lookahead": {}}
    for k in range(1, args.lookahead + 1):
        m = reward_metrics(np.concatenate([at[:, k - 1], quiet]), np.concatenate([np.ones(len(at)), np.zeros(len(quiet))]),
                           args.threshold)
        out["by_lookahead"][k] = {"paid": round(m["reward_recall"], 3), "mean_raw_at_touch": round(m["mean_pred_at_events"], 3),
                                  "auc": None if m["auc"] is None else round(m["auc"], 3)}
        if k == 1:  # the quiet steps' numbers, the same for every k
            out["false_payouts_per_1k"] = round(m["false_payouts_per_1k"], 1) if len(quiet) else None
            out["mean_raw_quiet"] = None if m["mean_pred_elsewhere"] is None else round(m["mean_pred_elsewhere"], 3)
    print(f"{out['touches']} recorded touches in {args.data}, imagined from k steps before each (reward mode "
          f"{args.reward_mode}, paid above {args.threshold}); on the {len(quiet)} imagined steps before them "
          f"(no touch): {out['false_payouts_per_1k']} payouts per 1,000 steps, mean reading {out['mean_raw_quiet']}")
    print(" k | touches paid | mean reading at the touch | AUC (touch vs the steps before)")
    for k, r in out["by_lookahead"].items():
        print(f"{k:2d} | {r['paid']:12.0%} | {r['mean_raw_at_touch']:25.3f} | {r['auc'] if r['auc'] is not None else '-'}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    import tyro

    torch.set_grad_enabled(False)
    main(tyro.cli(Args))
