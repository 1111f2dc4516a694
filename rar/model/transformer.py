"""The RAR generator: a class-conditional causal transformer with adaLN blocks (Yu et al. 2024, Sec. 3).

Sequence layout (identical to the official model, so its checkpoints load unchanged):

    position   0      1         2            3                ...   T
    input      [cls]  [class]   tok[o[0]]    tok[o[1]]        ...   tok[o[T-2]]
    predicts   -      tok[o[0]] tok[o[1]]    tok[o[2]]        ...   tok[o[T-1]]

where `o` is the factorization order (`orders[b]`, raster when None). Every position p also
gets a *per-slot condition* `embed(class) + timestep[p]` that drives the adaLN modulation of
every block. The input at a position carries the ordinary positional embedding of its own
token and the *target-aware* positional embedding of the token it must predict (paper Sec. 3.3),
so a permuted order is unambiguous. The official model also feeds the last token tok[o[T-1]]
and drops its output; being causal, leaving it out changes nothing and saves a position.

Nothing about training or sampling is stored on the modules: the orders and the KV cache are
arguments, and `training` (dropout on/off) is the only mode, as in any torch module.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from ..core.files import save_folder
from ..core.names import upload_folder
from .config import Preset, RARConfig, Regularization, SamplingDefaults, generator_meta, get_preset, preset_for
from .causal_attention import causal_attention
from .gather import RowGather
from .modulated_norm import modulated_norm
from .qkv_heads import qkv_heads
from .dropout import (DropMasks, HashedMask, drop_scale, gated_residual, gelu_dropout, hash_kernel, keep_mask,
                      scale_mask)

PREFIX = 2  # [cls] and [class] come before the image tokens
NORM_EPS = 1e-6  # every LayerNorm of the model (blocks, qk-norm, head), as upstream


class BlockModulation(NamedTuple):
    """The six chunks of a block's adaLN output, in the official (DiT) order. The training forward
    and the sampler's folded adaLN both split by this definition."""
    shift_msa: torch.Tensor
    scale_msa: torch.Tensor
    gate_msa: torch.Tensor
    shift_mlp: torch.Tensor
    scale_mlp: torch.Tensor
    gate_mlp: torch.Tensor

    @classmethod
    def split(cls, t: torch.Tensor, dim: int = -1) -> "BlockModulation":
        return cls(*t.chunk(6, dim=dim))


class FoldedModulation(NamedTuple):
    """A block's modulation with its LayerNorm affine (w, b) folded in: per branch the modulated
    norm (x_hat w + b)(1 + scale) + shift is x_hat * a + c with a = w (1 + scale) and
    c = b (1 + scale) + shift, one fused op on the rows instead of four. The training forward folds
    per (class, position) before gathering to rows; the decoder folds the weights once
    (`rar.decode.fold_adaln`)."""
    a_msa: torch.Tensor
    c_msa: torch.Tensor
    gate_msa: torch.Tensor
    a_mlp: torch.Tensor
    c_mlp: torch.Tensor
    gate_mlp: torch.Tensor


class HeadModulation(NamedTuple):
    """The two chunks of the head's adaLN output; the official order is (scale, shift), the
    reverse of the blocks'."""
    scale: torch.Tensor
    shift: torch.Tensor

    @classmethod
    def split(cls, t: torch.Tensor, dim: int = -1) -> "HeadModulation":
        return cls(*t.chunk(2, dim=dim))


# What the training forward keeps for the backward pass (`recompute=`):
#   "attention"  everything but the dropped-out attention matrices, which are recomputed;
#   "selective"  only the outputs of the linear layers; norms, modulation, GELU, dropout and
#                attention are recomputed in the backward pass (a few % more time, half the memory);
#   "full"       only each block's input; the whole block is recomputed (~1/3 more compute).
RECOMPUTE_MODES = ("attention", "selective", "full")
_KEPT_OPS = {torch.ops.aten.addmm.default, torch.ops.aten.mm.default}  # nn.Linear on CPU and GPU


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_keep_matmuls)


