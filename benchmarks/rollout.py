"""Rollout engine speed and memory: env-steps/s, step time vs episode length, bytes per env.

    python benchmarks/rollout.py                          # shipped model
    python benchmarks/rollout.py --checkpoint runs/maze-cpu/model --json
    python benchmarks/rollout.py --device cuda --cuda-graph   # on a GPU, eager and graphed steps

JSON keys (same figures as the tables):
  "throughput": [{"num_envs", "env_steps_per_s", "ms_per_step"}] at the default sampling steps, timed
      after the attention window's first steps (a full ring; before session 14 timing began two
      steps after the reset, when the ring held few frames and a step was cheaper);
  "flat": [{"variant", "episode_step", "ms_per_step", "state_bytes_per_env"}] for the model's own
      variant and the full-causal-attention variant of the same width and depth (num_envs=1), with
      "ratio_last_first" per variant;
  "flops": {"num_envs", "gflop_per_step", "achieved_gflops", "matmul_gflops_fp32"} for one step at the
      largest num_envs (matmuls and attention, see ssm_gym/model/flops.py; before session 14 the
      CPU attention op went uncounted), next to this machine's matmul throughput in the same run;
  "sampling_steps", "threads", "targets".
With --action-guidance w each throughput row also has "guided_env_steps_per_s" and
"guided_ms_per_step" (classifier-free action guidance at weight w, same run; a model without the
null action gets one added, zero, for timing: speed does not depend on the weights).
With --bf16 each throughput row also has "bf16_env_steps_per_s" and "bf16_ms_per_step" (the engine's
precision="bf16", same run).
With --cuda-graph (cuda only) each throughput row also has "graph_env_steps_per_s" and
"graph_ms_per_step" (the engine's CUDA-graph step, same run), and "flops" has
"achieved_gflops_graph" (the eager step's FLOP count over the graphed step's time).
Step times at a late episode step are measured by placing the engine there: the SSM state and the
attention ring have fixed sizes, so only the step counter moves; the full-attention cache is filled
with that many frames, which is exactly what its cost depends on.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import tyro

import ssm_gym  # noqa: F401
from ssm_gym.checkpoints import load_world_model
from ssm_gym.model.attention import KVCache
from ssm_gym.model.flops import flop_counter
from ssm_gym.model.world_model import WorldModel
from ssm_gym.rollout.engine import RolloutEngine

TARGETS = {"env_steps_per_s_at_64": 1000, "flat_within": 0.10, "matmul_fraction": 0.5}


@dataclass
class Args:
    checkpoint: Optional[Path] = None
    """Checkpoint folder or a shipped model's name (default: the shipped default model, ssm_gym.checkpoints.DEFAULT)."""
    num_envs: tuple[int, ...] = (1, 16, 64, 256)
    episode_steps: tuple[int, ...] = (64, 1024, 8192)
    sampling_steps: Optional[int] = None
    """Denoising steps (default: the model's own)."""
    seconds: float = 3.0
    """Measuring time per throughput row."""
    device: str = "cpu"
    """cpu or cuda (the model, the engine and the matmul reference all run there)."""
    cuda_graph: bool = False
    """Also time the throughput rows with the engine's CUDA-graph step (cuda only), in the same run."""
    action_guidance: Optional[float] = None
    """Also time the throughput rows with action guidance at this weight (one more pass per denoising step)."""
    bf16: bool = False
    """Also time the throughput rows with the engine's precision="bf16" (bf16 autocast, bf16 attention
    ring; on a CPU with AVX-512 BF16 the fused attention kernel), in the same run."""
    json: bool = False


def first_frames(n: int) -> torch.Tensor:
    venv = gym.make_vec("SSMWorld-MazeReal-v0", num_envs=n)
    return torch.from_numpy(venv.reset(seed=0)[0])


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_steps(engine: RolloutEngine, min_seconds: float, min_steps: int = 3, warmup: int = 2) -> float:
    """Seconds per engine step (after `warmup` untimed steps)."""
    rng = np.random.default_rng(0)
    for _ in range(warmup):
        engine.step(torch.from_numpy(rng.integers(0, 6, engine.num_envs)))
    sync(engine.device)
    n, t0 = 0, time.perf_counter()
    while n < min_steps or time.perf_counter() - t0 < min_seconds:
        engine.step(torch.from_numpy(rng.integers(0, 6, engine.num_envs)))
        n += 1
    sync(engine.device)
    return (time.perf_counter() - t0) / n


