"""The learning-rate schedule shared by the RAR trainer and the tokenizer trainer."""
from __future__ import annotations

import math


def warmup_cosine(step: int, peak: float, end: float, warmup: int, total: int) -> float:
    """Learning rate at `step` (0-based): linear warmup to `peak` over `warmup` steps, then cosine
    decay to `end` at `total` steps (both trainers' schedule)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))
