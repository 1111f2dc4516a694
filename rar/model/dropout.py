"""Dropout for the training forward, with its masks drawn before a block runs so that a
recomputation in the backward pass (`recompute=`) reuses them instead of replaying the RNG.
Probabilities are rounded to multiples of 1/65536. On CPU each mask comes from a counter-based
hash keyed by two 32-bit words from the global generator (`csrc/dropout_hash.c`, compiled at
run time; `hash16` is the same function in torch): every element costs a few integer operations
on all threads instead of a step of torch's generator, which is serial on CPU. Elsewhere (other
devices, or no C compiler) the masks are 16-bit draws from the device's generator: the same
distribution, another stream."""
from __future__ import annotations

import ctypes
import math
from functools import cache
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..core.toolchain import address, load_kernel
from .gather import RowGather, materialize


class DropMasks(NamedTuple):
    """One block's dropout masks, drawn before the block runs: recomputing the block in the
    backward pass (`recompute=`) reuses them instead of replaying the RNG. The attention mask is a
    keep-mask (True = keep); the others are keep-masks too, or, where memory is not the concern,
    multipliers (`scale_mask`: 0 or 1 / (1 - p)), which apply in one pass each way, or on CPU
    `HashedMask` keys that fused kernels (`gelu_dropout`, `gated_residual`) draw as they go."""
    attn: torch.Tensor | None  # (B, H, N, N) attention probabilities, bool
    proj: "torch.Tensor | HashedMask | None"  # (B, N, D) attention output
    hidden: "torch.Tensor | HashedMask | None"  # (B, N, M) MLP hidden layer
    out: "torch.Tensor | HashedMask | None"  # (B, N, D) MLP output


_LEVELS = 2**16  # dropout probabilities are rounded to multiples of 1/65536
_BIAS_ROWS = 64  # rows per partial sum of a bias's gradient, as in csrc/dropout_hash.c


def _drop_level(p: float) -> int:
    return round(p * _LEVELS)  # P(drop) = level / 65536


def _uniform16(shape, device=None) -> torch.Tensor:
    """Uniform int16 values of `shape` from the global RNG, drawn as full-range int64 words split in
    four: the generator runs a quarter as often as for int16 draws (it is serial on CPU)."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None)
    return words.view(torch.int16)[:n].view(shape)


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """The low 32 bits of x * c for int64 x holding 32-bit values, without overflowing int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash16(n: int, key: tuple[int, int], device=None) -> torch.Tensor:
    """The 16-bit values (n,) int64 that `csrc/dropout_hash.c` draws for key (k0, k1): element i
    is mix(mix(lo(i) ^ k0) ^ (hi(i) + k1)) >> 16, lo and hi the low and high 32 bits of i."""
    i = torch.arange(n, dtype=torch.int64, device=device)
    return _mix32(_mix32((i & _M32) ^ key[0]) ^ (((i >> 32) + key[1]) & _M32)) >> 16


@cache
def hash_kernel() -> ctypes.CDLL | None:
    """The compiled mask kernels for this CPU, or None where they cannot be built (then `keep_mask`
    and `scale_mask` draw from torch's generator and the MLP runs GELU and dropout apart)."""
    ptr, n, u32, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_float, ctypes.c_int
    key = [u32, u32, u32]  # k0, k1, level
    return load_kernel("dropout_hash.c", "rar.model", {
        "dropout_scales": [ptr, n, *key, f32, i32], "dropout_keep": [ptr, n, *key, i32],
        "gelu_dropout_forward": [ptr, ptr, ptr, n, n, *key, f32, i32],
        "gelu_dropout_backward": [ptr, ptr, ptr, ptr, ptr, n, n, *key, f32, i32],
        "gated_residual_forward": [ptr] * 5 + [n] * 3 + [*key, f32, i32],
        "gated_residual_backward": [ptr] * 6 + [n] * 3 + [*key, f32, i32]})


