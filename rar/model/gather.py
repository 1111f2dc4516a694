"""`RowGather`: rows of a small table picked per sequence, handed to the fused training kernels
without being written out.

The adaLN modulation depends only on (class, position), so the training forward computes it once
per distinct class in the batch: a (U, N, D) table. Each sequence b reads table row index[b]. Torch
would gather that to (B, N, D) for every chunk of every block (26 gathers and their backward
scatters per step at the demo's shapes, ~3% of it); the kernels of `modulated_norm` and
`gated_residual` read the table directly and sum their gradients into it. Anything else calls
`materialize()`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class RowGather(NamedTuple):
    table: torch.Tensor  # (U, N, D)
    index: torch.Tensor  # (B,) int64 in [0, U)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.index.shape[0], *self.table.shape[1:]))

    def kernel_ready(self) -> bool:
        """Whether a C kernel may read the table through `index`: int64, contiguous, on the CPU
        like the table, every value a row of it (else the callers use torch's ops)."""
        i = self.index
        return (i.dtype == torch.int64 and i.dim() == 1 and i.is_contiguous() and i.device == self.table.device
                and self.table.dim() == 3 and (i.numel() == 0 or (int(i.min()) >= 0 and int(i.max()) < len(self.table))))

    def materialize(self) -> torch.Tensor:
        """table[index]: (B, N, D), by index_select (its backward sums rows in a fixed order)."""
        return self.table.index_select(0, self.index)


def materialize(t: "torch.Tensor | RowGather") -> torch.Tensor:
    return t.materialize() if isinstance(t, RowGather) else t
