"""Train the recall benchmark's models side by side at equal compute: ours and its baselines.

    python -m training.baselines --device cuda --time-budget-s 300 --out-dir runs/baselines
    python -m training.baselines --device cpu --time-budget-s 3600 --parallel 1 --runs ours attn-local

Every run is `python -m training.train maze-timed` (the shipped model's width and depth, the same
data, the same curriculum and schedule) with the same wall-time budget, plus the flags below that
make it a baseline; the exact command of each run is printed and written to `commands.txt`.
With `--parallel` equal to the number of runs they share one machine for the same wall time
(on a GPU: one GPU, each process its own CUDA context), which is what "equal compute" means here;
`summary.md` lists the steps and frames each one reached in that time.
"""

from __future__ import annotations

import csv
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

BLOCK_1 = ["--model.block-sizes.0", "1", "1", "--model.block-sizes.1", "1", "1", "--model.block-sizes.2", "1", "1"]

# name -> (what it is, flags over the maze-timed preset)
RUNS: dict[str, tuple[str, list[str]]] = {
    "ours": ("block-wise SSM + frame-local attention, long-context training, curriculum", []),
    "attn-local": ("frame-local attention only (window k), no SSM", ["--model.variant", "attn_local"]),
    "mamba2-flat": ("Mamba-2 over the flattened frame (no block-wise scan) + frame-local attention",
                    ["--model.variant", "ssm_flat"]),
    "attn-full": ("causal attention over all past frames (KV cache grows)", ["--model.variant", "attn_full"]),
    "ours-no-lct": ("ours without long-context training", ["--no-long-context"]),
    "ours-block-1": ("ours with block size 1x1 in every layer", BLOCK_1),
    "ours-fixed-256": ("ours without curriculum: 256-frame clips throughout", ["--stage-clip-lens", "256", "--stage-steps", "1"]),
}


@dataclass
class Args:
    out_dir: Path = Path("runs/baselines")
    """One sub-folder per run (its training run folder), plus commands.txt, summary.json, summary.md."""
    runs: tuple[str, ...] = tuple(RUNS)
    """Which runs (names: ours, attn-local, mamba2-flat, attn-full, ours-no-lct, ours-block-1, ours-fixed-256)."""
    device: str = "cuda"
    time_budget_s: float = 300.0
    """Training wall time of every run (seconds)."""
    parallel: int = 0
    """Runs at once (0: all)."""
    data_dir: Path = Path("data/maze")
    val_dir: Path = Path("data/maze-val")
    threads: int = 2
    """torch CPU threads per run."""
    extra: str = ""
    """More flags for every run, as one string: --extra="--frames-per-step 512 --lr 3e-4"."""


def command(args: Args, name: str) -> list[str]:
    return [sys.executable, "-m", "training.train", "maze-timed", "--out-dir", str(args.out_dir / name),
            "--data-dir", str(args.data_dir), "--val-dir", str(args.val_dir), "--device", args.device,
            "--time-budget-s", str(args.time_budget_s), "--threads", str(args.threads), *RUNS[name][1], *shlex.split(args.extra)]


def last_row(path: Path) -> dict:
    if not path.is_file():
        return {}
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return rows[-1] if rows else {}


def summarize(args: Args, codes: dict[str, int]) -> list[dict]:
    rows = []
    for name in args.runs:
        run = args.out_dir / name
        m, v = last_row(run / "metrics.csv"), last_row(run / "val.csv")
        frames = 0
        if (run / "metrics.csv").is_file():
            with (run / "metrics.csv").open() as f:
                prev = 0
                for r in csv.DictReader(f):  # frames = sum over logged intervals of steps x batch x clip length
                    frames += (int(r["step"]) - prev) * int(r["batch"]) * int(r["clip_len"])
                    prev = int(r["step"])
        rows.append({"run": name, "what": RUNS[name][0], "exit_code": codes.get(name), "steps": m.get("step"),
                     "frames": frames, "train_s": m.get("elapsed_s"), "loss": m.get("loss"),
                     "val_psnr_1step": v.get("psnr_1step"), "val_psnr_100step": v.get("psnr_100step"),
                     "model": str(run / "model") if (run / "model" / "config.json").is_file() else None})
    return rows


def main(args: Args) -> list[dict]:
    unknown = set(args.runs) - set(RUNS)
    if unknown:
        raise SystemExit(f"unknown runs {sorted(unknown)}; choose from {', '.join(RUNS)}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    cmds = {name: command(args, name) for name in args.runs}
    (args.out_dir / "commands.txt").write_text("".join(f"# {n}: {RUNS[n][0]}\n{shlex.join(c)}\n" for n, c in cmds.items()))
    width = args.parallel or len(cmds)
    pending, running, codes = list(cmds), {}, {}
    t0 = time.perf_counter()
    while pending or running:
        while pending and len(running) < width:
            name = pending.pop(0)
            print(f"[{time.perf_counter() - t0:6.0f}s] start {name}: {shlex.join(cmds[name])}", flush=True)
            log = (args.out_dir / f"{name}.log").open("w")
            running[name] = (subprocess.Popen(cmds[name], stdout=log, stderr=subprocess.STDOUT), log)
        time.sleep(1.0)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                codes[name] = proc.returncode
                print(f"[{time.perf_counter() - t0:6.0f}s] {name} exited with {proc.returncode}", flush=True)
                del running[name]
    rows = summarize(args, codes)
    (args.out_dir / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| run | steps | frames | train s | loss | val PSNR 1-step | val PSNR 100-step | what |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['run']} | {r['steps']} | {r['frames']:,} | {r['train_s']} | {r['loss']} | {r['val_psnr_1step']} | "
              f"{r['val_psnr_100step']} | {r['what']} |" for r in rows]
    (args.out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    failed = [n for n, c in codes.items() if c != 0]
    if failed:
        print(f"failed runs: {failed}; see {args.out_dir}/<run>.log", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
