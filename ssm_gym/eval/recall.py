"""Long-horizon recall benchmark on the ground-truth maze (the paper's Memory Maze protocol).

    python -m ssm_gym.eval.recall --checkpoints runs/a/model runs/b/model --names ours attn-local \
        --num-mazes 16 --context 400
    python -m ssm_gym.eval.recall --merge out/a/recall.json out/b/recall.json --out-dir out/all
    python -m ssm_gym.eval.recall --checkpoints ssm_gym/checkpoints/maze-cpu --compression off strong

Retrieval: on held-out maze seeds, the model sees a real exploration of `context` steps (frames
and actions), then generates frames while the agent goes back to earlier poses and retraces
earlier stretches (`ssm_gym.maze.policies.revisit_route`). Every retraced frame is a revisit: its
ground truth is a frame seen during the context. Reported per frame and as a curve over the gap
(steps since the pose was last seen).
Reasoning: the same context, then random actions into places the context may not have shown;
compared with the real maze's frames.

With `--compression`, every checkpoint is evaluated under each state-compression setting (named
`model+setting`), and the bytes of model state held per environment are recorded next to the
scores (mean over the generated steps, as the engine holds them), with the generation speed.

Writes `recall.json` (all numbers), `recall.md` (tables) and `recall_psnr_vs_gap.png` /
`recall_ssim_vs_gap.png` (all checkpoints in one figure) to `--out-dir`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import tyro
from tqdm import tqdm

from ssm_gym.eval.metrics import psnr, ssim
from ssm_gym.maze.layout import generate_maze
from ssm_gym.maze.policies import revisit_gaps, revisit_route
from ssm_gym.maze.sim import MazeBatch
from ssm_gym.checkpoints import load_world_model
from ssm_gym.model.compression import get_compression
from ssm_gym.rollout.engine import RolloutEngine

GAP_EDGES = (1, 10, 50, 100, 200, 400, 800, 1600, 10**9)


@dataclass
class Episode:
    """Real frames and actions of one evaluation episode, and what its later frames revisit."""

    seed: int
    frames: np.ndarray  # (T+1, 64, 64, 3) uint8 real frames
    actions: np.ndarray  # (T,) int64, actions[i] taken after frames[i]
    context: int  # frames[:context] are given to the model
    gaps: np.ndarray  # (T+1,) steps since the same pose was last seen (-1: never)
    source: np.ndarray  # (T+1,) for retraced frames, the context frame with the same pose; -1 else

    @property
    def retrace(self) -> np.ndarray:
        """(T+1,) bool: the frame retraces the context (the frames retrieval is scored on)."""
        return self.source >= 0


def real_frames(seed: int, actions: np.ndarray, maze_size: int = 9, n_objects: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Frames and poses of the real maze for seed `seed` under `actions` (targets change as in the env)."""
    sim = MazeBatch(1, maze_size, n_objects)
    sim.reset_env(0, np.random.default_rng(seed))
    frames, poses = [sim.render()[0]], [sim.pose[0].copy()]
    for a in actions:
        sim.step(np.array([a]))
        frames.append(sim.render()[0])
        poses.append(sim.pose[0].copy())
    return np.stack(frames), np.stack(poses)


def retrieval_episode(seed: int, context: int, n_revisits: int, retrace_len: int) -> Episode:
    maze = generate_maze(np.random.default_rng(seed))
    route = revisit_route(maze, np.random.default_rng([seed, 1]), explore_steps=context - 1,
                          n_revisits=n_revisits, retrace_len=retrace_len)
    frames, poses = real_frames(seed, route.actions)
    return Episode(seed, frames, route.actions, context, revisit_gaps(poses), route.retrace_of)


def reasoning_episode(seed: int, context: int, horizon: int) -> Episode:
    maze = generate_maze(np.random.default_rng(seed))
    explore = revisit_route(maze, np.random.default_rng([seed, 1]), explore_steps=context - 1, n_revisits=0,
                            retrace_len=0).actions
    rand = np.random.default_rng([seed, 2]).integers(0, 6, horizon)
    actions = np.concatenate([explore, rand])
    frames, poses = real_frames(seed, actions)
    return Episode(seed, frames, actions, context, revisit_gaps(poses), np.full(len(frames), -1))


