"""The transformer block's GELU (tanh form) on a compiled CPU kernel (``csrc/pointwise_cpu.cpp``),
for fp32 and bf16 tensors: torch 2.13's CPU GELU runs this model's MLP activations at about
1.7 ns per bf16 element on this machine, the vectorised kernel several times faster (see
benchmarks/ssm_scan.py). ``F.gelu(x, approximate="tanh")`` is the reference and the path
everywhere else (other dtypes, CUDA, no compiler, ``SSM_GYM_CPU_POINTWISE=0``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native

POINTWISE_KERNEL = native.Kernel("ssm_gym_pointwise_cpu", "pointwise_cpu.cpp", "fused CPU GELU kernel",
                                 "using torch's GELU", switch="SSM_GYM_CPU_POINTWISE")


def pointwise_kernel_ready() -> bool:
    """Whether the kernel can be used (loads it on first use; later a plain attribute read, which
    torch.compile can trace)."""
    if POINTWISE_KERNEL.module is not None:
        return bool(POINTWISE_KERNEL.module)
    return POINTWISE_KERNEL.get() is not None


@torch.library.custom_op("ssm_gym::gelu_tanh_cpu", mutates_args=())
def _gelu_tanh_cpu(x: Tensor) -> Tensor:
    return POINTWISE_KERNEL.module.gelu_forward(x)


@_gelu_tanh_cpu.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("ssm_gym::gelu_tanh_cpu_backward", mutates_args=())
def _gelu_tanh_cpu_backward(x: Tensor, gy: Tensor) -> Tensor:
    return POINTWISE_KERNEL.module.gelu_backward(x, gy)


@_gelu_tanh_cpu_backward.register_fake
def _(x, gy):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, gy):
    (x,) = ctx.saved_tensors
    return _gelu_tanh_cpu_backward(x, gy.to(x.dtype).contiguous())


torch.library.register_autograd("ssm_gym::gelu_tanh_cpu", _backward, setup_context=_setup_context)


def gelu_tanh(x: Tensor, fused: bool = True) -> Tensor:
    """``F.gelu(x, approximate="tanh")``; on the compiled kernel for fp32 and bf16 CPU tensors
    (``fused`` and where it builds)."""
    if (fused and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and pointwise_kernel_ready()):
        return _gelu_tanh_cpu(x.contiguous())
    return F.gelu(x, approximate="tanh")
