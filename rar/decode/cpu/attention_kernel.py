"""A compiled single-query attention kernel for fp32 decoding on CPU (`csrc/single_query_attention.c`).

torch's fused CPU kernel for `scaled_dot_product_attention` reads a decode step's KV cache well
below the machine's memory bandwidth; this one streams it at that bandwidth (figures in
BENCHMARKS.md). It is compiled by `toolchain` on first use for a head size and the instruction-set
flags it is given. Where that is impossible (no compiler, not Linux, torch not built with OpenMP)
`load` returns None, `unavailable_reason` says why, and the decoder uses torch's kernel: the same
results up to fp32 rounding.
"""
from __future__ import annotations

import ctypes

import torch

from ...core import toolchain

MAX_LENGTH = 16384  # cached positions per call: the kernel keeps one pair's scores on its thread's stack
MAX_SCORES = 32768  # queries x positions of one multi-query call (its scores are on the stack too) ...
MAX_QUERIES = 64  # ... and its queries (their running sums too)

class SingleQueryAttention:
    """softmax(q k^T / sqrt(Dh)) v for one query per (row, head): q (R, H, Dh) with a contiguous last
    dimension, k and v (R, H, L, Dh) with contiguous (L, Dh) planes, as slices of a `KVCache`
    layer are; returns (R, H * Dh). `starts` (R,) int64, if given, is each row's first cached position
    to attend to (0 <= start < L). `new` = (k_new, v_new), each shaped like q: the query's own key
    and value, written to position L - 1 of k and v first (the decode step's cache write, done by the
    threads that read it). Uses torch's intra-op threads (`torch.get_num_threads()`)."""

    def __init__(self, fn, head_dim: int, flags: tuple[str, ...] = (), multi_fn=None):
        self._fn, self.head_dim, self.flags, self._multi = fn, head_dim, tuple(flags), multi_fn

    def multi(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ends: torch.Tensor,
              own: torch.Tensor) -> torch.Tensor:
        """Several queries per row: q (R, N, H, Dh) with a contiguous last dimension, k and v cache
        slices (R, H, L, Dh); query n attends to positions l < ends[n] and to own[n] (>= 0) as well:
        (R, N, H * Dh). The caller keeps N * L <= MAX_SCORES."""
        R, H, L, Dh = k.shape
        N = q.shape[1]
        ok = (q.dtype == k.dtype == v.dtype == torch.float32 and Dh == self.head_dim and q.shape == (R, N, H, Dh)
              and q.stride(-1) == 1 and k.stride()[2:] == v.stride()[2:] == (Dh, 1) and 0 < N * L <= MAX_SCORES
              and N <= MAX_QUERIES
              and ends.shape == own.shape == (N,))
        if not ok or self._multi is None:
            raise ValueError(f"multi_query_attention expects fp32 CPU q (R, N, H, {self.head_dim}) and cache slices "
                             f"(R, H, L, {self.head_dim}) with N * L <= {MAX_SCORES}, got {tuple(q.shape)} and "
                             f"{tuple(k.shape)}.")
        ends, own = ends.to(torch.int64).contiguous(), own.to(torch.int64).contiguous()
        out = torch.empty(R, N, H * Dh, dtype=torch.float32, device="cpu")
        strides = (ctypes.c_int64 * 7)(*q.stride()[:3], *k.stride()[:2], *v.stride()[:2])
        self._multi(q.data_ptr(), strides, k.data_ptr(), ctypes.byref(strides, 24), v.data_ptr(),
                    ctypes.byref(strides, 40), None, ends.data_ptr(), own.data_ptr(), out.data_ptr(),
                    R, H, N, L, Dh ** -0.5, torch.get_num_threads())
        return out

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 starts: torch.Tensor | None = None, new: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        R, H, L, Dh = k.shape
        ok = (q.dtype == k.dtype == v.dtype == torch.float32 and Dh == self.head_dim
              and q.device.type == k.device.type == v.device.type == "cpu"
              and q.shape == (R, H, Dh) and v.shape == k.shape and q.stride(-1) == 1
              and k.stride()[2:] == v.stride()[2:] == (Dh, 1) and 0 < L <= MAX_LENGTH)
        if new is not None:
            ok = ok and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.shape == q.shape
                            and t.stride(-1) == 1 for t in new)
        if not ok:
            raise ValueError(f"single_query_attention expects fp32 CPU q (R, H, {self.head_dim}) and cache slices "
                             f"(R, H, L<={MAX_LENGTH}, {self.head_dim}), got {tuple(q.shape)} and {tuple(k.shape)}.")
        if starts is not None:
            starts = starts.to(torch.int64).contiguous()
            if starts.shape != (R,) or starts.device.type != "cpu" or bool(((starts < 0) | (starts >= L)).any()):
                raise ValueError(f"starts must be (R,) = ({R},) int64 CPU first positions in [0, {L}).")
        out = torch.empty(R, H * Dh, dtype=torch.float32, device="cpu")  # not the default dtype/device
        new_strides = (0, 0, 0, 0) if new is None else (*new[0].stride()[:2], *new[1].stride()[:2])
        new_ptrs = (None, None) if new is None else (new[0].data_ptr(), new[1].data_ptr())
        strides = (ctypes.c_int64 * 10)(*q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *new_strides)
        self._fn(q.data_ptr(), strides, k.data_ptr(), ctypes.byref(strides, 16), v.data_ptr(),
                 ctypes.byref(strides, 32), toolchain.address(starts), *new_ptrs,
                 ctypes.byref(strides, 48), out.data_ptr(), R, H, L, Dh ** -0.5, torch.get_num_threads())
        return out


def build(head_dim: int, flags) -> SingleQueryAttention:
    """Compile and load the kernel for `head_dim` with the instruction-set `flags`
    (`CPUCapability.compiler_flags()`); RuntimeError saying why where it cannot be used."""
    flags = tuple(flags)
    lib = toolchain.build_library("single_query_attention.c", flags, {"HEAD_DIM": head_dim}, package="rar.decode.cpu")
    fn, multi = lib.single_query_attention, lib.multi_query_attention
    fn.restype = multi.restype = None
    fn.argtypes = [ctypes.c_void_p] * 11 + [ctypes.c_int64] * 3 + [ctypes.c_float, ctypes.c_int]
    multi.argtypes = [ctypes.c_void_p] * 10 + [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_int]
    return SingleQueryAttention(fn, head_dim, flags, multi)


def load(head_dim: int, flags, builds: toolchain.KernelBuilds = toolchain.PROCESS_BUILDS) -> SingleQueryAttention | None:
    """The kernel for `head_dim` and `flags`, built on first use and kept in `builds`; None where it cannot be."""
    flags = tuple(flags)
    return builds.get(("single_query_attention", head_dim, flags), lambda: build(head_dim, flags))


def unavailable_reason(head_dim: int, flags, builds: toolchain.KernelBuilds = toolchain.PROCESS_BUILDS) -> str | None:
    """Why `load(head_dim, flags, builds)` gave None (None if it gave a kernel or was not called)."""
    return builds.reason(("single_query_attention", head_dim, tuple(flags)))