@torch.no_grad()
def imagine(model, episodes: list[Episode], sampling_steps: Optional[int], seed: int, device: str,
            compression: str = "off", stats: Optional[dict] = None, chunk_envs: Optional[int] = None) -> list[np.ndarray]:
    """Warm the model up on each episode's real context, then generate the rest open-loop for
    the real actions; all episodes in one batch. Returns the generated frames per episode,
    aligned with `frames[context:]`. ``stats``, if given, receives the mean bytes of model state
    per environment over the generated steps (total and by part) and the generation speed
    (env-steps/s after two warm-up steps)."""
    n, c = len(episodes), episodes[0].context
    engine = RolloutEngine(model, n, device=device, sampling_steps=sampling_steps, seed=seed, compression=compression,
                           chunk_envs=chunk_envs)
    ctx = torch.from_numpy(np.stack([e.frames[:c] for e in episodes]))
    acts = torch.from_numpy(np.stack([e.actions[: c - 1] for e in episodes]))
    engine.reset(torch.ones(n, dtype=torch.bool), ctx, acts)
    horizon = max(len(e.actions) - (c - 1) for e in episodes)
    padded = np.zeros((n, horizon), dtype=np.int64)
    for i, e in enumerate(episodes):
        rest = e.actions[c - 1 :]
        padded[i, : len(rest)] = rest
    out = np.empty((n, horizon, *episodes[0].frames.shape[1:]), dtype=np.uint8)
    parts: dict[str, float] = {}
    step_seconds = 0.0
    for t in tqdm(range(horizon), desc="imagine", leave=False):
        t0 = time.perf_counter()
        out[:, t] = engine.step(torch.from_numpy(padded[:, t]))[0].cpu().numpy()
        step_seconds += time.perf_counter() - t0 if t >= 2 else 0.0
        for k, v in engine.model_state_nbytes_by_part().items():
            parts[k] = parts.get(k, 0.0) + v / (n * horizon)
    if stats is not None:
        stats.update({"state_bytes_per_env": round(sum(parts.values())),
                      "state_bytes_by_part": {k: round(v) for k, v in parts.items()}})
        if horizon > 2:
            stats["env_steps_per_s"] = n * (horizon - 2) / step_seconds
    return [out[i, : len(e.actions) - (c - 1)] for i, e in enumerate(episodes)]


def score(episodes: list[Episode], generated: list[np.ndarray], retrieval: bool) -> dict:
    """Per-frame PSNR/SSIM of generated vs real frames, overall and binned by gap."""
    ps, ss, gaps = [], [], []
    for e, g in zip(episodes, generated):
        real = e.frames[e.context :]
        keep = e.retrace[e.context :] if retrieval else np.ones(len(real), bool)
        ps.append(psnr(g[keep], real[keep]))
        ss.append(ssim(g[keep], real[keep]))
        gaps.append(e.gaps[e.context :][keep])
    ps, ss, gaps = np.concatenate(ps), np.concatenate(ss), np.concatenate(gaps)
    bins = []
    for lo, hi in zip(GAP_EDGES[:-1], GAP_EDGES[1:]):
        m = (gaps >= lo) & (gaps < hi)
        if m.any():
            bins.append({"gap_min": lo, "gap_max": hi - 1, "frames": int(m.sum()), "psnr": float(ps[m].mean()),
                         "ssim": float(ss[m].mean())})
    return {"frames": int(len(ps)), "psnr": float(ps.mean()), "ssim": float(ss.mean()), "by_gap": bins}


@dataclass
class Args:
    checkpoints: tuple[Path, ...] = ()
    """World-model checkpoint folders (or shipped models' names) to compare."""
    merge: tuple[Path, ...] = ()
    """Instead of evaluating: combine the recall.json files of earlier runs (for example one
    process per checkpoint) into one recall.json, table and figure in --out-dir. The runs must
    share their protocol settings (mazes, context, routes, sampling steps)."""
    names: tuple[str, ...] = ()
    """A name per checkpoint for tables and plots (default: folder names)."""
    num_mazes: int = 8
    first_seed: int = 2_000_000
    """Held-out maze seeds first_seed, first_seed + 1, ... (training data uses small seeds)."""
    context: int = 400
    """Real frames the model sees before generating."""
    n_revisits: int = 4
    retrace_len: int = 50
    reasoning_horizon: int = 100
    tasks: tuple[str, ...] = ("retrieval", "reasoning")
    sampling_steps: Optional[int] = None
    device: str = "cpu"
    seed: int = 0
    out_dir: Path = Path("outputs/recall")
    compression: tuple[str, ...] = ("off",)
    """State-compression settings to evaluate every checkpoint under (ssm_gym/model/compression.py)."""
    extra: dict[str, str] = field(default_factory=dict)
    """Free-form notes stored in recall.json (e.g. how the checkpoints were trained)."""


PROTOCOL_KEYS = ("num_mazes", "first_seed", "context", "n_revisits", "retrace_len", "reasoning_horizon", "sampling_steps", "seed")


def merge(files: tuple[Path, ...]) -> dict:
    """One results dict from several recall.json files evaluated under the same protocol."""
    merged: dict = {}
    for f in files:
        try:
            res = json.loads(Path(f).read_text())
            protocol = {k: res["args"][k] for k in PROTOCOL_KEYS}
            models = res["models"]
        except FileNotFoundError:
            raise FileNotFoundError(f"{f}: no such recall.json") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{f}: not a recall.json written by this benchmark ({type(e).__name__}: {e})") from None
        if not merged:
            merged = {"args": {**res["args"], "checkpoints": [], "merged_from": []}, "models": {}}
        differ = {k: (merged["args"][k], v) for k, v in protocol.items() if merged["args"][k] != v}
        if differ:
            raise ValueError(f"{f}: evaluated under a different protocol than {merged['args']['merged_from'][0]}: {differ}")
        clash = set(models) & set(merged["models"])
        if clash:
            raise ValueError(f"{f}: model names {sorted(clash)} already present; give the runs distinct --names")
        merged["models"].update(models)
        merged["args"]["checkpoints"] += res["args"].get("checkpoints", [])
        merged["args"]["merged_from"].append(str(f))
    return merged


