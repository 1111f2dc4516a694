"""Decoding a batch of rows through a preallocated KV cache, each row in its own order, with an
optional block of known tokens fed first in one batched pass (the editing prefill).

Slot layout. Row r feeds `kept[r]` known tokens first, in its order `orders[r]`; its sequence is
[cls], [class], kept tokens, generated tokens (`rar.model.transformer`'s layout). Rows with fewer
known tokens than the batch's most, K_max, are shifted right by `offsets[r] = K_max - kept[r]`
padding slots, so that every row's last known token sits at slot K_max + 1 and all rows then
decode in step, writing slot K_max + 2 + j at step j. A row attends to its own slots only
(`offsets[r]` onwards), and its adaLN condition is that of its own position, slot - offsets[r]:
so a row's result does not depend on the other rows of the batch. Attention is permutation-
invariant over its keys, which is why the padding may sit anywhere as long as it is masked.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ..core.devices import check_memory
from ..model.config import RARConfig
from ..model.transformer import BlockModulation, FinalLayer, FoldedModulation, HeadModulation
from .backend import DecodeBackend, single_query_attention
from .cpu import attention_kernel
from .step import PassRows, cached_step

# Precomputed adaLN outputs held at once. 32 MiB is glibc's largest mmap threshold: a window that
# fits is recycled from the heap instead of faulting in fresh pages (measured ~7% faster window
# matmuls than 256 MiB windows, and ~200 MiB less peak memory at RAR-B batch 8) ...
MOD_BUDGET_BYTES = 32 * 2**20
MIN_WINDOW_ROWS = 64  # ... unless that leaves a window matmul fewer rows than this (slower kernels)


class KVCache:
    """Preallocated keys and values of every block for one batch (LlamaGen-style static cache):
    the decode step writes slot p's keys and values and attends to the slots up to p."""

    def __init__(self, config: RARConfig, batch_size: int, max_len: int | None = None, device=None,
                 dtype: torch.dtype = torch.float32):
        max_len = max_len or config.num_tokens + 1  # [cls], [class] and T - 1 tokens
        shape = (config.num_layers, batch_size, config.num_heads, max_len, config.head_dim)
        check_memory(2 * math.prod(shape) * torch.finfo(dtype).bits // 8, device,
                     f"the KV cache of {batch_size} decoding rows", "use a smaller batch size")
        self.keys = torch.empty(shape, device=device, dtype=dtype)  # (layers, B, H, S, Dh)
        self.values = torch.empty(shape, device=device, dtype=dtype)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[i], self.values[i]


