"""Frames per second of the ground-truth maze, single env and native vector env.

    python benchmarks/maze_sim.py            # table
    python benchmarks/maze_sim.py --json     # one JSON object

JSON keys: "single_env_fps" (frames/s of gym.make(...).step, one env), "vector" (list of
{"num_envs", "fps", "ms_per_step"} for gym.make_vec at each num_envs), "target_fps" (10,000),
"threads" (numpy runs single-threaded here: everything is measured on one core).
Each figure is steps (= rendered frames) per wall-clock second with random actions, after warm-up.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import tyro

import ssm_gym  # noqa: F401

TARGET_FPS = 10_000


@dataclass
class Args:
    num_envs: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    seconds: float = 2.0
    """Measuring time per row."""
    json: bool = False


def _rate(step, batch: int, seconds: float) -> float:
    for _ in range(3):
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n * batch / (time.perf_counter() - t0)


def main(args: Args) -> dict:
    rng = np.random.default_rng(0)
    env = gym.make("SSMWorld-MazeReal-v0", max_episode_steps=10**9)
    env.reset(seed=0)
    single = _rate(lambda: env.step(int(rng.integers(6))), 1, args.seconds)
    rows = []
    for n in args.num_envs:
        venv = gym.make_vec("SSMWorld-MazeReal-v0", num_envs=n)
        venv.reset(seed=0)
        fps = _rate(lambda: venv.step(rng.integers(0, 6, size=n)), n, args.seconds)
        rows.append({"num_envs": n, "fps": round(fps), "ms_per_step": round(1000 * n / fps, 3)})
    result = {"single_env_fps": round(single), "vector": rows, "target_fps": TARGET_FPS, "threads": 1}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"SSMWorld-MazeReal-v0, one core, random actions ({args.seconds:.0f} s per row)")
        print(f"single env (gym.make): {single:,.0f} frames/s")
        print(f"{'num_envs':>8} | {'frames/s':>10} | {'ms/step':>8}")
        print(f"{'-' * 8}-+-{'-' * 10}-+-{'-' * 8}")
        for r in rows:
            print(f"{r['num_envs']:>8} | {r['fps']:>10,} | {r['ms_per_step']:>8.3f}")
        best = max(rows, key=lambda r: r["fps"])
        print(f"best {best['fps']:,} frames/s at num_envs={best['num_envs']} (target {TARGET_FPS:,})")
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
