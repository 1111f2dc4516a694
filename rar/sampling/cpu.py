"""CPU kernels for decode steps, chosen by what this CPU can do.

A decode step multiplies a few rows (2B with guidance) by every weight matrix of the model, so at
small batches it is bound by how fast the weights stream from memory, and the kernel that reads
them fastest depends on the row count, the dtype and the instruction set. Measured on 2-core
AVX-512 and AVX2 machines (benchmarks/sample_speed.py, BENCHMARKS.md), RAR-B's 96 block linears:

    fp32, rows           1          2          16
    F.linear (MKL)       52 ms      104 ms     96 ms
    oneDNN packed        43 ms      40 ms      46 ms (AVX2: 70 ms)
    mm(W, x.t()) blocks  73 ms      35 ms      84 ms

so fp32 uses `mm(W, x.t())` over contiguous column blocks at exactly 2 rows (batch 1 with
guidance), and oneDNN's pre-packed layout otherwise. In bf16, oneDNN's packed kernel is the fast
one, but it needs AVX512-BW/VL/DQ or AVX-NE-CONVERT: without them torch's own bf16 matmul is 3-8x
slower than fp32, so `rar.sampling.prepare` decodes a bf16 model in fp32 there and says so.
Every choice is a pure function of (`CPUCapability`, dtype, rows), so tests can force each path.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GEMV_ROWS = (2,)  # fp32 row counts that stream weights through mm(W, x.t()) ...
GEMV_K_CHUNK = 1024  # ... in column blocks of at most this width (a wider row of W reads slower)


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

    def kernel(self, dtype: torch.dtype, rows: int) -> str:
        """The linear kernel for `rows` rows of `dtype` (see the module docstring)."""
        if dtype == torch.float32 and rows in GEMV_ROWS:
            return "gemv"
        if self.onednn and (dtype == torch.float32 or (dtype == torch.bfloat16 and self.onednn_bf16)):
            return "onednn"
        return "aten"

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype decoding runs in for a model of `dtype`: bf16 only where oneDNN runs it."""
        return torch.float32 if dtype == torch.bfloat16 and not self.onednn_bf16 else dtype

    def compiler_flags(self) -> list[str]:
        """Instruction-set flags for the compiled attention kernel: the ISA torch dispatches to,
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
    `keep_plain=False` packs at once and drops the plain weight: for a linear only ever applied
    to many rows (the folded adaLN)."""

    def __init__(self, linear: torch.nn.Linear, capability: CPUCapability, keep_plain: bool = True):
        super().__init__()
        self.weight = linear.weight.detach()  # (N, K)
        self.bias = None if linear.bias is None else linear.bias.detach()  # (N,)
        self.capability = capability
        self.shape = tuple(self.weight.shape)
        self._packed: torch.Tensor | None = None
        self._blocks: tuple[torch.Tensor, ...] | None = None
        if not keep_plain and capability.kernel(self.weight.dtype, 2**20) == "onednn":
            self._packed, self.weight = torch.ops.mkldnn._reorder_linear_weight(self.weight, None), None

    def kernel(self, rows: int) -> str:
        dtype = self.weight.dtype if self.weight is not None else self.bias.dtype
        kind = self.capability.kernel(dtype, rows)
        return "onednn" if self.weight is None else kind  # a dropped plain weight: packed only

    def prepare(self, rows: int) -> None:
        """Build (once) the layout used for `rows` rows."""
        kind = self.kernel(rows)
        if kind == "onednn" and self._packed is None:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, None)
        elif kind == "gemv" and self._blocks is None:
            self._blocks = tuple(w.contiguous() for w in self.weight.split(GEMV_K_CHUNK, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, K = self.shape
        rows = x.numel() // K
        kind = self.kernel(rows)
        self.prepare(rows)
        if kind == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        if kind == "aten":
            return F.linear(x, self.weight, self.bias)
        # x.t() must be a transposed view of a contiguous x: MKL is ~4x slower on a (K, rows) one.
        xs = x.reshape(rows, K).contiguous().split(GEMV_K_CHUNK, dim=1)
        first = (self._blocks[0], xs[0].t())
        out = torch.mm(*first) if self.bias is None else torch.addmm(self.bias[:, None], *first)  # (N, rows)
        for w, xc in zip(self._blocks[1:], xs[1:]):
            out.addmm_(w, xc.t())
        return out.t().reshape(*x.shape[:-1], N)
