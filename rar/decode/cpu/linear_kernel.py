"""A compiled fp32 linear for the few rows of a CPU decode step (`csrc/few_rows_linear.c`).

A decode step at batch B with guidance multiplies 2B rows by every weight matrix. At such row
counts oneDNN's AVX2 kernel runs far below the CPU's fp32 peak; this kernel streams each weight
matrix once, from a layout made for it (`pack`), and broadcasts every weight against all rows held
in registers. `capability.CPUCapability.kernel` decides the row counts it serves. It needs AVX2
and FMA and is compiled by `toolchain` on first use for the instruction-set flags it is given;
where it cannot be, `load` returns None, `unavailable_reason` says why, and the decoder keeps oneDNN.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from ...core import toolchain

PANEL = 6  # output columns per panel (csrc/few_rows_linear.c NR)
CHUNK = 128  # k per chunk (csrc/few_rows_linear.c KC)

def pack(weight: torch.Tensor) -> torch.Tensor:
    """W (N, K) in the kernel's layout: per chunk of `CHUNK` k, per panel of `PANEL` output columns
    (zero-padded past N), per k, the panel's weights; one flat fp32 tensor, written in one pass."""
    N, K = weight.shape
    P = -(-N // PANEL)
    w = weight.detach().float()
    if P * PANEL != N:
        w = F.pad(w, (0, 0, 0, P * PANEL - N))
    w = w.view(P, PANEL, K)
    out = torch.empty(P * PANEL * K, dtype=torch.float32)
    for k0 in range(0, K, CHUNK):
        kn = min(CHUNK, K - k0)
        out[P * PANEL * k0:P * PANEL * (k0 + kn)].view(P, kn, PANEL).copy_(w[:, :, k0:k0 + kn].transpose(1, 2))
    return out  # (P * 6 * K,)


class FewRowsLinear:
    """y = x W^T + b for x (rows, K) with W given `pack`ed: (rows, N) fp32. Uses torch's intra-op
    threads; the result does not depend on how many."""

    def __init__(self, fn, flags: tuple[str, ...]):
        self._fn, self.flags = fn, tuple(flags)

    def __call__(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
        rows, K = x.shape
        ok = (K > 0 and x.dtype == packed.dtype == torch.float32 and x.device.type == packed.device.type == "cpu"
              and packed.is_contiguous() and packed.numel() == -(-n // PANEL) * PANEL * K
              and (bias is None or (bias.dtype == torch.float32 and bias.shape == (n,) and bias.is_contiguous())))
        if not ok:
            raise ValueError(f"few_rows_linear expects fp32 CPU x (rows, K) and a packed (N={n}, K={K}) weight, "
                             f"got x {tuple(x.shape)} {x.dtype} and {packed.numel()} packed values.")
        x = x.contiguous()
        y = torch.empty(rows, n, dtype=torch.float32, device="cpu")  # not the default dtype/device
        if self._fn(x.data_ptr(), packed.data_ptr(), toolchain.address(bias), y.data_ptr(),
                    rows, n, K, torch.get_num_threads()) != 0:
            raise MemoryError(f"few_rows_linear could not allocate its scratch buffer for {rows} rows x {K}.")
        return y


def build(flags) -> FewRowsLinear:
    """Compile and load the kernel with the instruction-set `flags` (`CPUCapability.compiler_flags()`);
    RuntimeError saying why where it cannot be used."""
    flags = tuple(flags)
    if "-mavx2" not in flags or "-mfma" not in flags:
        raise RuntimeError("the few-rows linear kernel needs AVX2 and FMA, which this CPU (or torch's dispatch) lacks")
    fn = toolchain.build_library("few_rows_linear.c", flags, package="rar.decode.cpu").few_rows_linear
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    return FewRowsLinear(fn, flags)


def load(flags, builds: toolchain.KernelBuilds = toolchain.PROCESS_BUILDS) -> FewRowsLinear | None:
    """The kernel for `flags`, built on first use and kept in `builds`; None where it cannot be."""
    flags = tuple(flags)
    return builds.get(("few_rows_linear", flags), lambda: build(flags))


def unavailable_reason(flags, builds: toolchain.KernelBuilds = toolchain.PROCESS_BUILDS) -> str | None:
    """Why `load(flags, builds)` gave None (None if it gave a kernel or was not called)."""
    return builds.reason(("few_rows_linear", tuple(flags)))
