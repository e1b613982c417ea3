"""The ssm-gym demo: the ground-truth maze, then (once a model ships) real vs imagined.

    make demo        # or: python examples/demo.py --steps 300 --seed 0

1. Writes outputs/demo/real_maze.mp4 (first-person view beside the map, the agent's trail
   drawn) and outputs/demo/real_maze_map.png, and prints the simulator's measured speed.
2. If the package ships a world model (ssm_gym/checkpoints/), runs the real and the imagined
   maze side by side on the same actions (examples/real_vs_imagined.py) and prints its speed,
3. then trains PPO purely in imagination for `--ppo-steps` env steps (a few minutes) and
   evaluates it in the real maze next to a random policy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import imageio.v2 as imageio
import numpy as np
import tyro

import ssm_gym  # noqa: F401  (registers the env ids)
from ssm_gym.checkpoints import shipped_checkpoint
from ssm_gym.maze.policies import ExplorePolicy
from ssm_gym.model.checkpoint import CheckpointError


@dataclass
class Args:
    steps: int = 300
    seed: int = 0
    ppo_steps: int = 4096
    """PPO env steps in imagination (0 to skip)."""
    out_dir: Path = Path("outputs/demo")


def side_by_side(first_person: np.ndarray, top_down: np.ndarray) -> np.ndarray:
    """First-person frame (x4) beside the map, padded to one height."""
    big = np.repeat(np.repeat(first_person, 4, 0), 4, 1)
    h = max(big.shape[0], top_down.shape[0])
    pad = lambda im: np.pad(im, ((0, h - im.shape[0]), (0, 0), (0, 0)))  # noqa: E731
    return np.concatenate([pad(big), pad(top_down)], axis=1)


def main(args: Args) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    env = gym.make("SSMWorld-MazeReal-v0")
    obs, info = env.reset(seed=args.seed)
    sim = env.unwrapped.sim
    policy = ExplorePolicy()
    policy.reset(sim, 0, np.random.default_rng(args.seed))
    trail, frames, total = [info["agent_pose"]], [], 0.0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        obs, reward, terminated, truncated, info = env.step(policy.act(sim, 0))
        total += reward
        trail.append(info["agent_pose"])
        frames.append(side_by_side(obs, env.unwrapped.render_top_down(scale=16, trail=np.array(trail))))
    elapsed = time.perf_counter() - t0
    video = args.out_dir / "real_maze.mp4"
    imageio.mimwrite(video, frames, fps=15, macro_block_size=16)
    map_png = args.out_dir / "real_maze_map.png"
    imageio.imwrite(map_png, env.unwrapped.render_top_down(scale=32, trail=np.array(trail)))
    print(f"SSMWorld-MazeReal-v0, seed {args.seed}: {args.steps} steps, reward {total:.0f}")
    print(f"  video (first-person | map): {video}")
    print(f"  top-down map with trail:    {map_png}")
    print(f"  {args.steps / elapsed:,.0f} steps/s including the policy and map drawing")
    print("  simulator alone: python benchmarks/maze_sim.py")

    try:
        checkpoint = shipped_checkpoint()
    except CheckpointError as e:
        print(f"\nNo world model ships with this version yet ({e}).")
        return
    import real_vs_imagined  # the example beside this file

    res = real_vs_imagined.run(real_vs_imagined.Args(checkpoint=checkpoint, steps=args.steps, seed=args.seed,
                                                     out=args.out_dir / "real_vs_imagined.mp4"))
    print("\nSSMWorld-Maze-v0 (shipped model), same actions as the real maze:")
    print(f"  video (real | imagined): {res['video']}")
    print(f"  {res['env_steps_per_s']:.1f} imagined env-steps/s (1 env); PSNR vs real: "
          f"{res['psnr_first_10']:.1f} dB over the first 10 steps, {res['psnr_last_10']:.1f} dB over the last 10")
    if args.ppo_steps > 0:
        ppo_in_imagination(checkpoint, args)


def ppo_in_imagination(checkpoint: Path, args: Args) -> None:
    from agents import evaluate, ppo
    from ssm_gym.model.attention import attention_kernel_ready

    # bf16 imagination where this CPU has the AVX-512 BF16 unit the fused kernels use (1.9x the
    # env-steps/s); fp32 elsewhere, where bf16 would be slower
    precision = "bf16" if attention_kernel_ready() else "fp32"
    print(f"\nPPO in imagination for {args.ppo_steps} env steps (16 imagined mazes, 1-step sampling, {precision}) ...")
    agent_path = ppo.train(ppo.Args(checkpoint=checkpoint, total_steps=args.ppo_steps, num_envs=16, n_steps=64,
                                    eval_every=10**9, eval_episodes=4, out_dir=args.out_dir / "ppo",
                                    precision=precision))
    seeds = list(range(3_000_000, 3_000_008))
    agent = evaluate.summary(evaluate.real_returns(evaluate.sb3_act_fn(evaluate.load_agent(agent_path)), seeds, 200))
    rand = evaluate.summary(evaluate.scripted_returns("random", seeds, 200))
    print(f"real maze, 8 held-out seeds x 200 steps: PPO trained in imagination {agent['mean']:.2f} +- "
          f"{agent['stderr']:.2f}, random policy {rand['mean']:.2f} +- {rand['stderr']:.2f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
