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

import torch
import torch.nn.functional as F

from ..model.config import RARConfig
from ..model.transformer import Block, BlockModulation, modulate
from .backend import DecodeBackend, decode_block, single_query_attention
from .cpu import attention_kernel

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
        self.keys = torch.empty(shape, device=device, dtype=dtype)  # (layers, B, H, S, Dh)
        self.values = torch.empty(shape, device=device, dtype=dtype)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[i], self.values[i]


def prefill_block(blk: Block, x: torch.Tensor, mod: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                  mask: torch.Tensor | None, last_only: bool = False) -> torch.Tensor:
    """`Block.forward` on slots 0..N-1 of every row at once, writing their keys and values into the
    cache: x (R, N, D), mod (R or 1, N, 6D) as `BlockModulation`; mask (R, 1, N, N) True = may
    attend, or None for plain causal attention. `last_only` returns the last slot only (R, 1, D):
    after the last block only its keys and values of the other slots are needed."""
    R, N, D = x.shape
    m = BlockModulation.split(mod)
    q, k, v = blk.attn.heads(modulate(blk.norm1(x), m.shift_msa, m.scale_msa))  # (R, H, N, Dh) each
    kv[0][:, :, :N] = k
    kv[1][:, :, :N] = v
    if last_only:
        q, x, m = q[:, :, -1:], x[:, -1:], BlockModulation(*(t[:, -1:] for t in m))
        mask = torch.ones(1, 1, 1, N, dtype=torch.bool, device=x.device) if mask is None else mask[:, :, -1:]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # (R, H, N, Dh)
    x = x + m.gate_msa * blk.attn.proj(out.transpose(1, 2).reshape(R, x.shape[1], D))
    return x + m.gate_mlp * blk.mlp(modulate(blk.norm2(x), m.shift_mlp, m.scale_mlp))


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

    def prefill(self, tokens: torch.Tensor | None = None, all_logits: bool = False) -> torch.Tensor:
        """Feed [cls], [class] and each row's known tokens (from tokens (R, T), raster layout): the
        logits (R, V) predicting each row's first unknown token, or with `all_logits` those of every
        slot (R, K_max + 2, V) (slot s of row r is its position s - offsets[r]; slot 0 is [cls])."""
        R, T = self.orders.shape
        if self.k_max == 0:  # one position at a time (causal, so the same as both at once)
            x = self.model.embed_prefix(self.rows, self.orders[:, 0])  # (R, 2, D)
            out = [self._forward(x[:, :1], 0), self._forward(x[:, 1:], 1)]
            return torch.stack(out, dim=1) if all_logits else out[1]
        if tokens is None or tokens.shape != (R, T):
            raise ValueError(f"prefill needs the known tokens as an (R, T) = ({R}, {T}) tensor.")
        N, K = self.k_max + 2, self.k_max
        seq = tokens.gather(1, self.orders[:, :K]).clamp(0, self.model.config.codebook_size - 1)  # (R, K)
        x = torch.cat([self.model.embed_prefix(self.rows, self.orders[:, 0]),
                       self.model.embed_tokens(seq, self.orders[:, :K], self.orders[:, 1:K + 1])], dim=1)  # (R, N, D)
        slot = torch.arange(N, device=x.device)
        pos = (slot - self.offsets[:, None]).clamp(min=0)  # (R, N): each row's position at each slot
        x = x.gather(1, pos[..., None].expand(-1, -1, x.shape[-1]))  # (R, N, D) in slot layout
        mask = None
        if self.starts is not None:  # causal, own slots only (a padding slot sees itself: no empty rows)
            own = slot[None, :] >= self.offsets[:, None]  # (R, N) keys
            mask = (slot[None, :, None] >= slot[None, None, :]) & (own[:, None, :] | torch.eye(N, dtype=torch.bool,
                                                                                                device=x.device))
            mask = mask[:, None]  # (R, 1, N, N)
        cfg = self.model.config
        chunks = row_chunks(self.inverse, N, max(cfg.mlp_size, 6 * cfg.hidden_size))
        out = [self._prefill_rows(x[a:b], None if mask is None else mask[a:b], a, b, all_logits) for a, b in chunks]
        logits = torch.cat(out)  # (R, N or 1, V)
        return logits if all_logits else logits[:, 0]

    def _prefill_rows(self, x: torch.Tensor, mask: torch.Tensor | None, a: int, b: int, all_logits: bool):
        """Rows a..b-1 of the prefill through every block and the head: logits (b - a, N or 1, V)."""
        N = x.shape[1]
        keys, inverse = torch.unique(self.inverse[a:b], return_inverse=True)
        cond = self.cond[keys, :N]  # (Uc, N, D)
        # (Uc, ...) -> (b - a, ...): a view when the rows share one condition or are the keys in order
        if keys.numel() == 1:
            rows = lambda t: t.expand(b - a, *t.shape[1:])  # noqa: E731
        elif torch.equal(inverse, torch.arange(b - a, device=inverse.device)):
            rows = lambda t: t  # noqa: E731
        else:
            rows = lambda t: t.index_select(0, inverse)  # noqa: E731
        last = len(self.model.blocks) - 1
        for i, blk in enumerate(self.model.blocks):
            kv = self.cache.keys[i][a:b], self.cache.values[i][a:b]
            x = prefill_block(blk, x, rows(blk.adaLN_modulation[-1](cond)), kv, mask, last_only=i == last and not all_logits)
        head = self.model.adaln_before_head
        h = head(x, rows(head.adaLN_modulation[-1](cond[:, N - x.shape[1]:])))
        return self.model.lm_head(h).float()  # (b - a, N or 1, V)

    def step(self, tokens: torch.Tensor, j: int) -> torch.Tensor:
        """Feed generated token j of every row, tokens (R,): logits (R, V) predicting the next."""
        R, T = self.orders.shape
        i = (self.kept + j).clamp(max=T - 1)[:, None]  # (R, 1) index in each row's order
        here = self.orders.gather(1, i)
        nxt = self.orders.gather(1, (i + 1).clamp(max=T - 1))
        return self._forward(self.model.embed_tokens(tokens.view(R, 1), here, nxt), self.k_max + 2 + j)

    def _forward(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """x (R, 1, D) at `slot` through every block and the head: logits (R, V)."""
        mods = self._step_mods(slot)
        x = x[:, 0]  # (R, D)
        for i, blk in enumerate(self.backend.blocks):
            x = decode_block(blk, x, mods[i], self.cache.layer(i), slot, self.attention, self.starts)
        a, c = mods[-1].chunk(2, dim=-1)  # the head's folded (1 + scale, shift)
        h = torch.addcmul(c, F.layer_norm(x, (x.shape[-1],), eps=self.backend.head_eps), a)
        return self.backend.head(h).float()  # (R, V)
