"""The real maze and the world model's imagination side by side, on the same actions.

    python examples/real_vs_imagined.py --checkpoint runs/maze-cpu/model --steps 200
    python examples/real_vs_imagined.py --steps 200 --context 32 --seed 2000000 --strip docs/samples.png

Both start from the same real frames (`--context` frames of real history warm the model up),
then an exploring agent acts in the real maze and the same actions drive the imagined one.
Writes outputs/real_vs_imagined.mp4 (real | imagined, per-frame PSNR printed at the end).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import gymnasium as gym
import imageio.v2 as imageio
import numpy as np
import tyro

import ssm_gym  # noqa: F401
from ssm_gym.eval.metrics import psnr
from ssm_gym.maze.policies import ExplorePolicy


@dataclass
class Args:
    checkpoint: Optional[Path] = None
    """World-model checkpoint folder or a shipped model's name (default: the shipped default model, ssm_gym.checkpoints.DEFAULT)."""
    steps: int = 200
    context: int = 16
    """Real frames the model sees before imagining."""
    seed: int = 0
    sampling_steps: Optional[int] = None
    action_guidance: Optional[float] = None
    """Classifier-free guidance on the action (None = the model's default)."""
    out: Path = Path("outputs/real_vs_imagined.mp4")
    strip: Optional[Path] = None
    """Also write a PNG: real (left) and imagined (right) at `strip_steps`, one pair per row."""
    strip_steps: tuple[int, ...] = (1, 5, 20, 50, 100, 200)


def run(args: Args) -> dict:
    real = gym.make("SSMWorld-MazeReal-v0")
    imagined = gym.make("SSMWorld-Maze-v0", checkpoint=args.checkpoint, sampling_steps=args.sampling_steps,
                        action_guidance=args.action_guidance, max_episode_steps=10**9)
    obs, _ = real.reset(seed=args.seed)
    sim = real.unwrapped.sim
    policy = ExplorePolicy()
    policy.reset(sim, 0, np.random.default_rng(args.seed))
    context, actions = [obs], []
    for _ in range(args.context - 1):
        actions.append(policy.act(sim, 0))
        context.append(real.step(actions[-1])[0])
    fake, _ = imagined.reset(options={"context_obs": np.stack(context), "context_actions": np.array(actions, dtype=np.int64)})
    real_frames, fake_frames = [context[-1]], [fake]
    t0 = time.perf_counter()
    for _ in range(args.steps):
        a = policy.act(sim, 0)
        real_frames.append(real.step(a)[0])
        fake_frames.append(imagined.step(a)[0])
    elapsed = time.perf_counter() - t0
    r, f = np.stack(real_frames), np.stack(fake_frames)
    video = np.concatenate([r, np.zeros_like(r[:, :, :2]), f], axis=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimwrite(args.out, np.repeat(np.repeat(video, 4, 1), 4, 2), fps=15, macro_block_size=1)
    curve = psnr(f[1:], r[1:])
    if args.strip is not None:
        rows = [np.concatenate([r[t], np.zeros_like(r[t][:, :2]), f[t]], axis=1) for t in args.strip_steps if t < len(r)]
        args.strip.parent.mkdir(parents=True, exist_ok=True)
        imageio.imwrite(args.strip, np.repeat(np.repeat(np.concatenate(rows, axis=0), 2, 0), 2, 1))
    return {"video": args.out, "env_steps_per_s": args.steps / elapsed, "psnr_first_10": float(curve[:10].mean()),
            "psnr_last_10": float(curve[-10:].mean())}


def main(args: Args) -> None:
    res = run(args)
    print(f"real | imagined video: {res['video']}")
    print(f"imagined env-steps/s (1 env, incl. the real maze and the policy): {res['env_steps_per_s']:.1f}")
    print(f"PSNR imagined vs real: first 10 steps {res['psnr_first_10']:.1f} dB, last 10 steps {res['psnr_last_10']:.1f} dB")


if __name__ == "__main__":
    main(tyro.cli(Args))
