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

from ..core.toolchain import address, load_kernel
from .gather import RowGather, materialize


@cache
def norm_kernel() -> ctypes.CDLL | None:
    """The compiled kernel for this CPU, or None where it cannot be built."""
    ptr, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    return load_kernel("modulated_norm.c", "rar.model", {"modulated_norm_forward": [ptr] * 7 + [i64] * 3 + [f32, i32],
                                                          "modulated_norm_backward": [ptr] * 9 + [i64] * 3 + [i32]})


class _ModulatedNorm(torch.autograd.Function):
    """c + a * LayerNorm(x) over the last dimension, a and c (B, N, D) like x or (U, N, D) tables
    read at rows index[b] (`RowGather`); keeps x, a and each row's mean and 1 / std."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, c: torch.Tensor, index: torch.Tensor | None,
                eps: float) -> torch.Tensor:
        x, a, c = x.contiguous(), a.contiguous(), c.contiguous()
        N, D = x.shape[-2:]
        rows = x.numel() // D
        out, mean, rstd = torch.empty_like(x), x.new_empty(rows), x.new_empty(rows)
        norm_kernel().modulated_norm_forward(x.data_ptr(), a.data_ptr(), c.data_ptr(), address(index), out.data_ptr(),
                                             mean.data_ptr(), rstd.data_ptr(), rows, N, D, eps, torch.get_num_threads())
        ctx.save_for_backward(x, a, index, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, a, index, mean, rstd = ctx.saved_tensors
        grad = grad.contiguous()
        N, D = x.shape[-2:]
        grad_x = torch.empty_like(x)
        # tables (U, N, D) are summed into; rows (B, N, D) are written, and c's gradient is grad itself
        grad_a, grad_c = (torch.zeros_like(a), torch.zeros_like(a)) if index is not None else (torch.empty_like(x), grad)
        norm_kernel().modulated_norm_backward(x.data_ptr(), a.data_ptr(), address(index), mean.data_ptr(),
                                              rstd.data_ptr(), grad.data_ptr(), grad_x.data_ptr(), grad_a.data_ptr(),
                                              address(None if index is None else grad_c), mean.numel(), N, D,
                                              torch.get_num_threads())
        return grad_x, grad_a, grad_c, None, None


def _kernel_applies(x: torch.Tensor, a, c) -> bool:
    tables = isinstance(a, RowGather) and isinstance(c, RowGather)
    if tables and not (a.index is c.index and a.table.shape == c.table.shape and x.dim() == 3 and a.kernel_ready()):
        return False
    if not tables and (isinstance(a, RowGather) or isinstance(c, RowGather)):
        return False  # one table, one tensor: torch's ops
    tensors = (x, *((a.table, c.table) if tables else (a, c)))
    return (torch.is_grad_enabled() and any(t.requires_grad for t in tensors) and x.shape == a.shape == c.shape
            and all(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype == torch.float32
                    for t in tensors)
            and norm_kernel() is not None)


def modulated_norm(x: torch.Tensor, a: torch.Tensor | RowGather, c: torch.Tensor | RowGather, eps: float,
                   kernel: bool = True) -> torch.Tensor:
    """c + a * LayerNorm(x) (no affine) over the last dimension; a and c of x's shape, or both
    `RowGather`s of it (B, N, D) over one index. `kernel` False keeps torch's ops (inside a
    recomputed block, whose policy sees only torch's ops)."""
    if kernel and _kernel_applies(x, a, c):
        if isinstance(a, RowGather):
            return _ModulatedNorm.apply(x, a.table, c.table, a.index, eps)
        return _ModulatedNorm.apply(x, a, c, None, eps)
    return torch.addcmul(materialize(c), F.layer_norm(x, x.shape[-1:], eps=eps), materialize(a))
