"""Parallel decoding: several tokens per network pass, through target-aware queries.

A RAR row carries the target-aware position of the token it predicts (paper Sec. 3.3), so a row
made of the last committed token plus the target embedding of any position p asks for p: the
training row at that place asked for exactly that whenever the (random) training order put p
next. `steps=S` cuts the generation order into S groups; each network pass
- commits the previous group into the KV cache as a chain in the order (each token with the
  target-aware position of the token after it, as in training), and
- asks for every position of the next group at once: the chain's last row asks for the first one,
  and one query row per other position takes that last row's place (same input token, same slot,
  its own target); queries see the cache and the chain, never each other, and are not cached.
So S = T is ordinary decoding, and the first pass is the prefix [cls], [class] (plus the known
tokens when editing) with the first group's queries.

Group sizes (`group_sizes`) follow a schedule over the fraction r = s / S of passes done:
`cosine` (RandAR, MaskGIT: tokens done 1 - cos(pi r / 2)), `arccos` (ARPG: 1 - 2 arccos(r) / pi
remaining), `linear` (group size growing linearly in the pass: done r^2), `constant` (equal
groups: done r); first groups small, every group >= 1. The `wavefront` order comes with its
own groups: position (row, col) is due at pass col + round(lag * row), the lag chosen so that the
grid takes S passes (lag 1: anti-diagonals; lag = grid width: raster). Each pass then predicts
positions whose raster neighbours above and to the left are known, which suits models annealed
to raster order (ZipAR's next-row-with-a-window is this family).

Guidance: the power-cosine scale of a group is that of its first token, i.e. the schedule counts
the tokens done before the pass (with S = T, today's per-token schedule). Each token keeps its
own uniform (seed, index) and so its sample does not depend on the batch.
"""
from __future__ import annotations

import math
import operator

import torch
from tqdm.auto import tqdm

from ..core.seeds import mix_seed, row_seeds
from ..decode.backend import DecodeBackend
from ..decode.cache import CachedDecoder
from .draw import draw, guide, raise_if_not_finite, with_unconditional

GROUP_SCHEDULES = ("cosine", "arccos", "linear", "constant")
STEP_ORDERS = ("random", "wavefront")  # order names resolved per call: from the seed, from the steps


def _done_fraction(schedule: str, r: float) -> float:
    if schedule == "cosine":
        return 1 - math.cos(math.pi / 2 * r)
    if schedule == "arccos":
        return 1 - 2 / math.pi * math.acos(r)
    if schedule == "linear":
        return r * r
    return r  # constant


def check_steps(steps, schedule, num_tokens: int | None = None) -> tuple[int, str | None]:
    """`steps` as an int in [1, T] (T = `num_tokens`; None: no upper bound) and `schedule` one of
    GROUP_SCHEDULES or None, else one clear error naming the value."""
    bound = "a positive integer" if num_tokens is None else f"an integer in [1, {num_tokens}] (the number of tokens)"
    try:
        n = None if isinstance(steps, bool) else operator.index(steps)
    except TypeError:
        n = None
    if n is None or n < 1 or (num_tokens is not None and n > num_tokens):
        raise ValueError(f"steps (network passes) must be {bound}, got {steps!r}.")
    if schedule is not None and schedule not in GROUP_SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(GROUP_SCHEDULES)}, got {schedule!r}.")
    return n, schedule


def group_sizes(total: int, steps: int, schedule: str = "cosine") -> list[int]:
    """Sizes of `steps` groups (each >= 1) that sum to `total` tokens, following `schedule`; fewer
    groups when total < steps."""
    steps = min(steps, total)
    done = [0]
    for s in range(1, steps + 1):
        want = round(total * _done_fraction(schedule, s / steps))
        done.append(min(max(want, done[-1] + 1), total - (steps - s)))  # >= 1 now, >= 1 left per later group
    return [b - a for a, b in zip(done, done[1:])]


def wavefront_times(grid_size: int, steps: int) -> torch.Tensor:
    """(T,) the pass (0..steps-1) at which each raster position is due in the wavefront family."""
    n = grid_size
    r, c = torch.arange(n * n) // n, torch.arange(n * n) % n
    extra = max(0, steps - n)  # rows lag by extra / (n - 1) columns: n + extra passes in all
    lag = (2 * r * extra + (n - 1)) // (2 * (n - 1)) if n > 1 else torch.zeros_like(r)
    t = c + lag
    passes = int(t.max()) + 1
    return t * steps // passes if passes > steps else t


def wavefront_order(grid_size: int, steps: int) -> torch.Tensor:
    """(T,) raster indices sorted by wavefront time, then raster order."""
    t = wavefront_times(grid_size, steps)
    return torch.argsort(t * t.numel() + torch.arange(t.numel()), stable=True)


