"""SSD scan and world-model training throughput on this machine.

    python benchmarks/ssm_scan.py            # human-readable tables
    python benchmarks/ssm_scan.py --json     # one JSON object with the same figures
    python benchmarks/ssm_scan.py --device cuda   # on a GPU: adds mamba-ssm's kernel when installed

JSON keys
- ``device``: str, ``threads``: int, ``torch``: torch version.
- ``scan``: list, one entry per sequence length L:
  ``L`` (tokens), ``chunk_size``, ``sequential_ms`` (plain recurrence, forward), ``chunked_ms``
  (pure-PyTorch chunked SSD, forward), ``speedup`` (sequential / chunked), ``max_rel_err``
  (chunked fp32 vs sequential fp64, normwise: max|diff| / max|ref|); on the CPU, where the fused
  C++ kernel builds, also ``fused_ms``, ``fused_speedup`` (sequential / fused) and
  ``fused_max_rel_err``; on CUDA with mamba-ssm installed ``mamba_ms``, ``mamba_speedup``
  (sequential / mamba) and ``mamba_max_rel_err``.
  Times are best of ``repeats``.
  Shape: batch ``scan_batch`` sequences, 8 heads x 32 headdim, d_state 16 (the default layer).
- ``matmul_gflops``: {"fp32": ..., "bf16": ...}: measured square matmul (``matmul_n``) GFLOP/s.
- ``train``: list, one entry per precision ("fp32", "bf16" = bf16 autocast) and SSD backend
  ("torch"; "cpu", the fused kernel, too on the CPU; "mamba" too on CUDA with mamba-ssm), with
  the diffusion-forcing objective, then both precisions with noised copies (every frame
  denoised from its clean history, the trainer's ``--noised-copies``) on the last backend; where
  the fused CPU attention kernel builds, each bf16 step also once with torch's attention and
  torch's elementwise ops (no modulated-norm or GELU kernels; with the "torch" backend the SSM's
  convolution and gated norm are torch's too): ``objective`` ("diffusion forcing" or "noised
  copies"), ``precision``, ``attention`` ("fused": the fused bf16 attention kernel and the
  elementwise kernels, or "torch"), ``backend``,
  ``batch``, ``frames_per_clip``, ``step_s`` (mean seconds per optimizer step, after warm-up),
  ``frames_per_s`` (clip frames), ``loss_frames_per_s`` (frames that carry a denoising loss: the
  noised ones of diffusion forcing, with its default long-context clean prefix; every frame with
  copies), ``gflop_per_step`` (FlopCounterMode count of one train step, forward + backward,
  counted once and used for every row: where the fused attention kernel builds, on a bf16 step
  with it, which counts the keys each query attends to; else on an fp32 step, where torch's CPU
  attention op is counted as dense over the keys it is given, masked ones included, about 10%
  more for the whole step. The fused scan (about 2% of the arithmetic) is not counted: the
  figure is conservative), ``achieved_gflops``, ``frac_of_matmul`` (achieved / matmul GFLOP/s of
  the same precision).
- ``attention``: list, one entry per precision and attention implementation: one frame-local
  attention layer of the default config (its clip form, as in training: the same batch and clip,
  qkv and out projections included), forward + backward: ``precision``, ``attention``, ``ms``
  (best of ``repeats``), ``gflop`` (counted as for ``train``), ``achieved_gflops``,
  ``frac_of_matmul``, ``share_of_train_step`` (n_layers x ms over the diffusion-forcing train
  step of the same precision and attention, last backend): where a step's time goes.
- ``model``: {"params": int, "config": WorldModelConfig as a dict}.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

import torch
import tyro

from ssm_gym.model import (
    HAS_MAMBA_SSM,
    WorldModel,
    WorldModelConfig,
    cpu_kernel,
    diffusion_forcing_loss,
    ssd,
    ssd_chunked,
    ssd_fused_cpu,
    ssd_sequential,
)
from ssm_gym.model.attention import attention_kernel, fused_attention
from ssm_gym.model.pointwise import fused_pointwise
from ssm_gym.model.flops import flop_counter


@dataclass
class Args:
    json: bool = False
    """print one JSON object instead of tables"""
    threads: int = 0
    """torch threads (0 = torch default)"""
    device: str = "cpu"
    """"cpu" or "cuda" (fp32 matmuls without TF32, so the scan errors compare across devices)"""
    lengths: tuple[int, ...] = (256, 1024, 4096)
    scan_batch: int = 4
    chunk_size: int = 16
    matmul_n: int = 1024
    batch: int = 4
    """clips per train step"""
    frames: int = 16
    """frames per clip"""
    steps: int = 3
    """timed train steps per precision"""
    repeats: int = 3
    """timed repeats for scans / matmuls (best of)"""


def timed_once(fn, device: str = "cpu") -> float:
    """Seconds of one call of fn, the device's queued work included."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def best_time(fn, repeats: int, device: str = "cpu") -> float:
    fn()  # warm-up
    return min(timed_once(fn, device) for _ in range(repeats))


