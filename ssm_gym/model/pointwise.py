"""The transformer block's elementwise operations: adaLN's modulation and residual gate, the
modulated LayerNorm, the MLP's GELU (tanh form) and attention's rotary embedding of queries and
keys. The last three run on a compiled CPU kernel
(``csrc/pointwise_cpu.cpp``) for fp32 and bf16 tensors, one pass over memory each way where torch
makes several (torch 2.13's CPU GELU alone runs at about 1.7 ns per bf16 element on this
machine). The torch expressions are the reference and the path everywhere else (other dtypes,
CUDA, no compiler, ``SSM_GYM_CPU_POINTWISE=0``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native

POINTWISE_KERNEL = native.Kernel("ssm_gym_pointwise_cpu", "pointwise_cpu.cpp", "fused CPU GELU and norm kernels",
                                 "using torch's GELU and LayerNorm", switch="SSM_GYM_CPU_POINTWISE")


# Both in x's dtype: under bf16 autocast the residual stream and its norms are fp32 while the
# modulations and the sublayers' outputs come out of bf16 products, and torch's CPU kernels on
# mixed dtypes are slower than casting first (addcmul 2.2x, forward and backward).
def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return torch.addcmul(shift.to(x.dtype), x, 1 + scale.to(x.dtype))  # x * (1 + scale) + shift in one pass


def residual(x: Tensor, gate: Tensor, h: Tensor) -> Tensor:
    """x + gate * h in one pass."""
    return torch.addcmul(x, gate.to(x.dtype), h.to(x.dtype))


def cpu_autocast_bf16() -> bool:
    """Whether CPU bf16 autocast is on: a kernel then writes bf16 at once where the projection
    after it would cast to that."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def kernel_dtypes(x: Tensor, *params: Tensor) -> tuple[Tensor, torch.dtype]:
    """``(x, acc)``: the accumulator dtype of x with the parameters (at least fp32), and x as the
    compiled kernels read it (bf16 x stays bf16 with fp32 accumulators; anything else is cast)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    for p in params:
        acc = torch.promote_types(acc, p.dtype)
    if not (x.dtype == acc or (x.dtype == torch.bfloat16 and acc == torch.float32)):
        x = x.to(acc)
    return x, acc


def pointwise_kernel_ready() -> bool:
    """Whether the kernel can be used (loads it on first use; later a plain attribute read, which
    torch.compile can trace); False inside ``fused_pointwise(False)``."""
    if not POINTWISE_KERNEL.enabled:
        return False
    if POINTWISE_KERNEL.module is not None:
        return bool(POINTWISE_KERNEL.module)
    return POINTWISE_KERNEL.get() is not None


def fused_pointwise(enabled: bool):
    """Within the block, the kernels where they apply (``True``, the default) or torch's
    operations everywhere (``False``): for comparisons and benchmarks."""
    return POINTWISE_KERNEL.switched(enabled)


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


@torch.library.custom_op("ssm_gym::norm_modulate_cpu", mutates_args=())
def _norm_modulate_cpu(x: Tensor, shift: Tensor, scale: Tensor, rows_per_frame: int, eps: float,
                       out_bf16: bool) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(POINTWISE_KERNEL.module.norm_modulate_forward(x, shift, scale, rows_per_frame, eps, out_bf16))


@_norm_modulate_cpu.register_fake
def _(x, shift, scale, rows_per_frame, eps, out_bf16):
    return (x.new_empty(x.shape, dtype=torch.bfloat16 if out_bf16 else x.dtype), x.new_empty(x.shape[0]),
            x.new_empty(x.shape[0]))


@torch.library.custom_op("ssm_gym::norm_modulate_cpu_backward", mutates_args=())
def _norm_modulate_cpu_backward(gy: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor,
                                rows_per_frame: int) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(POINTWISE_KERNEL.module.norm_modulate_backward(gy, x, scale, mean, rstd, rows_per_frame))


_norm_modulate_cpu_backward.register_fake(
    lambda gy, x, scale, mean, rstd, rows_per_frame: (torch.empty_like(x), torch.empty_like(scale),
                                                      torch.empty_like(scale)))


def _norm_modulate_setup_context(ctx, inputs, output):
    x, _, scale, rows_per_frame, _, _ = inputs
    ctx.save_for_backward(x, scale, output[1], output[2])
    ctx.rows_per_frame = rows_per_frame
    ctx.set_materialize_grads(False)


def _norm_modulate_backward(ctx, gy, gmean, grstd):
    if gy is None:  # (mean and rstd carry no gradient of their own)
        return None, None, None, None, None, None
    x, scale, mean, rstd = ctx.saved_tensors
    gx, gshift, gscale = _norm_modulate_cpu_backward(gy.contiguous(), x, scale, mean, rstd, ctx.rows_per_frame)
    return gx, gshift, gscale, None, None, None


torch.library.register_autograd("ssm_gym::norm_modulate_cpu", _norm_modulate_backward,
                                setup_context=_norm_modulate_setup_context)


def norm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float, fused: bool = True) -> Tensor:
    """adaLN's pre-norm: ``modulate(F.layer_norm(x), shift, scale)`` for tokens x (..., N, D) and a
    shift and scale (..., 1, D) per frame. On the compiled kernel (fp32 x on a CPU, ``fused`` and
    where it builds) in one pass each way; its output is then bf16 under CPU bf16 autocast (what
    the projection after it would cast to), else x's dtype."""
    d = x.shape[-1]
    frame_shape = (*x.shape[:-2], 1, d)
    if (fused and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() >= 2
            and shift.dtype in (torch.float32, torch.bfloat16) and scale.dtype == shift.dtype
            and tuple(shift.shape) == frame_shape and tuple(scale.shape) == frame_shape and pointwise_kernel_ready()):
        out_bf16 = cpu_autocast_bf16()
        with torch.autocast("cpu", enabled=False):
            y, _, _ = _norm_modulate_cpu(x.reshape(-1, d).contiguous(), shift.reshape(-1, d).contiguous(),
                                         scale.reshape(-1, d).contiguous(), x.shape[-2], eps, out_bf16)
        return y.reshape(x.shape)
    return modulate(F.layer_norm(x, (d,), eps=eps), shift, scale)