def place_at_step(engine: RolloutEngine, step: int) -> None:
    """Put a 1-env engine at episode step `step` (see the module docstring)."""
    state = engine.state
    shift = step - int(state.t[0])
    state.t.fill_(step)
    for i, c in enumerate(state.kv):
        if engine.model.config.window is not None:
            # the ring keeps frame p in slot p % slots: roll it with the frame indices
            roll = lambda x: torch.roll(x, shift % c.pos.shape[1], dims=1)  # noqa: E731
            state.kv[i] = KVCache(roll(c.k), roll(c.v), roll(torch.where(c.pos >= 0, c.pos + shift, c.pos)), roll(c.keep))
            continue
        b, _, *rest = c.k.shape
        k = torch.randn(b, step, *rest, dtype=c.k.dtype, device=c.k.device) * c.k.std().clamp(min=1e-3)
        v = torch.randn(b, step, *rest, dtype=c.v.dtype, device=c.v.device) * c.v.std().clamp(min=1e-3)
        pos = torch.arange(step, device=c.k.device).expand(b, step).clone()
        state.kv[i] = KVCache(k, v, pos, torch.ones(b, step, rest[0], dtype=torch.bool, device=c.k.device))
    engine.state = state


def matmul_gflops(seconds: float = 1.0, n: int = 1024, device: str = "cpu") -> float:
    n = n if torch.device(device).type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    sync(device)
    k, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        k += 1
        if k % 8 == 0:
            sync(device)
    sync(device)
    return 2 * n**3 * k / (time.perf_counter() - t0) / 1e9


