"""Helpers shared by several stages: independent seeds from integers, device names, count checks and the
learning-rate schedule of both trainers."""
from __future__ import annotations

import math

import numpy as np
import torch


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers, e.g. (seed, step) in training or (seed, index) in
    sampling: each combination gets its own independent random stream."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def resolve_device(name: str | None = "auto") -> torch.device:
    """"auto" (or None) is this process's current GPU when there is one, else the CPU; "cuda" is the
    current GPU (torchrun's LOCAL_RANK, set by the CLI); anything else must be a device torch knows."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but torch sees no CUDA GPU; use device=cpu.")
        return torch.device("cuda", torch.cuda.current_device())
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device {name!r} is not a device torch knows (expected auto, cpu, cuda or cuda:N).") from err


def check_counts(**counts) -> None:
    """Each keyword must be a positive integer (numbers of samples, batch sizes, ...): a ValueError
    naming the first that is not."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def warmup_cosine(step: int, peak: float, end: float, warmup: int, total: int) -> float:
    """Learning rate at `step` (0-based): linear warmup to `peak` over `warmup` steps, then cosine
    decay to `end` at `total` steps (both trainers' schedule)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))