def row_groups(orders: torch.Tensor, kept: torch.Tensor, steps: int, schedule: str | None,
               times: torch.Tensor | None) -> list[tuple[int, ...]]:
    """Each row's group sizes over its unknown tokens (orders (B, T), kept (B,)): by `times` (the
    wavefront's pass per raster position, merged to at most `steps` groups) or by `schedule`."""
    out, times = [], None if times is None else times.cpu()
    for o, k in zip(orders.tolist(), kept.tolist()):
        rest = len(o) - k
        if times is None:
            out.append(tuple(group_sizes(rest, steps, schedule or "cosine")))
            continue
        t = times[torch.tensor(o[k:])]
        change = torch.cat([torch.tensor([True]), t[1:] != t[:-1]])
        starts = change.nonzero()[:, 0].tolist() + [rest]
        out.append(tuple(b - a for a, b in zip(starts, starts[1:])))
    return out


def random_orders(seed, indices, num_tokens: int, device) -> torch.Tensor:
    """(B, T) one uniformly random order per sample, from its own generator seeded by
    (seed, index, 1): the order does not depend on the batch, nor touch the sampling uniforms.
    `seed`: one integer, or one per sample."""
    return torch.stack([torch.randperm(num_tokens, generator=torch.Generator().manual_seed(mix_seed(s, i, 1)))
                        for s, i in zip(row_seeds(seed, len(indices)), indices)]).to(device)


def run_parallel(backend: DecodeBackend, labels: torch.Tensor, orders: torch.Tensor, s, uniforms: torch.Tensor,
                 scales: torch.Tensor, sizes: list[tuple[int, ...]], *, kept: torch.Tensor | None = None,
                 tokens: torch.Tensor | None = None, forced: torch.Tensor | None = None,
                 progress: bool = False) -> torch.Tensor:
    """`sampler.run_decoder` in groups: row b's unknown tokens come in groups of sizes[b]; rows
    that share (kept, sizes) decode as one batch. Returns (B, T) raster layout."""
    B, T = orders.shape
    kept = torch.zeros(B, dtype=torch.long, device=orders.device) if kept is None else kept
    out = torch.empty(B, T, dtype=torch.long, device=orders.device) if tokens is None else tokens.clone()
    keys = [(int(k), g) for k, g in zip(kept.tolist(), sizes)]
    for key in dict.fromkeys(keys):
        rows = torch.tensor([i for i, k in enumerate(keys) if k == key], device=orders.device)
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        out[rows] = _run_groups(backend, labels[rows], orders[rows], s, uniforms[rows], scales[rows], key[1],
                                key[0], pick(tokens), pick(forced), out[rows], progress)
    return out


def _run_groups(backend, labels, orders, s, uniforms, scales, sizes, K, tokens, forced, out, progress):
    """One batch whose rows all know K tokens and decode in groups of `sizes`."""
    B, T = orders.shape
    guided = s.guided
    rows, twice = with_unconditional(labels, backend.config.null_label, guided)  # (R,)
    dec = CachedDecoder(backend, rows, twice(orders), twice(torch.full((B,), K, device=orders.device)))
    first = orders[:, K + 1:K + sizes[0]]  # (B, g0 - 1) the first group's other positions
    logits = dec.prefill(twice(tokens), targets=twice(first) if first.shape[1] else None)  # (R, g0, V) or (R, V)
    logits = logits if logits.ndim == 3 else logits[:, None]
    finite = torch.ones((), dtype=torch.bool, device=orders.device)
    j = 0
    passes = tqdm(sizes, desc="sampling", unit="pass", leave=False) if progress else sizes
    for n, g in enumerate(passes):
        finite &= torch.isfinite(logits).all()
        if guided:
            logits = guide(logits, scales[:, j:j + 1, None])  # the scale at the group's first token
        tok = draw((logits / s.temperature).flatten(0, 1), s.top_k, s.top_p, uniforms[:, j:j + g].flatten())
        tok = tok.view(B, g)
        where = orders[:, K + j:K + j + g]  # (B, g) raster positions
        if forced is not None:
            tok = torch.where(forced[:, j:j + g], tokens.gather(1, where), tok)
        out.scatter_(1, where, tok)
        if n + 1 < len(sizes):
            nxt = orders[:, K + j + g + 1:K + j + g + sizes[n + 1]]  # (B, g' - 1) the next group's queries
            logits = dec.extend(twice(tok), j, twice(nxt) if nxt.shape[1] else None)  # (R, g', V)
        j += g
    raise_if_not_finite(finite)
    return out
