"""The adaLN-modulated LayerNorm of the training forward, c + a * LayerNorm(x) (no affine of its own:
the blocks fold theirs into a and c), with a compiled CPU kernel for its forward and backward
passes (`csrc/modulated_norm.c`).

torch runs it as a LayerNorm and an addcmul: at the tiny preset's width each of the nine per step
cost ~4 ms forward and backward on 2 cores, mostly passes over small tensors and autograd nodes;
the kernel does one pass each way (figures in BENCHMARKS.md). It is used where a gradient is
needed, on fp32 CPU tensors of one shape, and where it can be built; elsewhere, and for
inference, torch's ops run: the same results up to fp32 rounding.
"""
from __future__ import annotations

import ctypes
from functools import cache

import torch
import torch.nn.functional as F

from ..core.toolchain import load_kernel


@cache
def norm_kernel() -> ctypes.CDLL | None:
    """The compiled kernel for this CPU, or None where it cannot be built."""
    ptr, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    return load_kernel("modulated_norm.c", "rar.model", {"modulated_norm_forward": [ptr] * 6 + [i64, i64, f32, i32],
                                                          "modulated_norm_backward": [ptr] * 7 + [i64, i64, i32]})


class _ModulatedNorm(torch.autograd.Function):
    """c + a * LayerNorm(x) over the last dimension; keeps x, a and each row's mean and 1 / std."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, c: torch.Tensor, eps: float) -> torch.Tensor:
        x, a, c = x.contiguous(), a.contiguous(), c.contiguous()
        D = x.shape[-1]
        rows = x.numel() // D
        out, mean, rstd = torch.empty_like(x), torch.empty(rows), torch.empty(rows)
        norm_kernel().modulated_norm_forward(x.data_ptr(), a.data_ptr(), c.data_ptr(), out.data_ptr(), mean.data_ptr(),
                                             rstd.data_ptr(), rows, D, eps, torch.get_num_threads())
        ctx.save_for_backward(x, a, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, a, mean, rstd = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x, grad_a = torch.empty_like(x), torch.empty_like(x)
        norm_kernel().modulated_norm_backward(x.data_ptr(), a.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                                              grad.data_ptr(), grad_x.data_ptr(), grad_a.data_ptr(), mean.numel(),
                                              x.shape[-1], torch.get_num_threads())
        return grad_x, grad_a, grad, None


def modulated_norm(x: torch.Tensor, a: torch.Tensor, c: torch.Tensor, eps: float, kernel: bool = True) -> torch.Tensor:
    """c + a * LayerNorm(x) (no affine) over the last dimension; x, a and c of one shape. `kernel`
    False keeps torch's ops (inside a recomputed block, whose policy sees only torch's ops)."""
    tensors = (x, a, c)
    if (kernel and torch.is_grad_enabled() and any(t.requires_grad for t in tensors) and x.shape == a.shape == c.shape
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and norm_kernel() is not None):
        return _ModulatedNorm.apply(x, a, c, eps)
    return torch.addcmul(c, F.layer_norm(x, x.shape[-1:], eps=eps), a)
