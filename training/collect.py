"""Collect episodes from the ground-truth maze with scripted policies.

    python -m training.collect --out-dir data/maze --num-episodes 200 --episode-len 1000 \
        --policy-mix.explore 0.8 --policy-mix.oracle 0.1 --policy-mix.random 0.1 --workers 2

Writes one NPZ per episode (Memory Maze layout, see `ssm_gym.maze.dataset`) named
`ep_{index:06d}.npz`; episode i is the maze of `reset(seed=seed + i)`. Existing valid files are
kept when they were made with the same settings (seed, policy, maze size, objects, length), so
an interrupted collection resumes where it stopped; others are rewritten (--overwrite redoes all).
"""

from __future__ import annotations

import json
import multiprocessing as mp
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import tyro
from tqdm import tqdm

from ssm_gym.maze.dataset import DatasetError, check_episode_file, save_episode
from ssm_gym.maze.policies import POLICIES
from ssm_gym.maze.record import record_episodes


@dataclass
class Args:
    out_dir: Path = Path("data/maze")
    """Folder for the episode files (created if needed)."""
    num_episodes: int = 100
    """Number of episodes (mazes) to write."""
    episode_len: int = 1000
    """Actions per episode; each file holds episode_len + 1 frames."""
    policy_mix: dict[str, float] = field(default_factory=lambda: {"explore": 0.8, "oracle": 0.1, "random": 0.1,
                                                                        "stumble": 0.0})
    """Policy name -> weight; each episode draws one policy (names: explore, oracle, random,
    stumble: see `ssm_gym.maze.policies`)."""
    seed: int = 0
    """Episode i uses maze seed `seed + i`."""
    maze_size: int = 9
    n_objects: int = 3
    workers: int = 1
    """Processes to use."""
    batch: int = 16
    """Episodes simulated together in one process (batched rendering)."""
    overwrite: bool = False
    """Rewrite episode files that already exist and are valid."""


def _policy_for(args: Args, index: int) -> str:
    names = sorted(args.policy_mix)
    weights = np.array([args.policy_mix[k] for k in names], dtype=np.float64)
    return names[int(np.random.default_rng([args.seed, index, 7]).choice(len(names), p=weights / weights.sum()))]


def _write_chunk(job: tuple[Args, list[int]]) -> int:
    args, indices = job
    seeds = [args.seed + i for i in indices]
    episodes = record_episodes(seeds, [_policy_for(args, i) for i in indices], args.episode_len,
                               args.maze_size, args.n_objects, policy_seed=args.seed)
    for i, ep in zip(indices, episodes):
        save_episode(args.out_dir / f"ep_{i:06d}.npz", ep)
    return len(indices)


def _is_done(path: Path, args: Args, index: int) -> bool:
    """An existing file counts as done only if it is valid and was made with these settings."""
    try:
        if check_episode_file(path) != args.episode_len:
            return False
        with np.load(path, allow_pickle=False) as ep:
            return (int(ep["seed"]) == args.seed + index and str(ep["policy"]) == _policy_for(args, index)
                    and ep["maze_layout"].shape == (args.maze_size, args.maze_size)
                    and ep["targets_pos"].shape[1] == args.n_objects)
    except (DatasetError, KeyError, ValueError, OSError):
        return False


def collect(args: Args) -> Path:
    unknown = set(args.policy_mix) - set(POLICIES)
    if unknown or not args.policy_mix or min(args.policy_mix.values()) < 0 or sum(args.policy_mix.values()) <= 0:
        raise ValueError(f"policy_mix must map names in {sorted(POLICIES)} to non-negative weights, got {args.policy_mix}")
    if args.num_episodes < 1 or args.episode_len < 1:
        raise ValueError("num_episodes and episode_len must be >= 1")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(args.num_episodes)
            if args.overwrite or not _is_done(args.out_dir / f"ep_{i:06d}.npz", args, i)]
    chunks = [(args, todo[k : k + args.batch]) for k in range(0, len(todo), args.batch)]
    with tqdm(total=args.num_episodes, initial=args.num_episodes - len(todo), unit="ep", desc="collect") as bar:
        if args.workers > 1 and len(chunks) > 1:
            with mp.get_context("spawn").Pool(args.workers) as pool:
                for n in pool.imap_unordered(_write_chunk, chunks):
                    bar.update(n)
        else:
            for chunk in chunks:
                bar.update(_write_chunk(chunk))
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()}
    (args.out_dir / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return args.out_dir


if __name__ == "__main__":
    collect(tyro.cli(Args))
