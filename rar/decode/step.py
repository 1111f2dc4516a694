"""The cached step: one block's arithmetic on R sequences x N new rows against a KV cache.

Every cached decoding path runs through `cached_step`: a decode step (N = 1), the editing prefill
(N = K + 2 rows, causal, all kept) and a parallel-decoding pass (a committed chain of C rows, kept,
plus Q query rows, not kept). The training forward (`rar.model.transformer.Block.forward`) is the
other definition of the same arithmetic; the tests hold the two together.

Slots. The cache of a batch holds `slot` filled slots per sequence. The chain's rows (the first
C new rows) are written to slots slot .. slot + C - 1; the other Q rows (queries) are never kept:
their keys and values sit in the free slots after the chain for this step only (the next chain
overwrites them), or in a copy where the cache has no room. `PassRows` lays the rows out: a chain
row sees the cache and the chain up to itself (causal); a query takes the place of the chain's
last row: it sees the cache, the chain but its last row, and itself, exactly as the training row
at that position sees its prefix when the order puts the query's target next.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ..model.transformer import FoldedModulation
from .backend import DecodeBlock
from .cpu import attention_kernel


class PassRows(NamedTuple):
    """Where a step's N = chain + queries new rows sit: `chain` rows kept at slots slot.. (causal),
    `queries` rows that each take the place of the chain's last row; `starts` (R,) each sequence's
    first slot to attend to (earlier slots are padding), None for none."""
    slot: int
    chain: int
    queries: int = 0
    starts: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return self.chain + self.queries

    def rows(self, a: int, b: int) -> "PassRows":
        """The same layout for sequences a..b-1."""
        return self._replace(starts=None if self.starts is None else self.starts[a:b])

    def bounds(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per new row, the end of its visible slots and its own slot after them (-1: none):
        (N,), (N,). A chain row sees slots < slot + i + 1; a query, slots < slot + chain - 1 and its
        own key, stored at slot + chain + j."""
        n = torch.arange(self.count, device=device)
        ends = torch.where(n < self.chain, self.slot + n + 1, self.slot + self.chain - 1)
        return ends, torch.where(n < self.chain, -1, self.slot + n)

    def mask(self, device=None) -> torch.Tensor:
        """(R or 1, 1, N, slot + N) bool, True = may attend, over the keys [cache slots, then the new
        rows' keys in order]."""
        if self.chain < 1:
            raise ValueError(f"a pass needs at least one chain row, got {self.chain}.")
        N = self.count
        keys = torch.arange(self.slot + N, device=device)  # (L,)
        ends, own = self.bounds(device)
        mask = (keys[None] < ends[:, None]) | (keys[None] == own[:, None])  # (N, L)
        mask = mask[None, None]  # (1, 1, N, L)
        if self.starts is not None:
            mask = mask & (keys >= self.starts[:, None])[:, None, None]  # (R, 1, N, L)
            mask = mask | (keys == self.slot + torch.arange(N, device=device)[:, None])  # padding rows see themselves
        return mask


