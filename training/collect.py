"""Collect episodes from the ground-truth maze with scripted policies.

    python -m training.collect --out-dir data/maze --num-episodes 200 --episode-len 1000 \
        --policy-mix.explore 0.8 --policy-mix.oracle 0.1 --policy-mix.random 0.1 --workers 2

Writes one NPZ per episode (Memory Maze layout, see `ssm_gym.maze.dataset`) named
`ep_{index:06d}.npz`; episode i is the maze of `reset(seed=seed + i)`. Existing valid files are
kept when they were made with the same settings (seed, policy, maze size, objects, length), so
an interrupted collection resumes where it stopped; others are rewritten (--overwrite redoes all).

With `--agent A --policy-mix.agent W`, a share of the episodes is driven by a saved SB3 agent
(`agents.ppo` output) that sees only the frames, with `--agent-epsilon` random actions: data from
the states that agent visits, for a world model that should imagine them well (Dyna-style):

    python -m training.collect --out-dir data/maze-agent --num-episodes 160 --seed 600000 --workers 2 \
        --agent outputs/agents/ppo-stumble-seed0 --agent-burst 16 --policy-mix.explore 0 --policy-mix.oracle 0 \
        --policy-mix.random 0 --policy-mix.agent 1
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing as mp
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import tyro
from tqdm import tqdm

from ssm_gym.maze.dataset import DatasetError, check_episode_file, save_episode
from ssm_gym.maze.policies import POLICIES
from ssm_gym.maze.record import is_agent_policy, record_episodes


@dataclass
class Args:
    out_dir: Path = Path("data/maze")
    """Folder for the episode files (created if needed)."""
    num_episodes: int = 100
    """Number of episodes (mazes) to write."""
    episode_len: int = 1000
    """Actions per episode; each file holds episode_len + 1 frames."""
    policy_mix: dict[str, float] = field(default_factory=lambda: {"explore": 0.8, "oracle": 0.1, "random": 0.1,
                                                                        "stumble": 0.0, "agent": 0.0})
    """Policy name -> weight; each episode draws one policy (names: explore, oracle, random,
    stumble: see `ssm_gym.maze.policies`; agent: the learned agent of --agent)."""
    agent: Optional[Path] = None
    """Saved SB3 agent (.zip, or an `agents.ppo` folder holding agent.zip) for the "agent" share."""
    agent_epsilon: float = 0.1
    """The agent's share of uniformly random actions (new states beside its habits)."""
    agent_burst: int = 0
    """0: the agent drives whole episodes. B > 0: the explore policy drives, and the agent takes
    over for B steps after every B to 3B explore steps, told an episode starts there (for agents
    trained on B-step episodes after real context, as `agents.ppo --max-episode-steps B`)."""
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


def _agent_file(path: Path) -> Path:
    return path / "agent.zip" if path.is_dir() else path


@functools.lru_cache(maxsize=8)
def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _policy_for(args: Args, index: int) -> str:
    """The policy of episode `index` as written in its file; a learned agent is named by its
    file's content ("agent:<sha256 prefix>, eps=<epsilon>"), so a different agent is not taken for
    an episode already done."""
    names = sorted(k for k, w in args.policy_mix.items() if w > 0)
    weights = np.array([args.policy_mix[k] for k in names], dtype=np.float64)
    name = names[int(np.random.default_rng([args.seed, index, 7]).choice(len(names), p=weights / weights.sum()))]
    if name != "agent":
        return name
    return f"agent:{_digest(_agent_file(args.agent))}, eps={args.agent_epsilon:g}, burst={args.agent_burst}"


def _write_chunk(job: tuple[Args, list[int]]) -> int:
    args, indices = job
    seeds = [args.seed + i for i in indices]
    policies = [_policy_for(args, i) for i in indices]
    act = None
    if any(is_agent_policy(p) for p in policies):
        import torch

        from agents.evaluate import load_agent, sb3_act_fn

        torch.set_num_threads(1)  # one process per core (--workers)
        act = sb3_act_fn(load_agent(args.agent))
    episodes = record_episodes(seeds, policies, args.episode_len, args.maze_size, args.n_objects,
                               policy_seed=args.seed, agent=act, agent_epsilon=args.agent_epsilon,
                               agent_burst=args.agent_burst)
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
    unknown = set(args.policy_mix) - set(POLICIES) - {"agent"}
    if unknown or not args.policy_mix or min(args.policy_mix.values()) < 0 or sum(args.policy_mix.values()) <= 0:
        raise ValueError(f"policy_mix must map names in {sorted(POLICIES) + ['agent']} to non-negative weights, "
                         f"got {args.policy_mix}")
    if args.policy_mix.get("agent", 0) > 0:
        if args.agent is None:
            raise ValueError("--policy-mix.agent > 0 needs the agent to collect with (--agent)")
        if not _agent_file(args.agent).is_file():
            raise FileNotFoundError(f"{args.agent}: no saved agent (an SB3 .zip, or a folder holding agent.zip)")
    elif args.agent is not None:
        raise ValueError("--agent given but its share of the episodes is 0 (set --policy-mix.agent)")
    if not 0.0 <= args.agent_epsilon <= 1.0 or args.agent_burst < 0:
        raise ValueError(f"need --agent-epsilon in [0, 1] and --agent-burst >= 0, got {args.agent_epsilon}, {args.agent_burst}")
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
