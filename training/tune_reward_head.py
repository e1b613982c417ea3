"""Re-fit a world model's reward head on its own imagination; write the tuned checkpoint.

    python -m training.tune_reward_head --checkpoint maze-latent-balls --out runs/balls-head/model

The network stays frozen; only the head is fitted, on the inputs it reads along imagined
windows of `--horizon` steps after `--context` real frames of `--data` (see
ssm_gym/train/reward_head.py for why). Held-out windows from `--val-data` (every touch at every
imagined step, plus random windows) are imagined once and read by the old and the new head:
the table shows, per imagined step, the touches paid above `--threshold`, the AUC and the false
payouts per 1,000 steps without a touch. `--cache` keeps the imagined inputs (a .pt file) so that
another fit does not imagine them again.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import tyro

from ssm_gym.checkpoints import load_world_model, resolve_checkpoint
from ssm_gym.envs.world_model_env import REWARD_THRESHOLD
from ssm_gym.maze.dataset import list_episodes
from ssm_gym.model.checkpoint import WEIGHTS_FILE, read_config, save_model
from ssm_gym.train.reward_head import HeadInputs, episode_windows, fit_head, head_report, imagine_head_inputs


@dataclass
class Args:
    out: Path
    """Folder of the tuned checkpoint (written atomically; the source checkpoint is not touched)."""
    checkpoint: Optional[str] = None
    """World model: a folder or a shipped model's name (default: the shipped default model)."""
    data: Path = Path("data/maze")
    """Recorded episodes to fit on."""
    val_data: Path = Path("data/maze-val")
    """Held-out recorded episodes (other mazes) to report on."""
    episodes: Optional[int] = None
    """Use only the first N episodes of --data (default: all)."""
    context: int = 16
    """Real frames before each imagined window (the agents' --context-len; 16 in the 8-step protocol
    of the README's Agents)."""
    horizon: int = 8
    """Imagined steps per window (the agents' --max-episode-steps; 8 in that protocol)."""
    per_touch: int = 2
    """Windows per recorded touch in --data, the touch at a different random imagined step each
    (at most --horizon)."""
    random_per_episode: int = 8
    """Windows at random places per episode of --data."""
    val_per_touch: int = 8
    val_random_per_episode: int = 16
    batch: int = 64
    """Windows imagined in one batch."""
    sampling_steps: Optional[int] = 1
    """Denoising steps, as the agents' --sampling-steps (default 1; None: the model's own)."""
    precision: Literal["fp32", "bf16"] = "bf16"
    """The model's precision while imagining, as the agents' --precision (bf16, the 8-step
    protocol's, is about twice as fast on a CPU with AVX-512 BF16)."""
    action_guidance: Optional[float] = None
    """As the agents' --action-guidance (None: the model's default)."""
    steps: int = 3000
    lr: float = 1e-3
    real_weight: float = 0.5
    """Weight of the real context frames' loss next to the imagined steps'."""
    threshold: float = REWARD_THRESHOLD
    """The env's reward_threshold, for the report."""
    seed: int = 0
    cache: Optional[Path] = None
    """Save the imagined head inputs here, or load them if the file exists with the same settings."""
    json: Optional[Path] = None
    """Also write the report here."""


def _inputs_settings(args: Args, ckpt: Path) -> dict:
    keys = ("episodes", "context", "horizon", "per_touch", "random_per_episode", "val_per_touch",
            "val_random_per_episode", "sampling_steps", "precision", "action_guidance", "seed")
    weights = ckpt / WEIGHTS_FILE
    stat = weights.stat() if weights.is_file() else None
    return {"checkpoint": str(ckpt.resolve()),  # and its weights as they are now (a re-trained folder differs)
            "weights": None if stat is None else f"{stat.st_size} bytes, modified {stat.st_mtime_ns}",
            "data": str(args.data.resolve()), "val_data": str(args.val_data.resolve()),
            **{k: str(getattr(args, k)) for k in keys}}


