"""The benchmark scripts run end to end (tiny model, tiny sizes): a benchmark that crashes is
found here, not when someone needs its numbers. Their figures are checked for shape and sense,
not for speed."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from ssm_gym.model import cpu_kernel
from ssm_gym.model.attention import attention_kernel

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (dataclasses look their module up while the file runs)
    spec.loader.exec_module(mod)
    return mod


def test_rollout_benchmark(tiny_checkpoint, capsys):
    bench = load("rollout")
    out = bench.main(bench.Args(checkpoint=tiny_checkpoint, num_envs=(1, 2), episode_steps=(4, 23), seconds=0.05,
                                action_guidance=2.0))
    assert [r["num_envs"] for r in out["throughput"]] == [1, 2]
    assert all(r["env_steps_per_s"] > 0 and r["guided_env_steps_per_s"] > 0 for r in out["throughput"])
    flat = {(r["variant"], r["episode_step"]): r for r in out["flat"]}
    # our state is constant in size; the full-attention cache grows with the episode
    assert flat[("full", 4)]["state_bytes_per_env"] == flat[("full", 23)]["state_bytes_per_env"]
    assert flat[("attn_full", 23)]["state_bytes_per_env"] > flat[("attn_full", 4)]["state_bytes_per_env"]
    assert out["flops"]["gflop_per_step"] > 0
    assert "env-steps/s" in capsys.readouterr().out


def test_compression_benchmark(tiny_checkpoint):
    bench = load("compression")
    out = bench.main(bench.Args(checkpoint=tiny_checkpoint, settings=("off", "strong"), num_envs=2, context=12,
                                steps=4, json=True))
    rows = {r["setting"]: r for r in out["rows"]}
    # (an untrained model on 16 frames keeps nearly every token: whether compression saves bytes is
    # tested in test_compression; here: the table's figures are consistent)
    off, strong = rows["off"], rows["strong"]
    assert off["memory_reduction"] == 1.0
    assert strong["memory_reduction"] == pytest.approx(off["state_bytes_per_env"] / strong["state_bytes_per_env"])
    assert strong["state_bytes_per_env"] == pytest.approx(sum(strong["by_part"].values()), abs=2)
    assert strong["env_steps_per_s"] > 0


@pytest.mark.parametrize("as_json", [True, False])
def test_ssm_scan_benchmark(as_json, capsys):
    bench = load("ssm_scan")
    bench.main(bench.Args(json=as_json, lengths=(32,), scan_batch=1, chunk_size=8, matmul_n=64, batch=1, frames=4,
                          steps=1))
    out = capsys.readouterr().out
    fused = cpu_kernel() is not None
    if as_json:
        result = json.loads(out)
        row = result["scan"][0]
        assert row["max_rel_err"] < 1e-5 and ("fused_ms" in row) == fused
        if fused:
            assert row["fused_max_rel_err"] < 1e-5
        assert {r["backend"] for r in result["train"]} == ({"torch", "cpu"} if fused else {"torch"})
        kernel = attention_kernel() is not None  # (then every bf16 step runs with and without it)
        copies = [r for r in result["train"] if r["objective"] == "noised copies"]
        assert len(copies) == (3 if kernel else 2) and all(r["loss_frames_per_s"] == r["frames_per_s"] for r in copies)
        plain = [r for r in result["train"] if r["objective"] == "diffusion forcing"]
        assert copies[0]["gflop_per_step"] > plain[0]["gflop_per_step"]
        attn = result["attention"]
        assert [(r["precision"], r["attention"]) for r in attn] == (
            [("fp32", "torch"), ("bf16", "torch")] + ([("bf16", "fused")] if kernel else []))
        assert len({r["gflop"] for r in attn}) == 1 and attn[0]["gflop"] > 0
        assert {r["attention"] for r in result["train"]} == ({"torch", "fused"} if kernel else {"torch"})
        # an attention layer is part of the step: the six of them take a share of it below 1
        assert all(0 < r["share_of_train_step"] < 1 for r in attn)
    else:
        assert "chunked ms" in out and ("fused ms" in out) == fused and "noised copies" in out
        assert "one attention layer" in out


def test_maze_sim_benchmark():
    bench = load("maze_sim")
    out = bench.main(bench.Args(num_envs=(1, 2), seconds=0.05, json=True))
    assert out


def test_rollout_benchmark_throughput_only(tiny_checkpoint, capsys):
    bench = load("rollout")
    out = bench.main(bench.Args(checkpoint=tiny_checkpoint, num_envs=(1,), episode_steps=(), seconds=0.05, bf16=True))
    assert out["flat"] == [] and out["throughput"][0]["env_steps_per_s"] > 0
    assert out["throughput"][0]["bf16_env_steps_per_s"] > 0
    text = capsys.readouterr().out
    assert "step time vs episode step" not in text and "bf16 env-steps/s" in text


def test_imagined_frames_grid(tiny_checkpoint, tmp_path):
    """The example that compares models' imagined frames: one row per model and sampler, checked input."""
    from PIL import Image

    from ssm_gym.maze.dataset import save_episode
    from ssm_gym.maze.record import record_episodes

    spec = importlib.util.spec_from_file_location("imagined_frames_grid", BENCH.parent / "examples" / "imagined_frames_grid.py")
    grid = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = grid
    spec.loader.exec_module(grid)
    for s, ep in zip((5, 6), record_episodes([5, 6], ["explore"] * 2, steps=12)):
        save_episode(tmp_path / "val" / f"ep_{s:06d}.npz", ep)
    args = grid.Args(rows=(f"{tiny_checkpoint}:1", f"{tiny_checkpoint}:2"), val_dir=tmp_path / "val", start=2,
                     context=4, at=(1, 3), scale=1, out=tmp_path / "g.png")
    img = Image.open(grid.main(args))
    assert img.size == (170 + 2 * 64, 3 * 64)  # real + two rows, two imagined steps each
    with pytest.raises(ValueError, match="model_folder:denoising_steps"):
        grid.main(grid.Args(rows=(str(tiny_checkpoint),), val_dir=tmp_path / "val"))
    with pytest.raises(ValueError, match="increasing order"):
        grid.main(grid.Args(rows=(f"{tiny_checkpoint}:1",), val_dir=tmp_path / "val", at=(4, 1)))
    with pytest.raises(ValueError, match="this grid needs 22"):
        grid.main(grid.Args(rows=(f"{tiny_checkpoint}:1",), val_dir=tmp_path / "val", start=2, context=4, at=(16,)))


