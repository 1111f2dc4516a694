"""The training objective's randomness (paper Sec. 3.2): the annealed permutation probability,
per-sample factorization orders, class-label dropout, and the named deterministic scan orders
of the paper's ablation (Table 3). Every random draw takes an explicit `torch.Generator`.

An order is a permutation `o` of the raster indices 0..T-1: `o[j]` is the raster index of the
j-th token generated.
"""
from __future__ import annotations

import torch

from ..core.checks import check_counts, finite


def random_ratio(step: int, anneal_start: int, anneal_end: int, r_final: float = 0.0) -> float:
    """Probability that a training sequence is permuted at `step`: 1 before `anneal_start`,
    linear to `r_final` at `anneal_end`, `r_final` after. With r_final = 0 (the paper's) this is
    the official `get_rar_random_ratio`; a floor r_final > 0 keeps some permuted sequences to the
    end, so the model stays able to decode in any order (editing) at some cost in raster quality."""
    if anneal_end < anneal_start:
        raise ValueError(f"anneal_end ({anneal_end}) must not be before anneal_start ({anneal_start}).")
    if not 0.0 <= r_final <= 1.0:
        raise ValueError(f"r_final must be a probability in [0, 1], got {r_final}.")
    if step < anneal_start:
        return 1.0
    if step >= anneal_end:
        return float(r_final)
    return 1.0 - (1.0 - r_final) * (step - anneal_start) / (anneal_end - anneal_start)


def _require_probability(name: str, value) -> None:
    if not (finite(value) and 0 <= value <= 1):
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}.")


def sample_orders(batch_size: int, num_tokens: int, ratio: float, generator: torch.Generator | None = None,
                  device=None, base: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) orders: each row a uniform random permutation with probability `ratio`, else raster
    (or the scan order `base` (T,), e.g. `named_order("z_curve", g)`: the order annealing ends in).
    Draws happen on the generator's device (CPU by default) so results do not depend on `device`."""
    check_counts(batch_size=batch_size, num_tokens=num_tokens)
    _require_probability("ratio", ratio)
    g_device = generator.device if generator is not None else "cpu"
    permute = torch.rand(batch_size, generator=generator, device=g_device) < ratio  # (B,)
    perms = torch.rand(batch_size, num_tokens, generator=generator, device=g_device).argsort(dim=1)  # (B, T)
    fixed = torch.arange(num_tokens, device=g_device) if base is None else base.to(g_device)
    return torch.where(permute[:, None], perms, fixed.expand(batch_size, num_tokens)).to(device or g_device)


def drop_labels(labels: torch.Tensor, prob: float, null_label: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Class-label dropout for classifier-free guidance: each label becomes `null_label` with `prob`."""
    _require_probability("prob", prob)
    g_device = generator.device if generator is not None else "cpu"
    drop = (torch.rand(labels.shape, generator=generator, device=g_device) < prob).to(labels.device)
    return torch.where(drop, torch.full_like(labels, null_label), labels)


# ---- named scan orders ----------------------------------------------------------------------------
def _raster(n: int) -> list[tuple[int, int]]:
    return [(r, c) for r in range(n) for c in range(n)]


def _spiral_in(n: int) -> list[tuple[int, int]]:
    """Clockwise from the top-left corner, ring by ring towards the centre."""
    out, top, left, bottom, right = [], 0, 0, n - 1, n - 1
    while top <= bottom and left <= right:
        out += [(top, c) for c in range(left, right + 1)]
        out += [(r, right) for r in range(top + 1, bottom + 1)]
        if top < bottom:
            out += [(bottom, c) for c in range(right - 1, left - 1, -1)]
        if left < right:
            out += [(r, left) for r in range(bottom - 1, top, -1)]
        top, left, bottom, right = top + 1, left + 1, bottom - 1, right - 1
    return out


def _z_curve(n: int) -> list[tuple[int, int]]:
    """Morton order: sort cells by the interleaved bits of (row, col); a Z in every 2x2 block."""
    def key(rc):
        r, c, k = rc[0], rc[1], 0
        for bit in range(max(n, 1).bit_length()):
            k |= ((c >> bit) & 1) << (2 * bit) | ((r >> bit) & 1) << (2 * bit + 1)
        return k
    return sorted(_raster(n), key=key)


def _subsample(n: int) -> list[tuple[int, int]]:
    """The four stride-2 sub-grids one after the other, (even, even), (even, odd), (odd, even),
    (odd, odd), each in raster order: a coarse image first, then refinements."""
    return sorted(_raster(n), key=lambda rc: (rc[0] % 2, rc[1] % 2, rc[0], rc[1]))


def _alternate(n: int) -> list[tuple[int, int]]:
    """Boustrophedon: even rows left to right, odd rows right to left."""
    return [(r, c if r % 2 == 0 else n - 1 - c) for r in range(n) for c in range(n)]


NAMED_ORDERS = {
    "raster": _raster,
    "spiral_in": _spiral_in,
    "spiral_out": lambda n: _spiral_in(n)[::-1],  # from the centre outwards
    "z_curve": _z_curve,
    "subsample": _subsample,
    "alternate": _alternate,
}


def named_order(name: str, grid_size: int) -> torch.Tensor:
    """(T,) int64 raster indices of the named scan order on a grid_size x grid_size token grid."""
    check_counts(grid_size=grid_size)
    key = str(name).replace("-", "_")
    if key not in NAMED_ORDERS:
        raise ValueError(f"unknown order {name!r}; expected one of {', '.join(NAMED_ORDERS)}.")
    cells = NAMED_ORDERS[key](grid_size)
    return torch.tensor([r * grid_size + c for r, c in cells], dtype=torch.long)


def is_permutation(orders: torch.Tensor) -> bool:
    """True when every row of (B, T) (or the single (T,) row) is a permutation of 0..T-1."""
    rows = orders.reshape(-1, orders.shape[-1])
    return bool((rows.sort(dim=1).values == torch.arange(rows.shape[1], device=rows.device)).all())