# -- rotary embedding of attention's queries and keys ------------------------------------------
@torch.library.custom_op("ssm_gym::rope_qkv_cpu", mutates_args=())
def _rope_qkv_cpu(qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(POINTWISE_KERNEL.module.rope_qkv_forward(qkv, cos, sin))


@_rope_qkv_cpu.register_fake
def _(qkv, cos, sin):
    b, t, n, _, h, d = qkv.shape
    return tuple(qkv.new_empty(b, t, n, h, d) for _ in range(3))


@torch.library.custom_op("ssm_gym::rope_qkv_cpu_backward", mutates_args=())
def _rope_qkv_cpu_backward(gq: Tensor, gk: Tensor, gv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return POINTWISE_KERNEL.module.rope_qkv_backward(gq, gk, gv, cos, sin)


@_rope_qkv_cpu_backward.register_fake
def _(gq, gk, gv, cos, sin):
    b, t, n, h, d = gq.shape
    return gq.new_empty(b, t, n, 3, h, d)


def _rope_qkv_setup_context(ctx, inputs, output):
    _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)
    ctx.set_materialize_grads(True)  # (an unused q, k or v still gets a zero gradient)


def _rope_qkv_backward(ctx, gq, gk, gv):
    cos, sin = ctx.saved_tensors
    dtype = gq.dtype
    gqkv = _rope_qkv_cpu_backward(gq.contiguous(), gk.to(dtype).contiguous(), gv.to(dtype).contiguous(), cos, sin)
    return gqkv, None, None


torch.library.register_autograd("ssm_gym::rope_qkv_cpu", _rope_qkv_backward, setup_context=_rope_qkv_setup_context)


def rope_qkv_applies(qkv: Tensor) -> bool:
    """Whether :func:`rope_qkv` runs on the kernel: an fp32 or bf16 CPU tensor, where it builds and
    is not switched off (``fused_pointwise(False)``)."""
    return qkv.device.type == "cpu" and qkv.dtype in (torch.float32, torch.bfloat16) and pointwise_kernel_ready()


def rope_qkv(qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The qkv projection's output (B, T, N, 3, heads, hd) -> q and k rotated by their frame's
    angles, and v: each (B, T, N, heads, hd), contiguous, in qkv's dtype. cos, sin: (B, T, hd/2)
    fp32 (``attention.rope_tables``). The compiled kernel (see :func:`rope_qkv_applies`); the
    reference is ``attention.apply_rope`` on the split tensors."""
    with torch.autocast("cpu", enabled=False):
        return _rope_qkv_cpu(qkv.contiguous(), cos.float().contiguous(), sin.float().contiguous())