def write(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "recall.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "recall.md").write_text(markdown(results))
    plot(results, out_dir)


def run(args: Args) -> dict:
    if args.merge:
        if args.checkpoints:
            raise ValueError("give either --checkpoints (evaluate) or --merge (combine earlier results), not both")
        results = merge(args.merge)
        write(results, args.out_dir)
        return results
    if not args.checkpoints:
        raise ValueError("no --checkpoints to evaluate (or --merge files to combine)")
    names = list(args.names) or [Path(c).name if Path(c).name != "model" else Path(c).parent.name for c in args.checkpoints]
    if len(names) != len(args.checkpoints):
        raise ValueError(f"{len(args.checkpoints)} checkpoints but {len(names)} names")
    unknown = set(args.tasks) - {"retrieval", "reasoning"}
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; choose from retrieval, reasoning")
    if args.context < 2:
        raise ValueError("context must be at least 2 frames")
    for c in args.compression:
        get_compression(c)  # unknown names fail before any work
    seeds = range(args.first_seed, args.first_seed + args.num_mazes)
    data = {}
    if "retrieval" in args.tasks:
        data["retrieval"] = [retrieval_episode(s, args.context, args.n_revisits, args.retrace_len) for s in seeds]
    if "reasoning" in args.tasks:
        data["reasoning"] = [reasoning_episode(s, args.context, args.reasoning_horizon) for s in seeds]
    results = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "models": {}}
    results["args"]["checkpoints"] = [str(c) for c in args.checkpoints]
    for name, ckpt in zip(names, args.checkpoints):
        model = load_world_model(ckpt, args.device)
        for comp in args.compression:
            key = name if comp == "off" and len(args.compression) == 1 else f"{name}+{comp}"
            entry = results["models"][key] = {"checkpoint": str(ckpt), "variant": model.config.variant,
                                              "compression": comp}
            for task, eps in data.items():
                stats: dict = {}
                gen = imagine(model, eps, args.sampling_steps, args.seed, args.device, comp, stats)
                entry[task] = {**score(eps, gen, retrieval=task == "retrieval"), **stats}
    write(results, args.out_dir)
    return results


def markdown(results: dict) -> str:
    lines = []
    for task in ("retrieval", "reasoning"):
        rows = [(n, m[task]) for n, m in results["models"].items() if task in m]
        if not rows:
            continue
        lines += [f"### {task.capitalize()}", "", "| model | variant | frames | SSIM | PSNR (dB) | state kB/env |",
                  "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {n} | {results['models'][n]['variant']} | {r['frames']} | {r['ssim']:.3f} | {r['psnr']:.2f} | "
                  + (f"{r['state_bytes_per_env'] / 1e3:,.0f} |" if "state_bytes_per_env" in r else "- |") for n, r in rows]
        gaps = sorted({(b["gap_min"], b["gap_max"]) for _, r in rows for b in r["by_gap"]})
        if gaps:
            lines += ["", "PSNR (dB) by gap (steps since the pose was last seen):", "",
                      "| model | " + " | ".join(f"{lo}-{hi if hi < 10**8 else 'inf'}" for lo, hi in gaps) + " |",
                      "|---|" + "---:|" * len(gaps)]
            for n, r in rows:
                by = {(b["gap_min"], b["gap_max"]): b["psnr"] for b in r["by_gap"]}
                lines.append(f"| {n} | " + " | ".join(f"{by[g]:.2f}" if g in by else "-" for g in gaps) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(results: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for metric in ("psnr", "ssim"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, m in results["models"].items():
            if "retrieval" not in m or not m["retrieval"]["by_gap"]:
                continue
            bins = m["retrieval"]["by_gap"]
            ax.plot([np.sqrt(b["gap_min"] * min(b["gap_max"], 4 * b["gap_min"])) for b in bins],
                    [b[metric] for b in bins], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("gap (steps since the pose was last seen)")
        ax.set_ylabel("PSNR (dB)" if metric == "psnr" else "SSIM")
        ax.set_title(f"Retrieval {metric.upper()} vs gap")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / f"recall_{metric}_vs_gap.png", dpi=120)
        plt.close(fig)


def main(args: Args) -> None:
    res = run(args)
    print(markdown(res))
    print(f"wrote {args.out_dir}/recall.json, recall.md, recall_psnr_vs_gap.png, recall_ssim_vs_gap.png")


if __name__ == "__main__":
    main(tyro.cli(Args))
