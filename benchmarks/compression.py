"""Dynamic state compression: bytes of state per environment and env-steps/s, per setting.

    python benchmarks/compression.py                         # shipped model, all settings
    python benchmarks/compression.py --checkpoint runs/maze-cpu-v2/model --num-envs 64 --json

Every setting runs the same work: `num_envs` held-out mazes, `context` real frames of exploration
(warm-up), then `steps` imagined steps on the real actions, the settings taking turns step by step
(speed: median step time, so the ratios come from one run under the same load). The bytes are those the engine holds
between steps (packed when compression is on: SSM size tiers and token pools; measured from the
tensors, not counted from a formula), averaged over the imagined steps; they depend on the scene,
which is why real maze episodes are used. "dense working set" is what one step unpacks and holds
only while it runs: the whole dense state when off or with compact storage; the dense SSM states
of one chunk (all envs, or `--chunk-envs` of them) with pool storage (the pools are read in place).
Recall quality under each setting is measured by `python -m ssm_gym.eval.recall --compression ...`.

JSON keys (same figures as the table):
  "rows": [{"setting", "state_bytes_per_env", "by_part" {"ssm_state", "ssm_conv", "attention_cache",
      "step_counter", "compression_scores"}, "dense_working_set_bytes", "env_steps_per_s", "ms_per_step",
      "memory_reduction" (off's bytes / this setting's), "speed_ratio" (vs off)}];
  "num_envs", "context", "steps", "threads", "device", "targets".
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import tyro

from ssm_gym.checkpoints import load_world_model
from ssm_gym.eval.recall import reasoning_episode
from ssm_gym.model.compression import SETTINGS
from ssm_gym.rollout.engine import RolloutEngine

TARGETS = {"state_memory_reduction": 2.0}


@dataclass
class Args:
    checkpoint: Optional[Path] = None
    """Checkpoint folder or a shipped model's name (default: the shipped default model, ssm_gym.checkpoints.DEFAULT)."""
    settings: tuple[str, ...] = tuple(SETTINGS)
    num_envs: int = 16
    context: int = 200
    """Real frames each env is warmed up on."""
    steps: int = 40
    """Imagined steps measured (bytes averaged, time per step)."""
    sampling_steps: Optional[int] = None
    chunk_envs: Optional[int] = None
    """Compressed engines step this many envs at a time (default: all at once)."""
    first_seed: int = 2_000_000
    device: str = "cpu"
    json: bool = False


def measure_all(model, episodes, args: Args) -> list[dict]:
    """One engine per setting, all warmed up on the same real context, then stepped in turns
    (setting A's step i, B's step i, ...) on the same real actions: machine load that drifts over
    a run hits every setting alike, and the speed is the median step time."""
    n, c = len(episodes), args.context
    ctx = torch.from_numpy(np.stack([e.frames[:c] for e in episodes]))
    acts = torch.from_numpy(np.stack([e.actions[: c - 1] for e in episodes]))
    later = torch.from_numpy(np.stack([e.actions[c - 1:c - 1 + args.steps] for e in episodes]))
    engines = {}
    for setting in args.settings:
        eng = RolloutEngine(model, n, device=args.device, sampling_steps=args.sampling_steps, compression=setting,
                            chunk_envs=args.chunk_envs)
        eng.reset(torch.ones(n, dtype=torch.bool), ctx, acts)
        engines[setting] = eng
    seconds = {s: [] for s in engines}
    parts = {s: {} for s in engines}
    for i in range(args.steps):
        for setting, eng in engines.items():
            t0 = time.perf_counter()
            eng.step(later[:, i])
            if eng.device.type == "cuda":  # (kernels run asynchronously: time them finished)
                torch.cuda.synchronize()
            seconds[setting].append(time.perf_counter() - t0)
            for k, v in eng.model_state_nbytes_by_part().items():
                parts[setting][k] = parts[setting].get(k, 0.0) + v / (n * args.steps)
    rows = []
    for setting, eng in engines.items():
        chunk = min(eng.chunk_envs or n, n) if eng.packed else n
        full = model.init_state(chunk, args.device, compression=setting).nbytes_by_part()
        in_place = eng.packed and eng.compression.storage == "pool"  # (compact storage rebuilds the ring)
        dense = full["ssm_state"] + full["ssm_conv"] if in_place else sum(full.values())  # unpacked per step
        sec = statistics.median(seconds[setting][2:])  # (the first steps warm caches up)
        rows.append({"setting": setting, "state_bytes_per_env": round(sum(parts[setting].values())),
                     "by_part": {k: round(v) for k, v in parts[setting].items()}, "dense_working_set_bytes": dense,
                     "env_steps_per_s": n / sec, "ms_per_step": 1e3 * sec})
    return rows


@torch.no_grad()
def main(args: Args) -> dict:
    if args.steps < 3:
        raise ValueError(f"--steps must be >= 3 (the first two are warm-up), got {args.steps}")
    model = load_world_model(args.checkpoint, args.device)
    episodes = [reasoning_episode(args.first_seed + i, args.context, args.steps) for i in range(args.num_envs)]
    rows = measure_all(model, episodes, args)
    base = next((r for r in rows if r["setting"] == "off"), rows[0])
    for r in rows:
        r["memory_reduction"] = base["state_bytes_per_env"] / r["state_bytes_per_env"]
        r["speed_ratio"] = r["env_steps_per_s"] / base["env_steps_per_s"]
    result = {"rows": rows, "num_envs": args.num_envs, "context": args.context, "steps": args.steps,
              "threads": torch.get_num_threads(), "device": args.device, "targets": TARGETS}
    if args.json:
        print(json.dumps(result, indent=2))
        return result
    kb = lambda b: f"{b / 1e3:,.0f}"  # noqa: E731
    print(f"State compression: {args.num_envs} envs on held-out mazes, {args.context} real frames, then "
          f"{args.steps} imagined steps ({args.device}, {torch.get_num_threads()} threads)\n")
    print("| setting | state kB/env | vs off | SSM state kB | attention cache kB | conv + scores kB | dense working set MB | env-steps/s | vs off |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        p = r["by_part"]
        other = p.get("ssm_conv", 0) + p.get("compression_scores", 0) + p.get("step_counter", 0)
        print(f"| {r['setting']} | {kb(r['state_bytes_per_env'])} | {r['memory_reduction']:.2f}x | {kb(p['ssm_state'])} | "
              f"{kb(p['attention_cache'])} | {kb(other)} | {r['dense_working_set_bytes'] / 1e6:,.1f} | "
              f"{r['env_steps_per_s']:.1f} | {r['speed_ratio']:.2f}x |")
    print(f"\ntarget: >= {TARGETS['state_memory_reduction']:.0f}x less state per env (with <= 0.5 dB retrieval loss: "
          "see the recall benchmark)")
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