class HashedMask(NamedTuple):
    """A CPU dropout mask kept as its key: element i is kept where `hash16` >= level. `materialize`
    writes it out; the fused GELU-dropout of the MLP (`gelu_dropout`) draws it in its forward and
    again in its backward pass instead, so it never occupies memory."""
    k0: int
    k1: int
    level: int  # P(drop) = level / 65536
    scale: float  # the multiplier of kept elements, 1 / (1 - p)

    @classmethod
    def draw(cls, p: float) -> "HashedMask | None":
        """A fresh key from the global generator; None where nothing drops or the kernel is missing."""
        level = _drop_level(p)
        if level == 0 or hash_kernel() is None:
            return None
        k0, k1 = torch.randint(0, 2**32, (2,)).tolist()
        return cls(k0, k1, level, drop_scale(p))

    def materialize(self, shape, dtype=torch.float32) -> torch.Tensor:
        """The mask of `shape`: bool keep-mask for dtype bool, else multipliers (0 or `scale`)."""
        n, threads, kernel = math.prod(shape), torch.get_num_threads(), hash_kernel()
        if dtype == torch.bool:
            out = torch.empty(shape, dtype=torch.bool)
            kernel.dropout_keep(out.data_ptr(), n, self.k0, self.k1, self.level, threads)
            return out
        out = torch.empty(shape, dtype=torch.float32)
        kernel.dropout_scales(out.data_ptr(), n, self.k0, self.k1, self.level, self.scale, threads)
        return out.to(dtype)


def _on_cpu(device) -> bool:
    return device is None or torch.device(device).type == "cpu"


def keep_mask(shape, p: float, device=None) -> torch.Tensor | None:
    """Bernoulli keep-mask with P(drop) = p rounded to 1/65536, from the hash kernel on CPU, else
    from 16-bit uniform integers (cheaper than `bernoulli_`)."""
    t = _drop_level(p)
    if t == 0:
        return None
    hashed = HashedMask.draw(p) if _on_cpu(device) else None
    if hashed is not None:
        return hashed.materialize(shape, torch.bool)
    return _uniform16(shape, device) >= t - _LEVELS // 2


def scale_mask(shape, p: float, device=None, dtype=torch.float32) -> torch.Tensor | None:
    """`keep_mask`'s draws as inverted-dropout multipliers: 0 where dropped, `drop_scale(p)` where
    kept. `x * scale_mask` is inverted dropout in one pass forward and one backward."""
    hashed = HashedMask.draw(p) if _on_cpu(device) else None
    if hashed is not None:
        return hashed.materialize(shape, dtype)
    keep = keep_mask(shape, p, device)
    if keep is None:
        return None
    return torch.where(keep, torch.tensor(drop_scale(p), dtype=dtype, device=device),
                       torch.tensor(0.0, dtype=dtype, device=device))


def drop_scale(p: float) -> float:
    """1 / (1 - p) for p rounded as in `keep_mask`: kept values are scaled so the mean is unchanged."""
    return _LEVELS / (_LEVELS - _drop_level(p))