def test_flop_counter_counts_cpu_attention():
    """The CPU's fused attention op is counted as dense attention: 4 b h q k d (QK^T and PV)."""
    import torch
    import torch.nn.functional as F

    from ssm_gym.model.flops import flop_counter

    b, h, q, k, d = 2, 3, 5, 7, 8
    qs, ks, vs = torch.randn(b, h, q, d), torch.randn(b, h, k, d), torch.randn(b, h, k, d)
    with flop_counter() as c:
        F.scaled_dot_product_attention(qs, ks, vs)
    assert c.get_total_flops() == 4 * b * h * q * k * d


@pytest.mark.skipif(attention_kernel() is None, reason="no AVX-512 BF16 attention kernel on this machine")
def test_flop_counter_counts_fused_attention_by_the_keys_attended():
    """The fused kernel is counted by the keys each query frame sees (no masked ones): forward
    4 n d keys per (batch*head, frame), backward 2.5x that (torch's convention for attention)."""
    import torch

    from ssm_gym.model.attention import window_attention_cpu
    from ssm_gym.model.flops import flop_counter

    bh, t, n, d, window = 2, 5, 16, 32, 3
    keys = sum(min(window, f + 1) for f in range(t)) * n  # 1, 2, 3, 3, 3 frames
    copy_keys = sum(min(window - 1, f) + 1 for f in range(t)) * n  # 1, 2, 3, 3, 3 frames (the own one last)
    q, k, v = (torch.randn(bh, t, n, d).bfloat16().requires_grad_(True) for _ in range(3))
    with flop_counter() as c:
        y = window_attention_cpu(q, k, v, window)
    assert c.get_total_flops() == 4 * bh * n * d * keys
    with flop_counter() as c:
        y.float().sum().backward()
    assert c.get_total_flops() == 10 * bh * n * d * keys
    with flop_counter() as c:
        window_attention_cpu(q, k, v, window, k.detach(), v.detach())
    assert c.get_total_flops() == 4 * bh * n * d * copy_keys