def has_mamba(device: str) -> bool:
    return device.startswith("cuda") and HAS_MAMBA_SSM


def has_fused_attention(device: str) -> bool:
    return device == "cpu" and attention_kernel() is not None


def has_fused_cpu(device: str) -> bool:
    return device == "cpu" and cpu_kernel() is not None


def bench_scan(args: Args) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    h, p, n, b, dev = 8, 32, 16, args.scan_batch, args.device
    for L in args.lengths:
        x = torch.randn(b, L, h, p, generator=g).to(dev)
        dt = (torch.rand(b, L, h, generator=g) * 0.1 + 1e-3).to(dev)
        A = (-(torch.rand(h, generator=g) * 4 + 0.5)).to(dev)
        B = torch.randn(b, L, 1, n, generator=g).to(dev)
        C = torch.randn(b, L, 1, n, generator=g).to(dev)
        D = torch.ones(h, device=dev)
        inputs = (x, dt, A, B, C)
        with torch.no_grad():
            t_seq = best_time(lambda: ssd_sequential(*inputs, D), args.repeats, dev)  # noqa: B023
            t_chk = best_time(lambda: ssd_chunked(*inputs, args.chunk_size, D), args.repeats, dev)  # noqa: B023
            y_ref = ssd_sequential(*(a.double() for a in inputs), D.double())[0]
            y = ssd_chunked(x, dt, A, B, C, args.chunk_size, D)[0]
        row = {"L": L, "chunk_size": args.chunk_size, "sequential_ms": 1e3 * t_seq, "chunked_ms": 1e3 * t_chk,
               "speedup": t_seq / t_chk, "max_rel_err": rel_err(y, y_ref)}
        if has_fused_cpu(dev):  # the fused C++ recurrence (ssm_gym/model/csrc/ssd_cpu.cpp)
            with torch.no_grad():
                t_fu = best_time(lambda: ssd_fused_cpu(*inputs, D), args.repeats, dev)  # noqa: B023
                y_fu = ssd_fused_cpu(*inputs, D)[0]
            row.update(fused_ms=1e3 * t_fu, fused_speedup=t_seq / t_fu, fused_max_rel_err=rel_err(y_fu, y_ref))
        if has_mamba(dev):  # mamba-ssm's fused kernel (its own chunk size: 64 is what Mamba-2 uses)
            with torch.no_grad():
                t_mb = best_time(lambda: ssd(*inputs, D, chunk_size=64, backend="mamba"), args.repeats, dev)  # noqa: B023
                y_mb = ssd(*inputs, D, chunk_size=64, backend="mamba")[0]
            row.update(mamba_ms=1e3 * t_mb, mamba_speedup=t_seq / t_mb, mamba_max_rel_err=rel_err(y_mb, y_ref))
        rows.append(row)
    return rows


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def bench_matmul(args: Args) -> dict:
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(args.matmul_n, args.matmul_n).to(args.device, dtype)
        b = torch.randn(args.matmul_n, args.matmul_n).to(args.device, dtype)
        reps = 10 if args.device == "cpu" else 100
        t = best_time(lambda: [a @ b for _ in range(reps)], args.repeats, args.device)  # noqa: B023
        out[name] = 2 * args.matmul_n ** 3 * reps / t / 1e9
    return out