def cached_step(blk: DecodeBlock, x: torch.Tensor, mod: torch.Tensor | FoldedModulation,
                kv: tuple[torch.Tensor, torch.Tensor], rows: PassRows, attention: Callable,
                outputs: int | None = None) -> torch.Tensor:
    """`Block.forward` for N new rows per sequence: x (R, N, D); mod (R, N, 6D) laid out as
    `FoldedModulation` (or one with chunks (R, N, D)); kv the block's cache (R, H, S, Dh) each;
    `rows` says where the new rows sit (the module docstring). N = 1 is the decode step
    (`attention`, the single-query kernel, reads slots starts[r]..slot); several rows use its
    multi-query form where it applies, torch's attention with `rows.mask()` otherwise. `outputs`:
    only the last `outputs` rows are returned (the others' keys and values are still written):
    (R, outputs or N, D)."""
    R, N, D = x.shape
    H = blk.num_heads
    Dh = D // H
    slot = rows.slot
    m = mod if isinstance(mod, FoldedModulation) else FoldedModulation(*mod.chunk(6, dim=-1))
    m = FoldedModulation(*(c.reshape(R * N, D) for c in m))  # views: 2-D rows for every linear
    x = x.reshape(R * N, D)
    qkv = blk.qkv(torch.addcmul(m.c_msa, F.layer_norm(x, (D,), eps=blk.norm_eps), m.a_msa))  # (RN, 3D)
    qk = F.layer_norm(qkv[:, :2 * D].reshape(R * N, 2, H, Dh), (Dh,), eps=blk.qk_eps)  # q-norm and k-norm at once
    q, k = torch.addcmul(blk.qk_bias, qk, blk.qk_weight).unbind(1)  # (RN, H, Dh) each
    v = qkv[:, 2 * D:].view(R * N, H, Dh)
    k_buf, v_buf = kv  # (R, H, S, Dh)
    n = N if outputs is None else min(outputs, N)  # the rows whose outputs are returned
    if N == 1:  # the decode step: the single-query kernel writes k, v to `slot` and attends over the cache
        out = attention(q, k_buf[:, :, :slot + 1], v_buf[:, :, :slot + 1], rows.starts, new=(k, v))  # (R, D)
    else:
        out = _rows_attention(q.view(R, N, H, Dh), k.view(R, N, H, Dh), v.view(R, N, H, Dh), kv, rows, attention, n)
    if n < N:
        keep_rows = lambda t: t.view(R, N, D)[:, N - n:].reshape(R * n, D)  # noqa: E731
        x, m = keep_rows(x), FoldedModulation(*(keep_rows(c) for c in m))
    x = torch.addcmul(x, m.gate_msa, blk.proj(out))
    h = torch.addcmul(m.c_mlp, F.layer_norm(x, (D,), eps=blk.norm_eps), m.a_mlp)
    return torch.addcmul(x, m.gate_mlp, blk.fc2(blk.act(blk.fc1(h)))).view(R, n, D)  # (R, outputs or N, D)


def _rows_attention(q, k, v, kv, rows: PassRows, attention, n: int) -> torch.Tensor:
    """Attention of N new rows (q, k, v (R, N, H, Dh)) over the cache and each other: the last n
    rows' outputs (R * n, D). Keys and values of the chain go to its slots; the queries' to the free
    slots after it, which the next chain overwrites (so that attention reads one slice of the cache),
    or, where the cache has no room, into a copy."""
    R, N, H, Dh = q.shape
    k_buf, v_buf = kv  # (R, H, S, Dh)
    slot = rows.slot
    stored = N if k_buf.shape[2] >= slot + N else rows.chain
    k_buf[:, :, slot:slot + stored] = k[:, :stored].transpose(1, 2)
    v_buf[:, :, slot:slot + stored] = v[:, :stored].transpose(1, 2)
    keys, values = k_buf[:, :, :slot + stored], v_buf[:, :, :slot + stored]  # (R, H, L, Dh)
    multi = getattr(attention, "multi", None)
    if (multi is not None and stored == N and rows.starts is None and N <= attention_kernel.MAX_QUERIES
            and N * (slot + N) <= attention_kernel.MAX_SCORES):
        ends, own = rows.bounds()
        return multi(q[:, N - n:], keys, values, ends[N - n:], own[N - n:]).view(R * n, H * Dh)
    if stored < N:
        keys = torch.cat([keys, k[:, stored:].transpose(1, 2)], dim=2)
        values = torch.cat([values, v[:, stored:].transpose(1, 2)], dim=2)
    mask = rows.mask(q.device)[:, :, N - n:]
    out = F.scaled_dot_product_attention(q[:, N - n:].transpose(1, 2), keys, values, attn_mask=mask)  # (R, H, n, Dh)
    return out.transpose(1, 2).reshape(R * n, H * Dh)
