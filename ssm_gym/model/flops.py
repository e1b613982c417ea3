"""Counting the floating-point operations of a model call, for the benchmarks' achieved GFLOP/s.

torch's ``FlopCounterMode`` counts matrix products and the CUDA attention kernels but has no
formula for the fused attention op that ``scaled_dot_product_attention`` runs on a CPU, so on a
CPU a third of a rollout step's arithmetic (the frame-local attention) would go uncounted. That op
is counted here as dense attention over the keys it is given (masked-out keys included, as for the
CUDA kernels). The fused CPU attention kernel for bf16 training (``ssm_gym::window_attention_*``)
is counted by the keys each query frame attends to: it computes no masked-out keys. Elementwise
work (norms, activations, the SSM scan's recurrence) is not counted.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import ssm_gym.model.attention  # noqa: F401  (registers the ssm_gym::window_attention ops)


def _sdpa_cpu_fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _window_products(q_shape, window: int, copies: bool) -> int:
    """Multiply-adds of one (queries x keys x head_dim) product over every query frame's keys."""
    bh, t, n, d = q_shape
    frames = sum((min(window - 1, f) + 1) if copies else min(window, f + 1) for f in range(t))
    return bh * n * d * frames * n


def _window_fwd(q_shape, k_shape, v_shape, kx_shape, vx_shape, window, out_shape=None, **kwargs) -> int:
    return 2 * 2 * _window_products(q_shape, window, kx_shape is not None)  # scores, then values


def _window_bwd(q_shape, k_shape, v_shape, kx_shape, vx_shape, out, lse, dout, window, out_shape=None, **kwargs) -> int:
    return 5 * 2 * _window_products(q_shape, window, kx_shape is not None)  # as torch counts attention's backward


CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_fwd,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_bwd,
    torch.ops.ssm_gym.window_attention_forward: _window_fwd,
    torch.ops.ssm_gym.window_attention_backward: _window_bwd,
}


def flop_counter() -> FlopCounterMode:
    """``with flop_counter() as c: ...; c.get_total_flops()``: matmuls and attention on any device."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
