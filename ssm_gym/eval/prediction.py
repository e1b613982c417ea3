"""How well a world model predicts held-out episodes: one-step and open-loop n-step PSNR.

    python -m ssm_gym.eval.prediction --checkpoints runs/a/model ssm_gym/checkpoints/maze-cpu \
        --val-dir data/maze-val --episodes 8 --context 32 --horizon 100 --sampling-steps 1 3

The model sees `context` real frames (with the actions that led to them), then predicts the
next `horizon` frames for the real actions two ways:
- one-step (teacher-forced): each frame predicted from the *real* history, then the state is
  advanced on the real frame;
- open-loop: each frame predicted from the model's own previous predictions (what an agent
  training in imagination sees).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ssm_gym.eval.metrics import psnr
from ssm_gym.maze.dataset import episode_prev_actions, list_episodes, load_episode


def load_clips(folder: str | Path, episodes: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` frames (N, length, 64, 64, 3) uint8 and the actions that led to them
    (N, length) of the first `episodes` episodes of a folder that are long enough."""
    files = [p for p, t in list_episodes(folder) if t + 1 >= length][:episodes]
    if not files:
        raise ValueError(f"{folder}: no episode with {length} frames")
    eps = [load_episode(p) for p in files]
    frames = torch.from_numpy(np.stack([e["image"][:length] for e in eps]))
    prev = np.stack([episode_prev_actions(e)[:length] for e in eps])
    return frames, torch.from_numpy(prev)


@torch.no_grad()
def predict_episodes(model, frames: torch.Tensor, prev_actions: torch.Tensor, context: int, horizon: int,
                     steps: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """frames (N, context + horizon, 64, 64, 3) uint8; prev_actions (N, context + horizon) long
    (the action that led to each frame). Returns uint8 arrays `one_step` and `open_loop`
    (N, horizon, 64, 64, 3) and `real`."""
    n, total = frames.shape[:2]
    if total < context + horizon:
        raise ValueError(f"need {context + horizon} frames, got {total}")
    dev = next(model.parameters()).device
    frames, prev_actions = frames.to(dev), prev_actions.to(dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    state = model.init_state(n, dev)
    model.observe_clip(state, frames[:, :context], prev_actions[:, :context])
    open_state = state.clone()
    one_step, open_loop = [], []
    for h in range(context, context + horizon):
        a = prev_actions[:, h]
        one_step.append(model.generate(state.clone(), a, steps=steps, generator=gen)[0])
        model.observe(state, frames[:, h], a)
        open_loop.append(model.generate(open_state, a, steps=steps, generator=gen)[0])
    to_np = lambda xs: torch.stack(xs, 1).cpu().numpy()  # noqa: E731
    return {"one_step": to_np(one_step), "open_loop": to_np(open_loop),
            "real": frames[:, context : context + horizon].cpu().numpy()}


def prediction_metrics(pred: dict[str, np.ndarray]) -> dict[str, float | list[float]]:
    """Mean one-step PSNR, the open-loop PSNR curve over the horizon, and its last value."""
    one = psnr(pred["one_step"], pred["real"])
    open_curve = psnr(pred["open_loop"], pred["real"]).mean(0)
    return {"psnr_1step": float(one.mean()), "psnr_open_loop_curve": open_curve.tolist(),
            "psnr_open_loop_mean": float(open_curve.mean()), "psnr_open_loop_last": float(open_curve[-1])}


def side_by_side_video(pred: dict[str, np.ndarray], index: int = 0, scale: int = 3) -> np.ndarray:
    """(T, H, W', 3) frames: real | open-loop prediction | one-step prediction, for one episode."""
    row = np.concatenate([pred["real"][index], pred["open_loop"][index], pred["one_step"][index]], axis=2)
    return np.repeat(np.repeat(row, scale, 1), scale, 2)


@dataclass
class Args:
    checkpoints: tuple[Path, ...]
    """Model folders to compare."""
    val_dir: Path = Path("data/maze-val")
    """Held-out episodes (other maze seeds than the training data)."""
    episodes: int = 8
    context: int = 32
    horizon: int = 100
    sampling_steps: tuple[int, ...] = (1, 3)
    """Denoising steps to evaluate (each a row)."""
    device: str = "cpu"
    seed: int = 0
    json: Optional[Path] = None
    """Also write the rows as JSON here."""


def main(args: Args) -> list[dict]:
    from ssm_gym.model.checkpoint import load_model

    frames, prev = load_clips(args.val_dir, args.episodes, args.context + args.horizon)
    rows = []
    for ckpt in args.checkpoints:
        model = load_model(ckpt, args.device)
        for steps in args.sampling_steps:
            m = prediction_metrics(predict_episodes(model, frames, prev, args.context, args.horizon, steps, args.seed))
            rows.append({"checkpoint": str(ckpt), "sampling_steps": steps, "episodes": len(frames),
                         "psnr_1step": round(m["psnr_1step"], 2), f"psnr_{args.horizon}step": round(m["psnr_open_loop_last"], 2),
                         "psnr_open_loop_mean": round(m["psnr_open_loop_mean"], 2)})
            print(json.dumps(rows[-1]), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
