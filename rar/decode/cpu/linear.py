"""`DecodeLinear`: nn.Linear for the few rows of a CPU decode step, in the weight layout of the
kernel `CPUCapability.kernel` picks for each row count."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from . import linear_kernel
from .capability import GEMV_K_CHUNK, CPUCapability


class DecodeLinear(torch.nn.Module):
    """nn.Linear for CPU decode steps, with its weight in the layout of the kernel that
    `capability.kernel(dtype, rows)` picks for each row count. Each layout is built on first use
    and kept (a layout never used costs no memory). Outputs equal F.linear up to fp32 rounding.
    `few_rows` is the loaded `linear_kernel` (None: not available). `keep_plain=False`
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
