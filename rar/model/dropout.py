"""Dropout for the training forward, with its masks drawn before a block runs so that a
recomputation in the backward pass (`recompute=`) reuses them instead of replaying the RNG.
Probabilities are rounded to multiples of 1/65536 and drawn as 16-bit integers: cheaper than
`bernoulli_` on CPU."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class DropMasks(NamedTuple):
    """One block's dropout masks, drawn before the block runs: recomputing the block in the
    backward pass (`recompute=`) reuses them instead of replaying the RNG. The attention mask is a
    keep-mask (True = keep); the others are keep-masks too, or, where memory is not the concern,
    multipliers (`scale_mask`: 0 or 1 / (1 - p)), which apply in one pass each way."""
    attn: torch.Tensor | None  # (B, H, N, N) attention probabilities, bool
    proj: torch.Tensor | None  # (B, N, D) attention output
    hidden: torch.Tensor | None  # (B, N, M) MLP hidden layer
    out: torch.Tensor | None  # (B, N, D) MLP output


_LEVELS = 2**16  # dropout probabilities are rounded to multiples of 1/65536


def _drop_level(p: float) -> int:
    return round(p * _LEVELS)  # P(drop) = level / 65536


def _uniform16(shape, device=None) -> torch.Tensor:
    """Uniform int16 values of `shape` from the global RNG, drawn as full-range int64 words split in
    four: the generator runs a quarter as often as for int16 draws (it is serial on CPU)."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None)
    return words.view(torch.int16)[:n].view(shape)


def keep_mask(shape, p: float, device=None) -> torch.Tensor | None:
    """Bernoulli keep-mask with P(drop) = p rounded to 1/65536, from 16-bit uniform integers
    (cheaper than `bernoulli_` on CPU)."""
    t = _drop_level(p)
    if t == 0:
        return None
    return _uniform16(shape, device) >= t - _LEVELS // 2


def scale_mask(shape, p: float, device=None, dtype=torch.float32) -> torch.Tensor | None:
    """`keep_mask`'s draws as inverted-dropout multipliers: 0 where dropped, `drop_scale(p)` where
    kept. `x * scale_mask` is inverted dropout in one pass forward and one backward."""
    keep = keep_mask(shape, p, device)
    if keep is None:
        return None
    return torch.where(keep, torch.tensor(drop_scale(p), dtype=dtype, device=device),
                       torch.tensor(0.0, dtype=dtype, device=device))


def drop_scale(p: float) -> float:
    """1 / (1 - p) for p rounded as in `keep_mask`: kept values are scaled so the mean is unchanged."""
    return _LEVELS / (_LEVELS - _drop_level(p))


def dropout(x: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """Inverted dropout with a given keep-mask (None: identity)."""
    return x if keep is None else torch.where(keep, x, 0.0).mul_(drop_scale(p))


def apply_mask(x: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
    """Inverted dropout with a keep-mask (bool) or a `scale_mask` (float); None: identity. x keeps
    its dtype (bf16 under autocast)."""
    if mask is None:
        return x
    return dropout(x, mask, p) if mask.dtype == torch.bool else (x * mask).to(x.dtype)