def main(args: Args) -> dict:
    if args.cuda_graph and torch.device(args.device).type != "cuda":
        raise SystemExit("--cuda-graph needs --device cuda")
    model = load_world_model(args.checkpoint, args.device)
    steps = args.sampling_steps or model.config.sample_steps
    frames = first_frames(max(args.num_envs)).to(args.device)
    out: dict = {"sampling_steps": steps, "threads": torch.get_num_threads(), "device": args.device, "targets": TARGETS}

    guided = None
    if args.action_guidance is not None:
        guided = model
        if model.action_null is None:
            guided = WorldModel(dataclasses.replace(model.config, null_action=True)).to(args.device).eval()
            guided.load_state_dict(model.state_dict(), strict=False)

    # Throughput is timed in the steady state: after a reset the attention ring holds one frame
    # and fills up over the window's first steps, which are cheaper (fewer keys) than the rest.
    warmup = max(2, model.config.window or 0)
    engines = {}

    def seconds_per_step(n: int, cuda_graph: bool, guidance: Optional[float] = None, precision: str = "fp32") -> float:
        eng = RolloutEngine(model if guidance is None else guided, n, device=args.device, sampling_steps=steps,
                            cuda_graph=cuda_graph, action_guidance=guidance, precision=precision)
        eng.reset(torch.ones(n, dtype=torch.bool), frames[:n])
        sec = time_steps(eng, args.seconds, warmup=warmup)
        if not cuda_graph and guidance is None and precision == "fp32" and n == max(args.num_envs):  # (FLOP count)
            engines[n] = eng
        return sec

    rows = []
    for n in args.num_envs:
        sec = seconds_per_step(n, False)
        row = {"num_envs": n, "env_steps_per_s": round(n / sec, 1), "ms_per_step": round(1000 * sec, 2)}
        if args.cuda_graph:
            sec = seconds_per_step(n, True)
            row.update(graph_env_steps_per_s=round(n / sec, 1), graph_ms_per_step=round(1000 * sec, 2))
        if guided is not None:
            sec = seconds_per_step(n, False, args.action_guidance)
            row.update(guided_env_steps_per_s=round(n / sec, 1), guided_ms_per_step=round(1000 * sec, 2))
        if args.bf16:
            sec = seconds_per_step(n, False, precision="bf16")
            row.update(bf16_env_steps_per_s=round(n / sec, 1), bf16_ms_per_step=round(1000 * sec, 2))
        rows.append(row)
    out["throughput"] = rows

    flat = []
    attn_cfg = dataclasses.replace(model.config, variant="attn_full")
    variants = ((model.config.variant, model), ("attn_full", WorldModel(attn_cfg).to(args.device).eval())) if args.episode_steps else ()
    for variant, m in variants:
        times = []
        for t in args.episode_steps:
            eng = RolloutEngine(m, 1, device=args.device, sampling_steps=steps)
            eng.reset(torch.ones(1, dtype=torch.bool), frames[:1])
            place_at_step(eng, t)
            sec = time_steps(eng, min(1.0, args.seconds))
            times.append(sec)
            flat.append({"variant": variant, "episode_step": t, "ms_per_step": round(1000 * sec, 2),
                         "state_bytes_per_env": eng.state.nbytes(), "state_bytes_by_part": eng.state.nbytes_by_part()})
        for r in flat[-len(times):]:
            r["ratio_last_first"] = round(times[-1] / times[0], 3)
    out["flat"] = flat

    n = max(args.num_envs)
    eng = engines[n]  # counted in the same steady state as it was timed (a full attention ring)
    with flop_counter() as counter:
        eng.step(torch.zeros(n, dtype=torch.long))
    gflop = counter.get_total_flops() / 1e9
    sec = next(r["ms_per_step"] for r in rows if r["num_envs"] == n) / 1000
    out["flops"] = {"num_envs": n, "gflop_per_step": round(gflop, 2), "achieved_gflops": round(gflop / sec, 1),
                    "matmul_gflops_fp32": round(matmul_gflops(device=args.device), 1)}
    if args.cuda_graph:  # (counted on the eager step above: a graph replay shows no ops to count)
        sec = next(r["graph_ms_per_step"] for r in rows if r["num_envs"] == n) / 1000
        out["flops"]["achieved_gflops_graph"] = round(gflop / sec, 1)

    if args.json:
        print(json.dumps(out))
        return out
    print(f"Rollout engine, {model.config.variant} model ({model.num_params() / 1e6:.2f}M params), "
          f"{steps} denoising steps + 1 state update per env-step, {out['threads']} threads")
    g, w, h = args.cuda_graph, guided is not None, args.bf16
    print(f"{'num_envs':>8} | {'env-steps/s':>11} | {'ms/step':>8}" + (f" | {'graph env-steps/s':>17} | {'ms/step':>8}" if g else "")
          + (f" | {'guided env-steps/s':>18} | {'ms/step':>8}" if w else "")
          + (f" | {'bf16 env-steps/s':>16} | {'ms/step':>8}" if h else ""))
    for r in rows:
        print(f"{r['num_envs']:>8} | {r['env_steps_per_s']:>11,.1f} | {r['ms_per_step']:>8.1f}"
              + (f" | {r['graph_env_steps_per_s']:>17,.1f} | {r['graph_ms_per_step']:>8.2f}" if g else "")
              + (f" | {r['guided_env_steps_per_s']:>18,.1f} | {r['guided_ms_per_step']:>8.1f}" if w else "")
              + (f" | {r['bf16_env_steps_per_s']:>16,.1f} | {r['bf16_ms_per_step']:>8.1f}" if h else ""))
    if flat:  # (no --episode-steps given: throughput only)
        print("\nstep time vs episode step (num_envs=1)")
        print(f"{'variant':>10} | {'episode step':>12} | {'ms/step':>8} | {'state bytes/env':>15}")
        for r in flat:
            print(f"{r['variant']:>10} | {r['episode_step']:>12,} | {r['ms_per_step']:>8.1f} | {r['state_bytes_per_env']:>15,}")
        for v in (model.config.variant, "attn_full"):
            r = next(x for x in flat if x["variant"] == v)
            print(f"{v}: step {args.episode_steps[-1]} / step {args.episode_steps[0]} time = {r['ratio_last_first']:.2f}x")
        parts = flat[0]["state_bytes_by_part"]
        print(f"{model.config.variant} state per env: " + ", ".join(f"{k} {v:,} B ({v / sum(parts.values()):.0%})" for k, v in parts.items()))
    f = out["flops"]
    print(f"\nnum_envs={f['num_envs']}: {f['gflop_per_step']} GFLOP per step, {f['achieved_gflops']} GFLOP/s achieved; "
          f"matmul {f['matmul_gflops_fp32']} GFLOP/s fp32 -> {f['achieved_gflops'] / f['matmul_gflops_fp32']:.1%}")
    if g:
        print(f"with the CUDA-graph step: {f['achieved_gflops_graph']} GFLOP/s -> "
              f"{f['achieved_gflops_graph'] / f['matmul_gflops_fp32']:.0%}")
    return out


if __name__ == "__main__":
    main(tyro.cli(Args))
