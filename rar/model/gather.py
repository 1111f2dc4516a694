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

    def materialize(self) -> torch.Tensor:
        """table[index]: (B, N, D), by index_select (its backward sums rows in a fixed order)."""
        return self.table.index_select(0, self.index)


def materialize(t: "torch.Tensor | RowGather") -> torch.Tensor:
    return t.materialize() if isinstance(t, RowGather) else t
