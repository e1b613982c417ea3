"""Export a training run's EMA model into the package (`ssm_gym/checkpoints/<name>/`) to ship it.

    python -m training.export --run runs/maze-cpu --name maze-cpu

Copies `model/` of the run (or of `--step N`'s checkpoint) and records in its config's `meta`
the training step, the run's config and its last validation row. `--never-terminates` sets the
termination head to a constant "no" (logit -10): exact for the maze, which never terminates,
and needed for runs made before the trainer passed termination targets to the loss.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import tyro

from ssm_gym.checkpoints import HERE
from ssm_gym.model.checkpoint import load_model, read_config, save_model

MAX_BYTES = 25 * 1024 * 1024


@dataclass
class Args:
    run: Path
    """Run folder of `python -m training.train`."""
    name: str = "maze-cpu"
    """Folder name under ssm_gym/checkpoints/."""
    step: Optional[int] = None
    """Export this checkpoint step instead of the final model."""
    never_terminates: bool = False
    sample_steps: Optional[int] = None
    """Set the model's default number of denoising steps (e.g. the one that validated best)."""
    note: Optional[str] = None
    """A line recorded in the config's meta["note"] (e.g. the runs this model descends from)."""
    dest_root: Path = HERE
    """Where the checkpoint folders of the package live."""


def export(args: Args) -> Path:
    src = args.run / "model" if args.step is None else args.run / "checkpoints" / f"step_{args.step:07d}" / "model"
    model = load_model(src)
    _, meta = read_config(src)
    if args.sample_steps is not None:
        if args.sample_steps < 1:
            raise ValueError(f"sample_steps must be >= 1, got {args.sample_steps}")
        model.config.sample_steps = args.sample_steps
    if args.never_terminates:
        with torch.no_grad():
            model.head[2].weight[1].zero_()
            model.head[2].bias[1] = -10.0
        meta["termination_head"] = "set to never terminate at export (the maze never terminates)"
    if args.note:
        meta["note"] = args.note
    val = args.run / "val.csv"
    if val.is_file():
        rows = list(csv.DictReader(val.open()))
        if rows:
            meta["validation"] = rows[-1]
    dest = save_model(args.dest_root / args.name, model, meta=meta)
    size = sum(f.stat().st_size for f in dest.iterdir())
    if size > MAX_BYTES:
        raise ValueError(f"{dest}: {size / 2**20:.1f} MB, over the 25 MB limit for shipped weights")
    print(f"exported {src} (step {meta.get('step')}) to {dest} ({size / 2**20:.1f} MB)")
    return dest


if __name__ == "__main__":
    export(tyro.cli(Args))
