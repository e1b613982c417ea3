"""Counting the floating-point operations of a model call, for the benchmarks' achieved GFLOP/s.

torch's ``FlopCounterMode`` counts matrix products and the CUDA attention kernels but has no
formula for the fused attention op that ``scaled_dot_product_attention`` runs on a CPU, so on a
CPU a third of a rollout step's arithmetic (the frame-local attention) would go uncounted. That op
is counted here as dense attention over the keys it is given (masked-out keys included, as for the
CUDA kernels). Elementwise work (norms, activations, the SSM scan's recurrence) is not counted.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def _sdpa_cpu_fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_fwd,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_bwd,
}


def flop_counter() -> FlopCounterMode:
    """``with flop_counter() as c: ...; c.get_total_flops()``: matmuls and attention on any device."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
