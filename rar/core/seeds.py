"""Seeds: every random stream of the package comes from integers mixed here."""
from __future__ import annotations

import operator

import numpy as np
import torch


def whole_number(value) -> int | None:
    """`value` as an int when it is an integer (Python, numpy or a 0-d integer tensor, not a bool),
    else None: a float or a bool is refused by the callers, never truncated."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers, e.g. (seed, step) in training or (seed, index) in
    sampling: each combination gets its own independent random stream."""
    values = [whole_number(p) for p in parts]
    if any(v is None or v < 0 for v in values):
        raise ValueError(f"seeds and sample indices must be integers >= 0, got {', '.join(map(repr, parts))}.")
    return int(np.random.SeedSequence(values).generate_state(1, np.uint64)[0] >> 1)


def resolve_seed(seed: int | None, generator: torch.Generator | None) -> int:
    """`seed` itself (an integer >= 0; a float or a bool is refused, not truncated), or one integer
    drawn from `generator` (torch's default one when None)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator (or None), got {type(generator).__name__}.")
    if seed is None:
        return int(torch.randint(0, 2**62, (1,), generator=generator).item())
    value = whole_number(seed)
    if value is None or value < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")
    return value


def row_seeds(seed, batch_size: int) -> list[int]:
    """One seed per sample: a list (or tuple) of them as it is, or the single seed repeated."""
    return list(seed) if isinstance(seed, (list, tuple)) else [seed] * batch_size
