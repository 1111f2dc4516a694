"""Which linear kernel a CPU decode step uses, as a pure function of what this CPU and torch run.

A decode step multiplies a few rows (2B with guidance) by every weight matrix of the model, so at
small batches it is bound by how fast the weights stream from memory and at batch 8 (16 rows) by
the matmul's arithmetic; which kernel does either best depends on the row count, the dtype and
the instruction set (the measurements behind `FEW_ROWS` and `GEMV_ROWS` are in BENCHMARKS.md).
fp32 decodes through rar's compiled `linear_kernel` where it wins (every row count up to 48 with
AVX2; a few counts with AVX-512, whose oneDNN kernels win the others); without that kernel, 2 rows
stream through `mm(W, x.t())` and other counts use oneDNN's pre-packed layout. In bf16 oneDNN's
packed kernel is the fast one, but it needs AVX512-BW/VL/DQ or AVX-NE-CONVERT; without them
torch's own bf16 matmul is several times slower than fp32, so `prepare` decodes a bf16 model in
fp32 there and says so. Every choice is a function of (`CPUCapability`, dtype, rows, whether the
compiled kernel loaded), so tests can force each path on any host.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass

import torch

from ...core.toolchain import isa_flags

GEMV_ROWS = (2,)  # fp32 row counts that stream weights through mm(W, x.t()) ...
GEMV_K_CHUNK = 1024  # ... in column blocks of at most this width (a wider row of W reads slower)
# fp32 row counts that use the compiled linear_kernel, per torch dispatch level (BENCHMARKS.md)
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
        few-rows kernel (`linear_kernel`) is loaded."""
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
        """Instruction-set flags for rar's compiled kernels at this `isa` (`rar.core.toolchain.isa_flags`)."""
        return isa_flags(self.isa, self.machine)

    def describe(self) -> str:
        return (f"{self.machine} {self.isa}, oneDNN {'yes' if self.onednn else 'no'}, "
                f"oneDNN bf16 {'yes' if self.onednn_bf16 else 'no'}")
