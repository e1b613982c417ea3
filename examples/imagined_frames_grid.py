"""Several models (and samplers) imagining the same recorded actions, one row each, under the real frames.

    python examples/imagined_frames_grid.py --rows ssm_gym/checkpoints/maze-cpu:1 ssm_gym/checkpoints/maze-cpu:3 \
        runs/s13-gpu2/model:1 runs/s13-gpu2/model:3 --out docs/s13-imagined-frames.png

Each row: a model folder and its number of denoising steps (`folder:steps`). Every model is warmed
up on the same `--context` real frames of a held-out episode, then imagines open loop for the
episode's recorded actions; the grid shows the imagined steps `--at`. Looking at frames catches what
PSNR hides (a blur scores better than a sharp frame that is slightly off; grain and blur can score
alike).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro
from PIL import Image, ImageDraw

from ssm_gym.checkpoints import load_world_model
from ssm_gym.maze.dataset import episode_prev_actions, list_episodes, load_episode


@dataclass
class Args:
    rows: tuple[str, ...]
    """`model_folder:denoising_steps`, one per row."""
    val_dir: Path = Path("data/maze-val")
    episode: int = 0
    """Which held-out episode (index in the folder)."""
    start: int = 200
    """First context frame in the episode."""
    context: int = 32
    at: tuple[int, ...] = (1, 2, 4, 8, 16)
    """Imagined steps shown (1 = the first imagined frame)."""
    seed: int = 0
    scale: int = 2
    out: Path = Path("outputs/imagined_frames_grid.png")


def parse_row(spec: str) -> tuple[Path, int]:
    folder, sep, steps = spec.rpartition(":")
    if not sep or not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"a row is `model_folder:denoising_steps` (steps >= 1), got {spec!r}")
    return Path(folder), int(steps)


@torch.no_grad()
def imagine(model, frames: torch.Tensor, actions: torch.Tensor, context: int, steps: int, at: tuple[int, ...],
            seed: int) -> list[np.ndarray]:
    """The frames imagined at steps `at` after `context` real ones, open loop on the recorded actions."""
    g = torch.Generator().manual_seed(seed)
    state = model.init_state(1)
    model.observe_clip(state, frames[None, :context], actions[None, :context])
    shown = []
    for t in range(max(at)):
        frame, _, _ = model.generate(state, actions[None, context + t], steps=steps, generator=g)
        if t + 1 in at:
            shown.append(frame[0].numpy())
    return shown


def main(args: Args) -> Path:
    rows = [parse_row(r) for r in args.rows]
    episodes = list_episodes(args.val_dir)
    if not 0 <= args.episode < len(episodes):
        raise ValueError(f"--episode {args.episode}: {args.val_dir} holds {len(episodes)} episodes")
    if not args.at or min(args.at) < 1 or list(args.at) != sorted(set(args.at)):
        raise ValueError(f"--at must list imagined steps >= 1 in increasing order, got {args.at}")
    if args.start < 0 or args.context < 1:
        raise ValueError(f"--start must be >= 0 and --context >= 1, got {args.start} and {args.context}")
    ep = load_episode(episodes[args.episode][0])
    end = args.start + args.context + max(args.at)
    if end > len(ep["image"]):
        raise ValueError(f"episode {args.episode} has {len(ep['image'])} frames; this grid needs {end}")
    frames = torch.from_numpy(ep["image"][args.start:end])
    actions = torch.from_numpy(episode_prev_actions(ep)[args.start:end])
    grid = [("real", [frames[args.context + t - 1].numpy() for t in args.at])]
    for folder, steps in rows:
        model = load_world_model(folder)
        grid.append((f"{folder.parent.name if folder.name == 'model' else folder.name}, {steps} step"
                     + ("s" if steps > 1 else ""), imagine(model, frames, actions, args.context, steps, args.at, args.seed)))
    s, label_w = 64 * args.scale, 170
    img = Image.new("RGB", (label_w + s * len(args.at), s * len(grid)), "white")
    draw = ImageDraw.Draw(img)
    for i, (name, shown) in enumerate(grid):
        strip = Image.fromarray(np.concatenate(shown, 1)).resize((s * len(args.at), s), Image.NEAREST)
        img.paste(strip, (label_w, i * s))
        draw.text((4, i * s + s // 2 - 6), name, fill="black")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    img.quantize(colors=128).save(args.out, optimize=True)
    print(f"imagined steps {args.at} after {args.context} real frames: {args.out}")
    return args.out


if __name__ == "__main__":
    main(tyro.cli(Args))