def dropout(x: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """Inverted dropout with a given keep-mask (None: identity)."""
    return x if keep is None else torch.where(keep, x, 0.0).mul_(drop_scale(p))


def apply_mask(x: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
    """Inverted dropout with a keep-mask (bool) or a `scale_mask` (float); None: identity. x keeps
    its dtype (bf16 under autocast)."""
    if mask is None:
        return x
    return dropout(x, mask, p) if mask.dtype == torch.bool else (x * mask).to(x.dtype)


class _GeluDropout(torch.autograd.Function):
    """Exact GELU of a + bias then inverted dropout with a `HashedMask`, one pass each way
    (csrc/dropout_hash.c): keeps only `a` for the backward pass, which draws the mask again."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, bias: torch.Tensor, mask: HashedMask) -> torch.Tensor:
        a, bias = a.contiguous(), bias.contiguous()
        out = torch.empty_like(a)
        cols = a.shape[-1]
        hash_kernel().gelu_dropout_forward(a.data_ptr(), bias.data_ptr(), out.data_ptr(), a.numel() // cols, cols,
                                           mask.k0, mask.k1, mask.level, mask.scale, torch.get_num_threads())
        ctx.save_for_backward(a, bias)
        ctx.mask = mask
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (a, bias), m = ctx.saved_tensors, ctx.mask
        grad = grad.contiguous()
        out = torch.empty_like(a)
        rows, cols = a.numel() // a.shape[-1], a.shape[-1]
        partial = a.new_empty(-(-rows // _BIAS_ROWS), cols)  # the bias's gradient per block of rows
        hash_kernel().gelu_dropout_backward(a.data_ptr(), bias.data_ptr(), grad.data_ptr(), out.data_ptr(),
                                            partial.data_ptr(), rows, cols, m.k0, m.k1, m.level, m.scale,
                                            torch.get_num_threads())
        return out, partial.sum(0), None


def gelu_dropout(a: torch.Tensor, mask: torch.Tensor | HashedMask | None, p: float,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """Exact GELU of `a` (+ `bias` over its last dimension), then inverted dropout with `mask` (as
    `apply_mask`, or a `HashedMask`, fused with the bias into one kernel for fp32 CPU tensors and
    written out for others, e.g. bf16 under autocast)."""
    if isinstance(mask, HashedMask) and a.dtype == torch.float32 and a.device.type == "cpu" and a.dim() > 0 and \
            (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu" and bias.shape == a.shape[-1:])):
        return _GeluDropout.apply(a, a.new_zeros(a.shape[-1]) if bias is None else bias, mask)
    if bias is not None:
        a = a + bias.to(a.dtype)
    if not isinstance(mask, HashedMask):
        return apply_mask(F.gelu(a), mask, p)
    return apply_mask(F.gelu(a), mask.materialize(a.shape), p)


class _GatedResidual(torch.autograd.Function):
    """x + gate * dropout(y) with a `HashedMask`, one pass each way (csrc/dropout_hash.c); gate is
    x's shape, or a (U, N, D) table read at rows index[b] (`RowGather`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor, index: torch.Tensor | None, y: torch.Tensor,
                mask: HashedMask) -> torch.Tensor:
        x, gate, y = x.contiguous(), gate.contiguous(), y.contiguous()
        out = torch.empty_like(x)
        N, D = x.shape[-2:]
        hash_kernel().gated_residual_forward(x.data_ptr(), gate.data_ptr(), address(index), y.data_ptr(), out.data_ptr(),
                                             x.numel() // D, N, D, mask.k0, mask.k1, mask.level, mask.scale,
                                             torch.get_num_threads())
        ctx.save_for_backward(gate, index, y)
        ctx.mask = mask
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (gate, index, y), m = ctx.saved_tensors, ctx.mask
        grad = grad.contiguous()
        N, D = y.shape[-2:]
        grad_gate = torch.zeros_like(gate) if index is not None else torch.empty_like(gate)  # a table is summed into
        grad_y = torch.empty_like(y)
        hash_kernel().gated_residual_backward(gate.data_ptr(), address(index), y.data_ptr(), grad.data_ptr(),
                                              grad_gate.data_ptr(), grad_y.data_ptr(), y.numel() // D, N, D, m.k0, m.k1,
                                              m.level, m.scale, torch.get_num_threads())
        return grad, grad_gate, None, grad_y, None


def gated_residual(x: torch.Tensor, gate: torch.Tensor | RowGather, y: torch.Tensor,
                   mask: torch.Tensor | HashedMask | None, p: float) -> torch.Tensor:
    """x + gate * dropout(y): a block's residual update (adaLN gate) with the dropout of its branch,
    `mask` as in `gelu_dropout` (a `HashedMask` fused into one kernel for fp32 CPU tensors of one
    (B, N, D) shape, the gate also as a `RowGather` of it)."""
    if isinstance(mask, HashedMask):
        table = gate.table if isinstance(gate, RowGather) else gate
        if x.shape == gate.shape == y.shape and x.dim() == 3 and \
                (not isinstance(gate, RowGather) or gate.kernel_ready()) and \
                all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (x, table, y)):
            index = gate.index if isinstance(gate, RowGather) else None
            return _GatedResidual.apply(x, table, index, y, mask)
        mask = mask.materialize(y.shape)
    return torch.addcmul(x, materialize(gate), apply_mask(y, mask, p))