def bench_train(args: Args, matmul: dict) -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    dev = torch.device(args.device)
    cfg = WorldModelConfig(backend="cpu" if has_fused_cpu(args.device) else "torch")
    model = WorldModel(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device=dev).manual_seed(0)
    b, t = args.batch, args.frames
    frames = torch.randint(0, 256, (b, t, cfg.image_size, cfg.image_size, cfg.channels), generator=g, dtype=torch.uint8,
                           device=dev)
    actions = torch.randint(0, cfg.n_actions + 1, (b, t), generator=g, device=dev)
    rewards = torch.zeros(b, t, device=dev)

    noised = []  # share of frames with a loss, per step

    def step(bf16: bool, copies: bool):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss, stats = diffusion_forcing_loss(model, frames, actions, rewards, rewards, generator=g,
                                                 noised_copies=copies)
        noised.append(stats["noised_frac"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    flops = {}
    fused = has_fused_attention(args.device)
    for copies in (False, True):  # the same model and clip for every backend
        with flop_counter() as fc:  # (the fused attention's count: the keys attended, no masked ones)
            step(fused, copies)
        flops[copies] = fc.get_total_flops()
    rows = []
    backends = ("torch",) + (("mamba",) if has_mamba(args.device) else ()) + (("cpu",) if has_fused_cpu(args.device) else ())
    runs = [(backend, False) for backend in backends] + [(backends[-1], True)]
    for backend, copies in runs:
        for layer in model.layers:
            if layer.ssm is not None:
                layer.ssm.backend = backend
        # (fp32 with the elementwise kernels, as it runs; the attention kernel is bf16 only)
        precisions = [("fp32", False, True), ("bf16", True, True)]
        if fused:  # the same bf16 step with torch's attention and elementwise ops, for the kernels' share
            precisions.append(("bf16", True, False))
        for name, bf16, use_fused in precisions:
            with fused_attention(use_fused), fused_pointwise(use_fused):  # ("torch": torch's ops throughout)
                step(bf16, copies)  # warm-up (one step, as the timed steps follow it)
                noised.clear()
                dt = timed_once(lambda: [step(bf16, copies) for _ in range(args.steps)], args.device) / args.steps  # noqa: B023
            achieved = flops[copies] / dt / 1e9
            rows.append({"objective": "noised copies" if copies else "diffusion forcing", "precision": name,
                         "attention": "fused" if bf16 and use_fused and fused else "torch",
                         "backend": backend, "batch": b, "frames_per_clip": t, "step_s": dt,
                         "frames_per_s": b * t / dt, "loss_frames_per_s": b * t * sum(noised) / len(noised) / dt,
                         "gflop_per_step": flops[copies] / 1e9, "achieved_gflops": achieved,
                         "frac_of_matmul": achieved / matmul[name]})
    model_info = {"params": model.num_params(), "config": dataclasses.asdict(cfg)}
    return rows, model_info


def bench_attention(args: Args, matmul: dict, train: list[dict]) -> list[dict]:
    """One attention layer of the default config on a training clip, forward + backward."""
    torch.manual_seed(0)
    dev = torch.device(args.device)
    cfg = WorldModelConfig()
    attn = WorldModel(cfg).layers[0].attn.to(dev)  # (the step's own layer, built as the model builds it)
    x = torch.randn(args.batch, args.frames, attn.n_tok, cfg.d_model, device=dev, requires_grad=True)
    pos = torch.arange(args.frames, device=dev)[None].expand(args.batch, -1)

    def once(bf16: bool):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            y, _ = attn(x, pos)
        y.float().square().mean().backward()

    fused = has_fused_attention(args.device)
    with flop_counter() as fc:
        once(fused)
    flops = fc.get_total_flops()
    rows = []
    runs = [("fp32", False, "torch"), ("bf16", True, "torch")] + ([("bf16", True, "fused")] if fused else [])
    for name, bf16, kind in runs:
        with fused_attention(kind == "fused"):
            once(bf16)
            dt = best_time(lambda: once(bf16), args.repeats, args.device)  # noqa: B023
        step = next(r for r in reversed(train) if r["precision"] == name and r["attention"] == kind
                    and r["objective"] == "diffusion forcing")
        rows.append({"precision": name, "attention": kind, "ms": dt * 1e3, "gflop": flops / 1e9,
                     "achieved_gflops": flops / dt / 1e9, "frac_of_matmul": flops / dt / 1e9 / matmul[name],
                     "share_of_train_step": cfg.n_layers * dt / step["step_s"]})
    return rows


def main(args: Args):
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    scan = bench_scan(args)
    matmul = bench_matmul(args)
    train, model_info = bench_train(args, matmul)
    attention = bench_attention(args, matmul, train)
    result = {"device": args.device if args.device == "cpu" else torch.cuda.get_device_name(args.device), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "scan": scan, "matmul_gflops": matmul, "train": train, "attention": attention,
              "model": model_info}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['device']}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"\nSSD scan, forward, fp32 (batch {args.scan_batch}, 8 heads x 32, d_state 16, chunk {args.chunk_size})")
    extra = "fused" if has_fused_cpu(args.device) else "mamba" if has_mamba(args.device) else None
    print(f"{'L':>6} {'sequential ms':>14} {'chunked ms':>11} {'speedup':>8} {'rel err':>9}"
          + (f" {extra + ' ms':>9} {'speedup':>8} {'rel err':>9}" if extra else ""))
    for r in scan:
        print(f"{r['L']:>6} {r['sequential_ms']:>14.1f} {r['chunked_ms']:>11.2f} {r['speedup']:>7.1f}x {r['max_rel_err']:>9.1e}"
              + (f" {r[extra + '_ms']:>9.3f} {r[extra + '_speedup']:>7.1f}x {r[extra + '_max_rel_err']:>9.1e}" if extra else ""))
    print(f"\nmatmul {args.matmul_n}^3: fp32 {matmul['fp32']:.1f} GFLOP/s, bf16 {matmul['bf16']:.1f} GFLOP/s")
    print(f"\ntrain step, default config ({model_info['params'] / 1e6:.2f}M params), {args.batch} clips x {args.frames} frames")
    print(f"{'objective':>17} {'precision':>9} {'attention':>9} {'backend':>7} {'s/step':>7} {'frames/s':>9} "
          f"{'loss frames/s':>14} {'GFLOP/step':>11} {'GFLOP/s':>8} {'of matmul':>10}")
    for r in train:
        print(f"{r['objective']:>17} {r['precision']:>9} {r['attention']:>9} {r['backend']:>7} {r['step_s']:>7.3f} "
              f"{r['frames_per_s']:>9.1f} "
              f"{r['loss_frames_per_s']:>14.1f} {r['gflop_per_step']:>11.1f} {r['achieved_gflops']:>8.1f} "
              f"{100 * r['frac_of_matmul']:>9.1f}%")
    print(f"\none attention layer of that step (clip form, projections included), forward + backward")
    print(f"{'precision':>9} {'attention':>9} {'ms':>7} {'GFLOP':>6} {'GFLOP/s':>8} {'of matmul':>10} "
          f"{'x layers, of the train step':>28}")
    for r in attention:
        print(f"{r['precision']:>9} {r['attention']:>9} {r['ms']:>7.1f} {r['gflop']:>6.2f} {r['achieved_gflops']:>8.1f} "
              f"{100 * r['frac_of_matmul']:>9.1f}% {100 * r['share_of_train_step']:>27.0f}%")


if __name__ == "__main__":
    main(tyro.cli(Args))
