"""Refinement by resampling with full context (the paper's open problem, Sec. 5: a token
generated early never sees the tokens generated after it).

Each round picks a `fraction` of each image's positions and resamples them given all the other
tokens: the others are prefilled, then the picked ones decoded, as in editing
(`rar.edit`, kept-first). `select="random"` picks uniformly;
`select="likelihood"` picks the tokens the model finds least likely given their context.

The likelihood estimate costs `groups` forward passes per round (2 by default), not one per
position: each image's positions are split at random into `groups` equal parts; in pass p the
positions of part p come last in an otherwise random order, so each of its tokens is scored by
log p(x_i | the tokens before it), which include every other part: at least (groups - 1) /
groups of the other tokens, 3/4 of them on average with 2 groups. A token whose score is low
even with most of the image in view is one the rest of the image disagrees with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..core.checks import check_indices, check_labels, check_tokens
from ..core.seeds import mix_seed
from ..decode.backend import DecodeBackend
from ..model.transformer import RAR
from .editing import edit
from .likelihood import order_nll
from .sampler import SamplingSettings, as_backend, with_overrides

SELECT = ("likelihood", "random")


@dataclass(frozen=True)
class RefineSettings:
    """What `refine` does after sampling; rounds = 0 is no refinement."""
    rounds: int = 0
    fraction: float = 0.1
    select: str = "likelihood"
    groups: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.rounds, bool) or int(self.rounds) != self.rounds or self.rounds < 0:
            raise ValueError(f"refine rounds must be a non-negative integer, got {self.rounds!r}.")
        if not 0.0 <= float(self.fraction) <= 1.0:  # also rejects NaN
            raise ValueError(f"refine fraction must be in [0, 1], got {self.fraction!r}.")
        if self.select not in SELECT:
            raise ValueError(f"refine select must be one of {SELECT}, got {self.select!r}.")
        if isinstance(self.groups, bool) or int(self.groups) != self.groups or self.groups < 2:
            raise ValueError(f"refine groups must be an integer >= 2, got {self.groups!r}.")

    @property
    def active(self) -> bool:
        return self.rounds > 0 and self.fraction > 0


def _generators(seed: int, indices: list[int], round_: int, stream: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(mix_seed(seed, i, round_, stream)) for i in indices]


def context_scores(model: RAR, tokens: torch.Tensor, labels: torch.Tensor, generators: list[torch.Generator],
                   groups: int = 2) -> torch.Tensor:
    """(B, T) log p(x_i | most of the other tokens) in `groups` forward passes (module docstring);
    image b's random partition and orders come from generators[b]."""
    B, T = tokens.shape
    orders = []
    for g in generators:
        perm = torch.randperm(T, generator=g)  # a random partition into `groups` parts of the positions
        parts = perm.tensor_split(groups)
        for p in range(groups):
            rest = torch.cat([parts[q] for q in range(groups) if q != p])
            orders.append(torch.cat([rest[torch.randperm(rest.numel(), generator=g)], parts[p]]))
    orders = torch.stack(orders).view(B, groups, T).to(tokens.device)  # (B, P, T)
    logp = order_nll(model, tokens, labels, orders)  # (B, P, T) in order space
    scores = torch.empty(B, T, device=tokens.device)
    sizes = [part.numel() for part in torch.arange(T).tensor_split(groups)]  # as the partitions above
    for p in range(groups):
        start = T - sizes[p]  # the tail of pass p holds part p's tokens, each scored with the rest in view
        scores.scatter_(1, orders[:, p, start:], logp[:, p, start:])
    return scores


def iter_refine(model: RAR | DecodeBackend, tokens, labels, settings: RefineSettings, *, seed: int = 0,
                indices=None, sampling: SamplingSettings | None = None) -> Iterator[torch.Tensor]:
    """The tokens after each round of `refine` (see the module docstring)."""
    backend = as_backend(model)
    tokens = torch.as_tensor(tokens, device=backend.device).long()
    labels = check_labels(labels, backend.config.num_classes, backend.device)
    B, T = tokens.shape
    indices = check_indices(indices, B)
    n = round(settings.fraction * T)
    for r in range(settings.rounds):
        if n == 0:
            yield tokens
            continue
        if settings.select == "random":
            scores = torch.stack([torch.rand(T, generator=g) for g in _generators(seed, indices, r, 1)]).to(tokens.device)
        else:
            scores = context_scores(backend.model, tokens, labels, _generators(seed, indices, r, 1), settings.groups)
        picked = scores.argsort(dim=1, stable=True)[:, :n]  # (B, n): the least likely (or random) positions
        keep = torch.ones_like(tokens, dtype=torch.bool).scatter_(1, picked, False)
        tokens = edit(backend, tokens, keep, labels, settings=sampling, seed=mix_seed(seed, r, 2), indices=indices)
        yield tokens


def apply_refine(backend: DecodeBackend, tokens: torch.Tensor, labels, settings: RefineSettings | None, *,
                 seed: int, indices, sampling: SamplingSettings | None = None) -> torch.Tensor:
    """`refine` with `settings` (the input when there are none or they do nothing), for samplers."""
    if settings is None or not settings.active:
        return tokens
    out = tokens
    for out in iter_refine(backend, tokens, labels, settings, seed=seed, indices=indices, sampling=sampling):
        pass
    return out


def refine(model: RAR | DecodeBackend, tokens, labels, *, rounds: int = 1, fraction: float = 0.1,
           select: str = "likelihood", groups: int = 2, settings: SamplingSettings | None = None, seed: int = 0,
           indices=None, guidance_scale: float | None = None, guidance_scale_pow: float | None = None,
           temperature: float | None = None, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Resample a `fraction` of each image's tokens given all the others, `rounds` times:
    tokens (B, T) raster layout, labels (B,) -> (B, T). `settings` and the loose sampling keywords
    as in `rar.generate`; a sample's result depends only on (seed, index). fraction = 0 or
    rounds = 0 returns the input."""
    backend = as_backend(model)
    out = check_tokens(tokens, backend.config, backend.device)
    labels = check_labels(labels, backend.config.num_classes, backend.device, out.shape[0])  # one per row
    sampling = with_overrides(settings, guidance_scale, guidance_scale_pow, temperature, top_k, top_p)
    for out in iter_refine(backend, out, labels, RefineSettings(rounds, fraction, select, groups), seed=seed,
                           indices=indices, sampling=sampling):
        pass
    return out
