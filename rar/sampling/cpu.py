"""CPU kernels for decode steps, chosen by what this CPU can do.

A decode step multiplies a few rows (2B with guidance) by every weight matrix of the model, so at
small batches it is bound by how fast the weights stream from memory and at batch 8 (16 rows) by
the matmul's arithmetic, and the kernel that does either best depends on the row count, the dtype
and the instruction set. RAR-B's 96 block linears on the project's 2-core machine (AVX-512 host,
and the same host emulating an AVX2-only CPU; best of several runs, noisy; BENCHMARKS.md):

    fp32, rows              1        2        4        8        16       32
    F.linear (MKL)          52 ms    104 ms   -        -        96 ms    -
    oneDNN packed           29-34    31-35    22       30-38    41-42    72
      under AVX2            33       35       48       56       58       101
    mm(W, x.t()) blocks     73       29-34    -        -        84       -
    rar.linear_kernel       25-35    25-26    24-26    25-29    37-41    89
      under AVX2            27       25       29       29       37       84

So fp32 decodes through `rar.sampling.linear_kernel` (AVX2 code, compiled at run time) at every
row count up to 48 on AVX2 hosts and at 1-3, 8 and 16 rows on AVX-512 hosts, where oneDNN's
AVX-512 kernels win the other counts; without that kernel (no compiler), `mm(W, x.t())` at 2 rows
and oneDNN's pre-packed layout otherwise. In bf16, oneDNN's packed kernel is the fast one, but it
needs AVX512-BW/VL/DQ or AVX-NE-CONVERT: without them torch's own bf16 matmul is 3-8x slower than
fp32, so `rar.sampling.prepare` decodes a bf16 model in fp32 there and says so. Every choice is a
pure function of (`CPUCapability`, dtype, rows, whether the compiled kernel loaded), so tests can
force each path on any host.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import linear_kernel

GEMV_ROWS = (2,)  # fp32 row counts that stream weights through mm(W, x.t()) ...
GEMV_K_CHUNK = 1024  # ... in column blocks of at most this width (a wider row of W reads slower)
# fp32 row counts that use rar.linear_kernel, per torch dispatch level (see the table above)
FEW_ROWS = {"AVX2": range(1, 49), "AVX512": (1, 2, 3, 8, 16)}


@dataclass(frozen=True)
class CPUCapability:
    """What this CPU and torch build can run. `isa` is torch's ATen dispatch level
    (`torch.backends.cpu.get_cpu_capability()`: "AVX512", "AVX2", "DEFAULT", ...); it follows
    ATEN_CPU_CAPABILITY, and `onednn_bf16` follows ONEDNN_MAX_CPU_ISA, so both emulate an older CPU."""
    isa: str
    onednn: bool  # oneDNN's packed linear ops exist in this torch build
    onednn_bf16: bool  # ... and run bf16 on this CPU
    machine: str = "x86_64"

    @classmethod
    def detect(cls) -> "CPUCapability":
        onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        bf16 = onednn and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return cls(torch.backends.cpu.get_cpu_capability(), onednn, bf16, platform.machine().lower())

    def kernel(self, dtype: torch.dtype, rows: int, compiled: bool = False) -> str:
        """The linear kernel for `rows` rows of `dtype` (see the module docstring); `compiled`: rar's
        few-rows kernel (`rar.sampling.linear_kernel`) is loaded."""
        if dtype == torch.float32 and compiled and rows in FEW_ROWS.get(self.isa, ()):
            return "few_rows"
        if dtype == torch.float32 and rows in GEMV_ROWS:
            return "gemv"
        if self.onednn and (dtype == torch.float32 or (dtype == torch.bfloat16 and self.onednn_bf16)):
            return "onednn"
        return "aten"

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype decoding runs in for a model of `dtype`: bf16 only where oneDNN runs it."""
        return torch.float32 if dtype == torch.bfloat16 and not self.onednn_bf16 else dtype

    def compiler_flags(self) -> list[str]:
        """Instruction-set flags for rar's compiled kernels: the ISA torch dispatches to,
        so that the kernel never uses an instruction the CPU (or its emulation) lacks. Explicit
        -m flags rather than -march=x86-64-vN, which GCC < 11 does not know."""
        if self.machine not in ("x86_64", "amd64"):
            return []
        avx2 = ["-mavx2", "-mfma", "-mf16c"]
        return {"AVX512": [*avx2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"], "AVX2": avx2}.get(self.isa, [])

    def describe(self) -> str:
        return (f"{self.machine} {self.isa}, oneDNN {'yes' if self.onednn else 'no'}, "
                f"oneDNN bf16 {'yes' if self.onednn_bf16 else 'no'}")


class DecodeLinear(torch.nn.Module):
    """nn.Linear for CPU decode steps, with its weight in the layout of the kernel that
    `capability.kernel(dtype, rows)` picks for each row count. Each layout is built on first use
    and kept (a layout never used costs no memory). Outputs equal F.linear up to fp32 rounding.
    `few_rows` is the loaded `rar.sampling.linear_kernel` (None: not available). `keep_plain=False`
    packs at once and drops the plain weight: for a linear only ever applied to many rows (the
    folded adaLN)."""

    def __init__(self, linear: torch.nn.Linear, capability: CPUCapability, keep_plain: bool = True,
                 few_rows: Callable | None = None):
        super().__init__()
        self.weight = linear.weight.detach()  # (N, K)
        self.bias = None if linear.bias is None else linear.bias.detach()  # (N,)
        self.capability, self.few_rows = capability, few_rows
        self.shape = tuple(self.weight.shape)
        self._packed: torch.Tensor | None = None  # oneDNN's layout
        self._blocks: tuple[torch.Tensor, ...] | None = None  # gemv's column blocks
        self._panels: torch.Tensor | None = None  # rar.linear_kernel's layout
        if not keep_plain and capability.kernel(self.weight.dtype, 2**20) == "onednn":
            self._packed, self.weight = torch.ops.mkldnn._reorder_linear_weight(self.weight, None), None

    def kernel(self, rows: int) -> str:
        dtype = self.weight.dtype if self.weight is not None else self.bias.dtype
        kind = self.capability.kernel(dtype, rows, compiled=self.few_rows is not None)
        return "onednn" if self.weight is None else kind  # a dropped plain weight: packed only

    def layouts(self) -> set[str]:
        """The kernels whose weight layouts are built so far."""
        built = {"onednn": self._packed, "gemv": self._blocks, "few_rows": self._panels}
        return {k for k, v in built.items() if v is not None}

    def prepare(self, rows: int) -> None:
        """Build (once) the layout used for `rows` rows."""
        kind = self.kernel(rows)
        if kind == "onednn" and self._packed is None:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, None)
        elif kind == "gemv" and self._blocks is None:
            self._blocks = tuple(w.contiguous() for w in self.weight.split(GEMV_K_CHUNK, dim=1))
        elif kind == "few_rows" and self._panels is None:
            self._panels = linear_kernel.pack(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, K = self.shape
        rows = x.numel() // K
        kind = self.kernel(rows)
        self.prepare(rows)
        if kind == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        if kind == "aten":
            return F.linear(x, self.weight, self.bias)
        if kind == "few_rows":
            return self.few_rows(x.reshape(rows, K), self._panels, self.bias, N).view(*x.shape[:-1], N)
        # x.t() must be a transposed view of a contiguous x: MKL is ~4x slower on a (K, rows) one.
        xs = x.reshape(rows, K).contiguous().split(GEMV_K_CHUNK, dim=1)
        first = (self._blocks[0], xs[0].t())
        out = torch.mm(*first) if self.bias is None else torch.addmm(self.bias[:, None], *first)  # (N, rows)
        for w, xc in zip(self._blocks[1:], xs[1:]):
            out.addmm_(w, xc.t())
        return out.t().reshape(*x.shape[:-1], N)