def _rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for a (R, D) table and an integer index of any shape, by index_select: its
    backward sums repeated rows in a fixed order, where advanced indexing's (index_put_ with
    accumulate) adds them with atomics on CPU threads, so training was not bit-reproducible."""
    return table.index_select(0, index.reshape(-1)).view(*index.shape, table.shape[-1])


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def _attention_dropout(q, k, v, keep: torch.Tensor, p: float) -> torch.Tensor:
    """Causal attention with dropout on the probabilities (SDPA's math path, with the mask given):
    (B, H, N, Dh) -> (B, H, N, Dh)."""
    N = q.shape[-2]
    future = torch.ones(N, N, dtype=torch.bool, device=q.device).triu_(1)
    scores = (q @ k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5).masked_fill_(future, float("-inf"))  # (B, H, N, N)
    # Scale the (B, H, N, Dh) output rather than the (B, H, N, N) probabilities: same result, less work.
    return (torch.where(keep, scores.softmax(-1), 0.0) @ v).mul_(drop_scale(p))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_dropout: float, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dropout, self.dropout = attn_dropout, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=NORM_EPS)  # qk-norm
        self.k_norm = nn.LayerNorm(self.head_dim, eps=NORM_EPS)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor, kernel: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (qk-normed), keys (qk-normed) and values of x (B, N, D): each (B, H, N, Dh).
        `kernel`: rar's CPU training kernel where it applies (not inside a recomputed block)."""
        if kernel:
            return qkv_heads(x, self.qkv, self.q_norm, self.k_norm, self.num_heads)
        B, N, _ = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, Dh)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x: torch.Tensor, drop: DropMasks | None = None, recompute: bool = True) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.heads(x, kernel=recompute)  # each (B, H, N, Dh)
        if drop is None or drop.attn is None:
            # rar's CPU training kernel where this forward is not itself a recomputation (`recompute`)
            out = causal_attention(q, k, v) if recompute else \
                F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)  # (B, N, H, Dh)
        elif recompute:
            # Dropout needs the unfused path, which keeps four (B, H, N, N) matrices per block for the
            # backward pass; recomputing them there costs ~5% of the FLOPs and frees most of the memory.
            out = torch.utils.checkpoint.checkpoint(_attention_dropout, q, k, v, drop.attn, self.attn_dropout,
                                                    use_reentrant=False, preserve_rng_state=False).transpose(1, 2)
        else:  # the caller recomputes the whole block
            out = _attention_dropout(q, k, v, drop.attn, self.attn_dropout).transpose(1, 2)
        return self.proj(out.reshape(B, N, D))  # its dropout (drop.proj) is applied by the block


