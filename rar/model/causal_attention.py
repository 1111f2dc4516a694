"""Causal self-attention of the training forward, with a compiled CPU kernel for its forward and
backward passes (`csrc/causal_attention.c`).

At the small models' shapes (the tiny preset: 65 positions, heads of 32) torch's fused CPU kernel
for `scaled_dot_product_attention` and its backward run at ~25 GFLOP/s, a sixth of what the same
host's matmuls reach, and took ~15% of a demo training step; figures in BENCHMARKS.md. The kernel
is used where a gradient is needed, on fp32 CPU tensors, and where it can be built (a C compiler on
Linux); elsewhere, and for inference, torch's kernel runs: the same results up to fp32 rounding.
"""
from __future__ import annotations

import ctypes
from functools import cache

import torch
import torch.nn.functional as F

from ..core.toolchain import load_kernel


@cache
def attention_kernel(head_dim: int) -> ctypes.CDLL | None:
    """The compiled kernel for heads of `head_dim` on this CPU, or None where it cannot be built."""
    ptr, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    return load_kernel("causal_attention.c", "rar.model", {
        "causal_attention_forward": [ptr] * 9 + [i64, i64, i64, f32, ptr, i32],
        "causal_attention_backward": [ptr] * 14 + [i64, i64, i64, f32, ptr, i32]}, {"HEAD_DIM": head_dim})


def _strides(t: torch.Tensor):
    """The (b, h, n) strides of a (B, H, N, D) tensor, as the C array the kernel reads."""
    return (ctypes.c_int64 * 3)(*t.stride()[:3])


def _scratch(N: int, D: int) -> torch.Tensor:
    """Each thread's transposed keys and values and two blocks of score rows (MAX_ROWS = 8 rows
    each, csrc/causal_attention.c)."""
    return torch.empty(torch.get_num_threads(), (2 * D + 2 * 8) * (-(-N // 16) * 16), dtype=torch.float32)


class _CausalAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(D), causal) v; keeps q, k, v, the output and each row's log-sum-exp."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, H, N, D = q.shape
        out = q.new_empty(B, N, H, D)  # the layout the output projection reads
        o = out.transpose(1, 2)  # (B, H, N, D) view
        lse, scratch = q.new_empty(B, H, N), _scratch(N, D)
        attention_kernel(D).causal_attention_forward(
            q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(), _strides(v), o.data_ptr(),
            _strides(o), lse.data_ptr(), B, H, N, D ** -0.5, scratch.data_ptr(), torch.get_num_threads())
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        B, H, N, D = q.shape
        g = grad.contiguous().transpose(1, 2)  # (B, H, N, D) view of (B, N, H, D)
        o = out.transpose(1, 2)
        dq, dk, dv = (q.new_empty(B, H, N, D) for _ in range(3))
        scratch = _scratch(N, D)
        attention_kernel(D).causal_attention_backward(
            q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(), _strides(v), o.data_ptr(),
            _strides(o), g.data_ptr(), _strides(g), lse.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
            B, H, N, D ** -0.5, scratch.data_ptr(), torch.get_num_threads())
        return dq, dk, dv


def _kernel_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(-1) == 1 for t in (q, k, v))
            and q.shape == k.shape == v.shape and attention_kernel(q.shape[-1]) is not None)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of (B, H, N, D) queries, keys and values: (B, N, H, D), the layout in
    which the heads are concatenated for the output projection."""
    if _kernel_applies(q, k, v):
        return _CausalAttention.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)  # (B, N, H, D)