def _imagine(model, args: Args, ckpt: Path) -> tuple[HeadInputs, HeadInputs]:
    settings = _inputs_settings(args, ckpt)
    if args.cache is not None and args.cache.is_file():
        try:
            saved = torch.load(args.cache, weights_only=True)
            fit, val, got = HeadInputs(**saved["fit"]), HeadInputs(**saved["val"]), saved["settings"]
        except Exception as e:  # noqa: BLE001  (any unreadable file is the same problem)
            raise ValueError(f"{args.cache}: not a readable head-input cache ({type(e).__name__}: {e}); delete it "
                             "to imagine again") from None
        if got != settings:
            diff = sorted(k for k in settings if got.get(k) != settings[k])
            raise ValueError(f"{args.cache} was made with other settings ({', '.join(diff)}); delete it or pass "
                             "another --cache")
        print(f"head inputs from {args.cache}: {len(fit)} fit windows, {len(val)} held-out windows")
        return fit, val
    fit_paths = [p for p, _ in list_episodes(args.data)][:args.episodes]
    val_paths = [p for p, _ in list_episodes(args.val_data)]
    kw = dict(batch=args.batch, sampling_steps=args.sampling_steps, precision=args.precision,
              action_guidance=args.action_guidance)
    t0 = time.time()
    fit = imagine_head_inputs(model, episode_windows(fit_paths, args.context, args.horizon, args.per_touch,
                                                     args.random_per_episode, args.seed),
                              args.context, args.horizon, seed=args.seed, progress="imagining fit windows", **kw)
    val = imagine_head_inputs(model, episode_windows(val_paths, args.context, args.horizon, args.val_per_touch,
                                                     args.val_random_per_episode, args.seed + 1),
                              args.context, args.horizon, seed=args.seed + 10**6, progress="imagining held-out windows",
                              **kw)
    print(f"imagined {len(fit)} fit windows ({len(fit_paths)} episodes) and {len(val)} held-out windows "
          f"({len(val_paths)} episodes) in {time.time() - t0:.0f} s")
    if args.cache is not None:
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.cache.with_name(args.cache.name + ".tmp")
        torch.save({"settings": settings, "fit": asdict(fit), "val": asdict(val)}, tmp)
        tmp.replace(args.cache)
    return fit, val


def _fmt(r: dict) -> str:
    paid = "   -" if r["paid"] is None else f"{r['paid']:4.0%}"
    auc = "    -" if r["auc"] is None else f"{r['auc']:.3f}"
    return f"{paid} {auc} {r['false_per_1k']:5.1f}"


def print_reports(old: dict, new: dict) -> None:
    print("held-out windows: touches paid / AUC / false payouts per 1k steps, old head -> new head")
    print(f"{'step':>9} | {'touches':>7} | {'old':>16} | {'new':>16}")
    rows = [(str(k), old["by_step"][k], new["by_step"][k]) for k in old["by_step"]]
    rows += [(name, old[key], new[key]) for name, key in
             (("1-2", "steps_1_2"), ("3+", "steps_3_on"), ("all", "imagined"), ("real", "real"))]
    for name, o, n in rows:
        if o is not None:
            print(f"{name:>9} | {o['touches']:7d} | {_fmt(o):>16} | {_fmt(n):>16}")


def main(args: Args) -> dict:
    if args.context < 1 or args.horizon < 1 or args.batch < 1:
        raise ValueError("context, horizon and batch must be >= 1")
    ckpt = resolve_checkpoint(args.checkpoint)
    if args.out.resolve() == ckpt.resolve():
        raise ValueError(f"--out {args.out} is the source checkpoint: write the tuned head to another folder")
    model = load_world_model(ckpt)
    fit, val = _imagine(model, args, ckpt)
    old_head = copy.deepcopy(model.head)
    losses = fit_head(model.head, fit, steps=args.steps, lr=args.lr, real_weight=args.real_weight, seed=args.seed)
    old = {"fit": head_report(old_head, fit, args.threshold), "val": head_report(old_head, val, args.threshold)}
    new = {"fit": head_report(model.head, fit, args.threshold), "val": head_report(model.head, val, args.threshold)}
    print_reports(old["val"], new["val"])
    _, meta = read_config(ckpt)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    meta = {**meta, "reward_head_tuned": {"from": str(ckpt), "settings": settings, "fit_windows": len(fit),
                                          "loss_every_100": [round(x, 5) for x in losses],
                                          "held_out": {"old": old["val"], "new": new["val"]}}}
    save_model(args.out, model, meta)
    print(f"tuned checkpoint: {args.out}")
    report = {"old": old, "new": new, "losses": losses, "settings": settings}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