class Mlp(nn.Module):
    """timm's Mlp layout (fc1, act, fc2) so the official keys match."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.dropout = dropout
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as upstream
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, drop: DropMasks | None = None) -> torch.Tensor:
        # its output's dropout (drop.out) is applied by the block
        mask = None if drop is None else drop.hidden
        if isinstance(mask, HashedMask):  # the fused kernel adds fc1's bias: one pass less over (B, N, hidden)
            return self.fc2(gelu_dropout(F.linear(x, self.fc1.weight), mask, self.dropout, self.fc1.bias))
        return self.fc2(gelu_dropout(self.fc1(x), mask, self.dropout))


class Block(nn.Module):
    """Pre-norm transformer block with adaLN modulation (DiT); chunks as in `BlockModulation`."""

    def __init__(self, cfg: RARConfig, reg: Regularization):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=NORM_EPS)
        self.attn = Attention(d, cfg.num_heads, reg.attn_dropout, reg.dropout)
        self.norm2 = nn.LayerNorm(d, eps=NORM_EPS)
        self.mlp = Mlp(d, cfg.mlp_size, reg.dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def dropout_masks(self, B: int, N: int, device, as_scales: bool = False) -> DropMasks | None:
        """Fresh masks for a training forward of (B, N) positions; None when nothing drops. With
        `as_scales` (the mode that keeps every activation anyway) the residual and MLP masks are
        `HashedMask` keys on CPU, which fused kernels draw from, else float multipliers (4 bytes
        each instead of 1, one pass instead of two)."""
        draw = scale_mask if as_scales else keep_mask
        D, M, p = self.mlp.fc2.out_features, self.mlp.fc1.out_features, self.mlp.dropout
        attn = keep_mask((B, self.attn.num_heads, N, N), self.attn.attn_dropout, device)
        # On CPU, where nothing is recomputed, the other masks stay keys that fused kernels draw from.
        keys = as_scales and torch.device(device).type == "cpu" and hash_kernel() is not None
        masks = DropMasks(attn, *(HashedMask.draw(p) if keys else draw(shape, p, device)
                                  for shape in ((B, N, D), (B, N, M), (B, N, D))))
        return None if all(m is None for m in masks) else masks

    def fold(self, m: BlockModulation) -> FoldedModulation:
        """The modulation `m` with this block's LayerNorm affines folded in (any leading shape)."""
        s_msa, s_mlp = 1 + m.scale_msa, 1 + m.scale_mlp
        return FoldedModulation(self.norm1.weight * s_msa, torch.addcmul(m.shift_msa, self.norm1.bias, s_msa),
                                m.gate_msa, self.norm2.weight * s_mlp, torch.addcmul(m.shift_mlp, self.norm2.bias, s_mlp),
                                m.gate_mlp)

    def forward(self, x: torch.Tensor, mod: torch.Tensor | FoldedModulation, drop: DropMasks | None = None,
                recompute_attention: bool = True) -> torch.Tensor:
        # x (B, N, D); mod (B, N, 6D) = adaLN_modulation(per-slot condition), or already folded
        m = mod if isinstance(mod, FoldedModulation) else self.fold(BlockModulation.split(mod))
        # modulated norm1(x), c + a * LayerNorm(x); rar's CPU kernel where this is not a recomputation
        h = modulated_norm(x, m.a_msa, m.c_msa, NORM_EPS, kernel=recompute_attention)
        proj, out = (None, None) if drop is None else (drop.proj, drop.out)
        x = gated_residual(x, m.gate_msa, self.attn(h, drop, recompute_attention), proj, self.attn.dropout)
        h = modulated_norm(x, m.a_mlp, m.c_mlp, NORM_EPS, kernel=recompute_attention)  # modulated norm2(x)
        return gated_residual(x, m.gate_mlp, self.mlp(h, drop), out, self.mlp.dropout)


