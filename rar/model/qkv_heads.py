"""The attention's queries, keys and values from its qkv projection in the training forward, with
a compiled CPU kernel for the forward and backward passes (`csrc/qkv_heads.c`): the projection's
bias, the qk-norm of q and k, and the (B, H, N, D) layout of the attention kernel in one pass.

torch runs this as the bias pass of the projection, two LayerNorms on strided views (each copies
its input, and its gradient in the backward pass), and a backward pass that stacks the three
gradients back into the projection's layout: ~5% of a demo training step (figures in
BENCHMARKS.md). The kernel is used where a gradient is needed, on fp32 CPU tensors, and where it
can be built; elsewhere, and for inference, torch's ops run: the same results up to fp32 rounding.
"""
from __future__ import annotations

import ctypes
from functools import cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.toolchain import load_kernel

_ROWS_PER_ITEM, _MAX_D = 64, 256  # as in csrc/qkv_heads.c


@cache
def heads_kernel() -> ctypes.CDLL | None:
    """The compiled kernel for this CPU, or None where it cannot be built."""
    ptr, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    return load_kernel("qkv_heads.c", "rar.model", {"qkv_heads_forward": [ptr] * 10 + [i64] * 4 + [f32, i32],
                                                    "qkv_heads_backward": [ptr] * 10 + [i64] * 4 + [i32]})


class _QKVHeads(torch.autograd.Function):
    """raw (B, N, 3, H, D) projection without bias -> q, k, v (B, H, N, D); keeps raw and each
    normed head's mean and 1 / std."""

    @staticmethod
    def forward(ctx, raw, bias, qw, qb, kw, kb, eps: float):
        B, N, _, H, D = raw.shape
        if any(t.dtype != torch.float32 for t in (raw, bias, qw, qb, kw, kb)):
            raise TypeError("the qkv kernel takes fp32 tensors only")
        raw, bias, qw, qb, kw, kb = (t.contiguous() for t in (raw, bias, qw, qb, kw, kb))
        q, k, v = (raw.new_empty(B, H, N, D) for _ in range(3))
        stats = raw.new_empty(B, N, 2, H, 2)
        heads_kernel().qkv_heads_forward(*(t.data_ptr() for t in (raw, bias, qw, qb, kw, kb, q, k, v, stats)),
                                         B, N, H, D, eps, torch.get_num_threads())
        ctx.save_for_backward(raw, bias, qw, kw, stats)
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        raw, bias, qw, kw, stats = ctx.saved_tensors
        B, N, _, H, D = raw.shape
        dq, dk, dv = (raw.new_zeros(B, H, N, D) if g is None else g.contiguous() for g in (dq, dk, dv))
        draw = torch.empty_like(raw)
        partial = raw.new_empty(-(-B * N // _ROWS_PER_ITEM), 4 + 3 * H, D)
        heads_kernel().qkv_heads_backward(*(t.data_ptr() for t in (raw, bias, qw, kw, stats, dq, dk, dv, draw, partial)),
                                          B, N, H, D, torch.get_num_threads())
        sums = partial.sum(0)  # (4 + 3 H, D): q_norm weight, bias; k_norm weight, bias; the qkv bias
        return draw, sums[4:].view(bias.shape), *sums[:4], None


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _kernel_applies(x: torch.Tensor, qkv: nn.Linear, norms, head_dim: int) -> bool:
    if qkv.bias is None or any(n.weight is None or n.bias is None for n in norms) or norms[0].eps != norms[1].eps:
        return False  # the kernel has both norms' affines, one eps, and the projection's bias
    tensors = (x, qkv.weight, qkv.bias, *(p for n in norms for p in (n.weight, n.bias)))
    # under autocast the projection would come out in bf16, whatever its inputs' dtype
    return (torch.is_grad_enabled() and any(t.requires_grad for t in tensors) and x.dim() == 3
            and not _autocast_on(x.device.type)
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and head_dim <= _MAX_D and heads_kernel() is not None)


def qkv_heads(x: torch.Tensor, qkv: nn.Linear, q_norm: nn.LayerNorm, k_norm: nn.LayerNorm,
              num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries (qk-normed), keys (qk-normed) and values of x (B, N, C): each (B, H, N, D)."""
    B, N, C = x.shape
    D = C // num_heads
    if _kernel_applies(x, qkv, (q_norm, k_norm), D):
        raw = F.linear(x, qkv.weight).view(B, N, 3, num_heads, D)  # the bias is added by the kernel
        return _QKVHeads.apply(raw, qkv.bias.view(3, num_heads, D), q_norm.weight, q_norm.bias, k_norm.weight,
                               k_norm.bias, q_norm.eps)
    q, k, v = qkv(x).view(B, N, 3, num_heads, D).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D)
    return q_norm(q), k_norm(k), v