def row_chunks(inverse: torch.Tensor, positions: int, width: int) -> list[tuple[int, int]]:
    """Row ranges of the prefill: each chunk's largest activation (rows x positions x width fp32)
    within `MOD_BUDGET_BYTES`, so that it is recycled from the heap instead of faulting in fresh
    pages (as for the modulation windows), in equal parts; a chunk boundary is moved to where the
    rows' condition changes when one is near (e.g. between the conditional and unconditional
    halves of a guided batch), so that most chunks hold one condition or distinct ones."""
    R = inverse.shape[0]
    per_row = max(1, positions * width * 4)
    n = max(1, -(-R * per_row // MOD_BUDGET_BYTES))
    bounds = [round(i * R / n) for i in range(n + 1)]
    ids = inverse.tolist()
    changes = [i for i in range(1, R) if ids[i] != ids[i - 1]]
    for j in range(1, n):
        near = [c for c in changes if abs(c - bounds[j]) <= max(1, R // (4 * n)) and bounds[j - 1] < c < bounds[j + 1]]
        if near:
            bounds[j] = min(near, key=lambda c: abs(c - bounds[j]))
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


class CachedDecoder:
    """Runs one batch of rows through the model with a KV cache.

    rows (R,) labels in [0, C]; orders (T,) or (R, T) raster indices in generation order, per row;
    kept (R,) the number of leading tokens of each row's order that are known (default none; at
    most T - 1). `prefill(tokens)` feeds [cls], [class] and each row's known tokens (read from
    tokens (R, T), raster layout) in one batched pass and returns the logits (R, V) predicting
    orders[r, kept[r]]. `step(tok, j)` feeds generated token j of every row (the one at
    orders[r, kept[r] + j]) and returns the logits predicting the next; a row past its last token
    runs on harmlessly (its outputs mean nothing).
    """

    def __init__(self, backend: DecodeBackend, rows: torch.Tensor, orders: torch.Tensor,
                 kept: torch.Tensor | None = None):
        cfg, model = backend.config, backend.model
        R, T, device = rows.shape[0], cfg.num_tokens, rows.device
        self.backend, self.model, self.rows = backend, model, rows
        self.orders = orders.to(device).long().expand(R, T)  # (R, T)
        self.kept = torch.zeros(R, dtype=torch.long, device=device) if kept is None else kept.to(device).long()
        self.k_max = int(self.kept.max())
        self.offsets = self.k_max - self.kept  # (R,) padding slots in front of each row
        self.starts = self.offsets if bool(self.offsets.any()) else None  # attention's first slots
        slots = T + 1 + self.k_max - int(self.kept.min())  # the longest-running row's last slot + 1
        self.cache = KVCache(cfg, R, slots, device=device, dtype=backend.dtype)
        fits = slots <= attention_kernel.MAX_LENGTH
        self.attention = backend.attention if fits else single_query_attention
        # One adaLN condition per distinct (label, offset): with guidance all unconditional rows share one.
        keys, self.inverse = torch.unique(rows * (T + 1) + self.offsets, return_inverse=True)  # (U,), (R,)
        positions = (torch.arange(slots, device=device) - (keys % (T + 1))[:, None]).clamp(0, T)  # (U, S)
        cond = F.silu(model.condition(keys // (T + 1)))  # (U, T+1, D): the adaLN input per position
        self.cond = cond.gather(1, positions[..., None].expand(-1, -1, cond.shape[-1]))  # (U, S, D) per slot
        U = keys.numel()
        per_slot = U * cfg.hidden_size * (6 * cfg.num_layers + 2) * self.cond.element_size()
        rows_floor = -(-MIN_WINDOW_ROWS // U)  # slots
        self.window = max(1, min(slots, max(rows_floor, MOD_BUDGET_BYTES // per_slot)))
        self.win_start, self.win_mods = None, None
        # (R, L*6D + 2D): one step's modulations, reused (a fresh multi-MB tensor per step costs page faults)
        self.step_mods = self.cond.new_empty(R, cfg.hidden_size * (6 * cfg.num_layers + 2))

    def _step_mods(self, slot: int) -> list[torch.Tensor]:
        """Folded adaLN outputs at `slot` for every row: [(R, 6D)] * layers + [(R, 2D)]."""
        if self.win_start is None or not self.win_start <= slot < self.win_start + self.window:
            self.win_start, self.win_mods = slot, None
            self.win_mods = self.backend.adaln(self.cond[:, slot:slot + self.window])  # (U, W, L*6D + 2D)
        i = slot - self.win_start
        mods = torch.index_select(self.win_mods[:, i], 0, self.inverse, out=self.step_mods)  # (R, L*6D + 2D)
        D = self.cond.shape[-1]
        return list(mods.split([6 * D] * len(self.backend.blocks) + [2 * D], dim=-1))

    def _window_rows(self, slots: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
        """For `slots` (N,) (consecutive but for repeats) a function (a, b) -> the folded adaLN
        outputs [a, b) of every row at those slots, (R, N, b - a): one gather of just that part,
        so that a pass never copies all layers' modulations for all its rows at once."""
        lo, hi = int(slots.min()), int(slots.max()) + 1
        if self.win_start is None or not (self.win_start <= lo and hi <= self.win_start + self.win_mods.shape[1]):
            self.win_start, self.win_mods = lo, None
            self.win_mods = self.backend.adaln(self.cond[:, lo:lo + max(self.window, hi - lo)])  # (U, W, F)
        U, W, _ = self.win_mods.shape
        index = (self.inverse[:, None] * W + (slots - self.win_start)[None]).flatten()  # (R * N,) rows of (U * W)
        R, N = self.inverse.shape[0], slots.shape[0]
        return lambda a, b: self.win_mods[..., a:b].reshape(U * W, b - a).index_select(0, index).view(R, N, b - a)

    def prefill(self, tokens: torch.Tensor | None = None, all_logits: bool = False,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """Feed [cls], [class] and each row's known tokens (from tokens (R, T), raster layout): the
        logits (R, V) predicting each row's first unknown token, or with `all_logits` those of every
        slot (R, K_max + 2, V) (slot s of row r is its position s - offsets[r]; slot 0 is [cls]).
        `targets` (R, Q) raster indices add Q query rows (parallel decoding's first pass): then the
        logits are (R, 1 + Q, V), the first unknown token's and each target's."""
        R, T = self.orders.shape
        K = self.k_max
        if K > 0 and (tokens is None or tokens.shape != (R, T)):
            raise ValueError(f"prefill needs the known tokens as an (R, T) = ({R}, {T}) tensor.")
        if K == 0 and targets is None:  # one position at a time (causal, so the same as both at once)
            x = self.model.embed_prefix(self.rows, self.orders[:, 0])  # (R, 2, D)
            out = [self._forward(x[:, :1], 0), self._forward(x[:, 1:], 1)]
            return torch.stack(out, dim=1) if all_logits else out[1]
        x = self.model.embed_prefix(self.rows, self.orders[:, 0])  # (R, 2, D)
        last = None
        if K > 0:
            seq = tokens.gather(1, self.orders[:, :K]).clamp(0, self.model.config.codebook_size - 1)  # (R, K)
            x = torch.cat([x, self.model.embed_tokens(seq, self.orders[:, :K], self.orders[:, 1:K + 1])], dim=1)
            slot = torch.arange(K + 2, device=x.device)
            pos = (slot - self.offsets[:, None]).clamp(min=0)  # (R, N): each row's position at each slot
            x = x.gather(1, pos[..., None].expand(-1, -1, x.shape[-1]))  # (R, K + 2, D) in slot layout
            last = (seq.gather(1, (self.kept - 1).clamp(min=0)[:, None]), self.orders.gather(1, (self.kept - 1).clamp(min=0)[:, None]))
        if targets is not None:
            x = torch.cat([x, self._queries(last, targets)], dim=1)
        Q = 0 if targets is None else targets.shape[1]
        logits = self._pass(x, 0, K + 2, Q, None if all_logits else 1 + Q, chunked=True)
        return logits if all_logits or targets is not None else logits[:, 0]

    def _queries(self, last: tuple[torch.Tensor, torch.Tensor] | None, targets: torch.Tensor) -> torch.Tensor:
        """Query rows (R, Q, D): each row's last fed input (a token and its position, or [class]
        where none is known) with the target-aware position of each of `targets` (R, Q)."""
        cls = self.model.embed_class(self.rows, targets)  # (R, Q, D)
        if last is None:
            return cls
        tok, here = (t.expand_as(targets) for t in last)  # (R, Q) each
        x = self.model.embed_tokens(tok, here, targets)
        return torch.where((self.kept > 0)[:, None, None], x, cls)

    def extend(self, tokens: torch.Tensor, j: int, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Commit generated tokens j .. j + C - 1 of every row, tokens (R, C), as a chain (each with the
        target-aware position of the token after it in its order) and ask for `targets` (R, Q) raster
        indices from the last of them: logits (R, 1 + Q, V), the next token's and each target's.
        C = 1 without targets is `step`."""
        R, T = self.orders.shape
        C = tokens.shape[1]
        i = (self.kept[:, None] + j + torch.arange(C, device=tokens.device)).clamp(max=T - 1)  # (R, C) order indices
        here, nxt = self.orders.gather(1, i), self.orders.gather(1, (i + 1).clamp(max=T - 1))
        x = self.model.embed_tokens(tokens, here, nxt)  # (R, C, D)
        Q = 0 if targets is None else targets.shape[1]
        if Q:
            x = torch.cat([x, self.model.embed_tokens(tokens[:, -1:].expand(R, Q), here[:, -1:].expand(R, Q), targets)], 1)
        slot = self.k_max + 2 + j
        if C == 1 and Q == 0:
            return self._forward(x, slot)[:, None]
        return self._pass(x, slot, C, Q, 1 + Q, chunked=False)

    def _pass(self, x: torch.Tensor, slot: int, chain: int, queries: int, outputs: int | None,
              chunked: bool) -> torch.Tensor:
        """x (R, N, D): a chain of `chain` rows at slots slot.. and `queries` query rows through every
        block and the head: logits (R, outputs or N, V). `chunked` (the prefill): in row chunks,
        each block's modulation computed on the spot; else from the adaLN window."""
        R, N, D = x.shape
        slots = torch.arange(slot, slot + N, device=x.device).clamp(max=slot + chain - 1)  # queries share the last
        rows = PassRows(slot, chain, queries, self.starts)
        if not chunked:
            mods = self._window_rows(slots)  # (a, b) -> (R, N, b - a)
            width = self.win_mods.shape[-1]
            return self._blocks(x, rows, outputs, lambda i: mods(i * 6 * D, (i + 1) * 6 * D),
                                lambda n: HeadModulation(*mods(width - 2 * D, width)[:, N - n:].chunk(2, dim=-1)), 0, R)
        cfg = self.model.config
        out = []
        for a, b in row_chunks(self.inverse, N, max(cfg.mlp_size, 6 * cfg.hidden_size)):
            out.append(self._blocks(x[a:b], rows.rows(a, b), outputs, *self._chunk_mods(a, b, slots), a, b))
        return torch.cat(out)

    def _chunk_mods(self, a: int, b: int, slots: torch.Tensor):
        """For rows a..b-1 at `slots` (N,): functions i -> block i's folded modulation (chunks
        (b - a, N, D)) and n -> the head's for the last n rows, each computed when asked for (a
        prefill's modulations of all blocks at once would not fit)."""
        N = slots.shape[0]
        keys, inverse = torch.unique(self.inverse[a:b], return_inverse=True)
        cond = self.cond[keys][:, slots]  # (Uc, N, D)
        if keys.numel() == 1:
            gather = lambda t: t.expand(b - a, *t.shape[1:])  # noqa: E731
        else:
            gather = lambda t: t.index_select(0, inverse)  # noqa: E731
        blocks, head = self.model.blocks, self.model.adaln_before_head

        def block_mod(i):
            m = blocks[i].fold(BlockModulation.split(blocks[i].adaLN_modulation[-1](cond)))  # chunks (Uc, N, D)
            return FoldedModulation(*(gather(c) for c in m))

        def head_mod(n):
            m = FinalLayer.fold(HeadModulation.split(head.adaLN_modulation[-1](cond[:, N - n:])))
            return HeadModulation(*(gather(c) for c in m))
        return block_mod, head_mod

    def _blocks(self, x, rows: PassRows, outputs, block_mod, head_mod, a: int, b: int) -> torch.Tensor:
        """Rows a..b-1 through the blocks (`block_mod(i)`: block i's modulation) and the head
        (`head_mod(n)`: the head's for the last n rows): logits (b - a, n, V)."""
        last = len(self.backend.blocks) - 1
        for i, blk in enumerate(self.backend.blocks):
            kv = self.cache.keys[i][a:b], self.cache.values[i][a:b]
            x = cached_step(blk, x, block_mod(i), kv, rows, self.attention, outputs=outputs if i == last else None)
        m = head_mod(x.shape[1])
        h = torch.addcmul(m.shift, F.layer_norm(x, (x.shape[-1],), eps=self.backend.head_eps), m.scale)
        return self.backend.head(h).float()  # (b - a, n, V)

    def step(self, tokens: torch.Tensor, j: int) -> torch.Tensor:
        """Feed generated token j of every row, tokens (R,): logits (R, V) predicting the next."""
        return self.extend(tokens.view(-1, 1), j)[:, 0]

    def _forward(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """x (R, 1, D) at `slot` through every block and the head: logits (R, V)."""
        mods = self._step_mods(slot)
        step = PassRows(slot, 1, 0, self.starts)
        for i, blk in enumerate(self.backend.blocks):
            x = cached_step(blk, x, mods[i][:, None], self.cache.layer(i), step, self.attention)
        a, c = mods[-1].chunk(2, dim=-1)  # the head's folded (1 + scale, shift)
        h = torch.addcmul(c, F.layer_norm(x[:, 0], (x.shape[-1],), eps=self.backend.head_eps), a)
        return self.backend.head(h).float()  # (R, V)
