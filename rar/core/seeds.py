"""Seeds: every random stream of the package comes from integers mixed here."""
from __future__ import annotations

import operator

import numpy as np
import torch


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers, e.g. (seed, step) in training or (seed, index) in
    sampling: each combination gets its own independent random stream."""
    values = []
    for p in parts:
        try:
            values.append(None if isinstance(p, bool) else operator.index(p))
        except TypeError:
            values.append(None)
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
    try:
        value = None if isinstance(seed, bool) else operator.index(seed)
    except TypeError:
        value = None
    if value is None or value < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")
    return value


def row_seeds(seed, batch_size: int) -> list[int]:
    """One seed per sample: a list (or tuple) of them as it is, or the single seed repeated."""
    return list(seed) if isinstance(seed, (list, tuple)) else [seed] * batch_size
