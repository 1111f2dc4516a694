"""Token data for training: the token shards written by `rar tokenize`, or a deterministic synthetic
set for smoke tests, and the seeded global batch schedule shared by every rank.

The batch schedule is a pure function of (seed, step): epoch e visits the samples in the order
`randperm(N)` seeded by (seed, e); the global batch of step s is positions [s*G, (s+1)*G) of that
endless stream; rank r of W takes the r-th contiguous slice. So the samples a step sees do not
depend on the number of processes, and resuming at step s needs nothing but s.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.seeds import mix_seed
from .shards import TokenShards


@dataclass
class TokenData:
    tokens: np.ndarray  # (N, views, T) integer codes; views = 1, or 2 with a flipped copy
    labels: np.ndarray  # (N,) int64 class ids
    num_classes: int
    codebook_size: int
    class_names: list[str] | None = None
    tokenizer: str | None = None  # path of the tokenizer that made the tokens, if known

    def __len__(self) -> int:
        return self.tokens.shape[0]


def synthetic_tokens(num_samples: int = 2048, num_tokens: int = 64, codebook_size: int = 64,
                     num_classes: int = 10, noise: float = 0.25, seed: int = 0) -> TokenData:
    """Each class has a fixed random token grid (its "template"); a sample is its class template
    with a fraction `noise` of tokens replaced at random. Learnable in minutes, and the loss floor
    is known: a perfect model pays only for the noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randint(0, codebook_size, (num_classes, num_tokens), generator=g)  # (C, T)
    labels = torch.arange(num_samples) % num_classes  # (N,)
    tokens = templates[labels].clone()  # (N, T)
    replace = torch.rand(num_samples, num_tokens, generator=g) < noise
    tokens[replace] = torch.randint(0, codebook_size, (int(replace.sum()),), generator=g)
    return TokenData(tokens.numpy().astype(np.uint16)[:, None], labels.numpy().astype(np.int64),
                     num_classes, codebook_size, [f"class_{c}" for c in range(num_classes)])


def load_token_shards(path: str) -> TokenData:
    """Read a folder written by `rar tokenize` (memory-mapped; nothing is parsed)."""
    shards = TokenShards(path)
    m = shards.manifest
    return TokenData(shards.tokens, np.asarray(shards.labels, dtype=np.int64), len(shards.class_names),
                     int(m["codebook_size"]), list(shards.class_names), m.get("tokenizer_path"))


def global_batch_indices(step: int, global_batch: int, num_samples: int, seed: int) -> np.ndarray:
    """Sample indices of the global batch of `step` (see the module docstring)."""
    start, out = step * global_batch, []
    while len(out) < global_batch:
        epoch, offset = divmod(start, num_samples)
        perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
        take = perm[offset:offset + global_batch - len(out)].tolist()
        out += take
        start += len(take)
    return np.asarray(out, dtype=np.int64)


def gather_batch(data: TokenData, indices: np.ndarray, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, T) int64 of the chosen view of each sample, labels (B,) int64."""
    order = np.argsort(indices, kind="stable")  # sorted reads are kinder to a memory map
    rows = np.asarray(data.tokens[indices[order]])  # (B, views, T)
    rows = rows[np.argsort(order, kind="stable")]
    v = views.numpy() % rows.shape[1]
    tokens = torch.from_numpy(rows[np.arange(len(indices)), v].astype(np.int64))  # (B, T)
    return tokens, torch.from_numpy(data.labels[indices])
