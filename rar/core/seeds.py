"""Seeds: every random stream of the package comes from integers mixed here."""
from __future__ import annotations

import numpy as np
import torch


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers, e.g. (seed, step) in training or (seed, index) in
    sampling: each combination gets its own independent random stream."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def resolve_seed(seed: int | None, generator: torch.Generator | None) -> int:
    """`seed` itself, or one integer drawn from `generator` (torch's default one when None)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item()) if seed is None else int(seed)