class FinalLayer(nn.Module):
    """adaLN before the head; chunks as in `HeadModulation`."""

    def __init__(self, d: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(d, eps=NORM_EPS, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    @staticmethod
    def fold(m: HeadModulation) -> HeadModulation:
        """(1 + scale, shift): the head's modulation as the multiplier and offset of the norm."""
        return HeadModulation(1 + m.scale, m.shift)

    def forward(self, x: torch.Tensor, mod: torch.Tensor | HeadModulation) -> torch.Tensor:
        # mod (B, N, 2D) = adaLN_modulation(condition), or a folded HeadModulation (1 + scale, shift)
        m = mod if isinstance(mod, HeadModulation) else self.fold(HeadModulation.split(mod))
        return modulated_norm(x, m.scale, m.shift, NORM_EPS)  # norm_final(x) * (1 + scale) + shift


class RAR(nn.Module):
    """`config` fixes the architecture; `regularization` (training dropout) and `sampling` (the
    defaults of `rar.generate`) are those of the preset with this architecture when not given,
    else the dataclasses' defaults. Both are read-only descriptions, not modes."""

    def __init__(self, config: RARConfig, regularization: Regularization | None = None,
                 sampling: SamplingDefaults | None = None):
        super().__init__()
        preset = preset_for(config) or Preset(config)
        self.config = cfg = config
        self.regularization = regularization or preset.regularization
        self.sampling = sampling or preset.sampling
        d, T, V, C = cfg.hidden_size, cfg.num_tokens, cfg.codebook_size, cfg.num_classes
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        # Rows 0, 1: [cls], [class]; row 2 + i: image token at raster index i.
        self.pos_embed = nn.Parameter(torch.zeros(1, T + PREFIX, d))
        # Row i: "the next token to predict sits at raster index i" (official rows 2..T+1).
        self.target_aware_pos_embed = nn.Parameter(torch.zeros(1, T, d))
        # One per position 0..T: makes the adaLN condition slot-dependent.
        self.timesteps_embeddings = nn.Parameter(torch.zeros(1, T + 1, d))
        self.blocks = nn.ModuleList(Block(cfg, self.regularization) for _ in range(cfg.num_layers))
        # Token space of the official model: [0, V) image codes, V the (unused) mask token,
        # V + 1 + c the class c in [0, C), V + 1 + C the "no class" label.
        self.embeddings = nn.Embedding(V + 1 + C + 1, d)
        self.adaln_before_head = FinalLayer(d)
        self.lm_head = nn.Linear(d, V)
        self.reset_parameters()

    @classmethod
    def from_preset(cls, name: str, **sizes) -> "RAR":
        """A fresh model of preset `name`, some sizes changed by `sizes` (e.g. num_classes=100), with
        the preset's dropouts and sampling defaults (a bare `RAR(config)` finds them only when the
        config is exactly a preset's)."""
        preset = get_preset(name)
        return cls(preset.config.replace(**sizes), preset.regularization, preset.sampling)

    def save_pretrained(self, directory):
        """config.json + model.safetensors in `directory` (`rar.from_pretrained` loads it)."""
        return save_folder(self, directory, generator_meta(self.config, self.regularization, self.sampling))

    def push_to_hub(self, repo_id: str, *, private: bool = False, token=None) -> str:
        """Upload as config.json + model.safetensors; `rar.from_pretrained("hf://" + repo_id)` loads it."""
        return upload_folder(self.save_pretrained, repo_id, private=private, token=token)

    def reset_parameters(self) -> None:
        """The official init: truncated normal(0.02) for linear/embedding weights and position
        tables, zero biases, unit LayerNorms, zero [cls], and adaLN-zero for every modulation."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.pos_embed, self.target_aware_pos_embed, self.timesteps_embeddings):
            nn.init.trunc_normal_(p, std=0.02)
        nn.init.zeros_(self.cls_token)
        for lin in [b.adaLN_modulation[-1] for b in self.blocks] + [self.adaln_before_head.adaLN_modulation[-1]]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # ---- pieces shared by the training forward and the sampler -------------------------------
    def condition(self, labels: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Per-slot adaLN condition for positions start..stop-1: (B,) labels -> (B, S, D)."""
        stop = self.config.num_tokens + 1 if stop is None else stop
        c = self.embeddings(labels + self.config.codebook_size + 1)  # (B, D)
        return c[:, None] + self.timesteps_embeddings[:, start:stop]  # (B, S, D)

    def modulations(self, c: torch.Tensor) -> list[torch.Tensor]:
        """adaLN outputs for every block and the head: [(B, S, 6D)] * layers + [(B, S, 2D)].
        They depend only on (class, position), so the sampler computes them ahead of time."""
        return [b.adaLN_modulation(c) for b in self.blocks] + [self.adaln_before_head.adaLN_modulation(c)]

    def embed_tokens(self, tokens: torch.Tensor, raster_index: torch.Tensor,
                     next_index: torch.Tensor | None) -> torch.Tensor:
        """Inputs at image positions: token embedding + position of this token + target-aware
        position of the token predicted next. tokens/raster_index/next_index (B, N) -> (B, N, D)."""
        x = self.embeddings(tokens) + _rows(self.pos_embed[0, PREFIX:], raster_index)  # (B, N, D)
        if next_index is not None:
            x = x + _rows(self.target_aware_pos_embed[0], next_index)
        return x

    def embed_prefix(self, labels: torch.Tensor, first_index: torch.Tensor) -> torch.Tensor:
        """Positions 0 ([cls]) and 1 ([class], which predicts the first token): (B,) -> (B, 2, D)."""
        B = labels.shape[0]
        cls = self.cls_token.expand(B, -1, -1) + self.pos_embed[:, :1]  # (B, 1, D)
        return torch.cat([cls, self.embed_class(labels, first_index[:, None])], dim=1)

    def embed_class(self, labels: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
        """The [class] input at position 1 with the target-aware position of each token it is asked
        for: labels (B,), target_index (B, N) -> (B, N, D) (N > 1: the queries of parallel decoding)."""
        cond = self.embeddings(labels + self.config.codebook_size + 1)[:, None] + self.pos_embed[:, 1:2]  # (B, 1, D)
        return cond + _rows(self.target_aware_pos_embed[0], target_index)  # (B, N, D)

    def forward_hidden(self, x: torch.Tensor, mods: list, recompute: str = "selective") -> torch.Tensor:
        """Run the blocks and the final adaLN on a whole (causal) sequence: (B, N, D) -> (B, N, D).
        `recompute` (one of RECOMPUTE_MODES) chooses what the backward pass recomputes."""
        if recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}.")
        whole_block = recompute != "attention" and self.training and torch.is_grad_enabled()
        contexts = _selective_contexts if recompute == "selective" else torch.utils.checkpoint.noop_context_fn
        B, N = x.shape[:2]
        for i, blk in enumerate(self.blocks):
            drop = blk.dropout_masks(B, N, x.device, as_scales=not whole_block) if self.training else None
            if whole_block:  # the block's own recomputation covers the attention
                x = torch.utils.checkpoint.checkpoint(blk, x, mods[i], drop, False, use_reentrant=False,
                                                      context_fn=contexts, preserve_rng_state=False)
            else:
                x = blk(x, mods[i], drop)
        return self.adaln_before_head(x, mods[-1])

    # ---- the training / scoring forward -------------------------------------------------------
    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, orders: torch.Tensor | None = None,
                recompute: str = "selective") -> torch.Tensor:
        """tokens (B, T) in [0, V); labels (B,) in [0, C] (C = no class); orders (B, T) permutations
        or None for raster. Returns logits (B, T, V); logits[b, j] predicts tokens[b, orders[b, j]]
        from the class and tokens[b, orders[b, :j]]. `recompute` (see RECOMPUTE_MODES) chooses which
        activations the backward pass recomputes instead of keeping; it does not change the result."""
        B, T = tokens.shape
        if T != self.config.num_tokens:
            raise ValueError(f"tokens must have {self.config.num_tokens} columns (the model's num_tokens), got {T}.")
        if orders is None:
            orders = torch.arange(T, device=tokens.device).expand(B, T)
        seq = tokens.gather(1, orders)  # (B, T) tokens in factorization order
        x = torch.cat([self.embed_prefix(labels, orders[:, 0]),
                       self.embed_tokens(seq[:, :-1], orders[:, :-1], orders[:, 1:])], dim=1)  # (B, T+1, D)
        # The adaLN input depends only on (class, position): compute it once per distinct class in
        # the batch (a third of the FLOPs when few classes repeat, e.g. 10 digits).
        # The LayerNorm affines are folded in there too (`FoldedModulation`), and each chunk is read
        # per sequence as a `RowGather`: the fused CPU kernels read the (U, T+1, D) table itself
        # and sum their gradients into it; other paths gather it to (B, T+1, D).
        # Without repeats the blocks fold their own rows' modulation (inside any recomputation).
        distinct, inverse = labels.unique(return_inverse=True)  # (U,), (B,)
        if len(distinct) < len(labels):
            mods = self.modulations(self.condition(distinct))  # (U, T+1, 6D), ..., (U, T+1, 2D)
            mods = [blk.fold(BlockModulation.split(m)) for blk, m in zip(self.blocks, mods)] + \
                [FinalLayer.fold(HeadModulation.split(mods[-1]))]
            mods = [type(m)(*(RowGather(c, inverse) for c in m)) for m in mods]  # chunks (B, T+1, D), lazily
        else:
            mods = self.modulations(self.condition(labels))  # (B, T+1, 6D), ..., (B, T+1, 2D)
        h = self.forward_hidden(x, mods, recompute=recompute)  # (B, T+1, D)
        return self.lm_head(h[:, 1:])  # (B, T, V): drop the [cls] position
