"""Pixel-level editing on any generator + tokenizer pair: inpainting (with the class of the image
or another one: class-conditional editing) and outpainting beyond the trained grid, built on the
token-level `rar.edit`.

Images are float (3, H, W) in [0, 1] at the tokenizer's resolution; masks are bool (H, W) with
True = regenerate. A token is regenerated when any pixel of its f x f patch is masked (f the
tokenizer's downsampling factor). Known pixels are pasted back outside the mask over a short
feather, because the tokenizer's reconstruction of the known region is close to, not equal to,
the original.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.checks import check_counts, check_pair
from ..core.seeds import mix_seed
from ..decode.backend import DecodeBackend, prepare
from ..model.transformer import RAR
from .editing import edit
from .sampler import SamplingSettings

SIDES = ("left", "right", "up", "down")


def token_mask(mask: torch.Tensor, factor: int, dilate: int = 0) -> torch.Tensor:
    """Pixel mask (H, W) bool -> token mask (H/f, W/f) bool: a token is masked when any of its
    pixels is; `dilate` grows the masked region by that many tokens in every direction."""
    if dilate < 0:
        raise ValueError(f"dilate must be a non-negative number of tokens, got {dilate}.")
    m = F.max_pool2d(mask[None, None].float(), factor)  # (1, 1, h, w)
    if dilate:
        m = F.max_pool2d(m, 2 * dilate + 1, stride=1, padding=dilate)
    return m[0, 0] > 0


def pixel_mask(tokens: torch.Tensor, factor: int) -> torch.Tensor:
    """A token mask (..., h, w) -> the pixel mask (..., h*f, w*f) it covers (the inverse of `token_mask`)."""
    return tokens.repeat_interleave(factor, -2).repeat_interleave(factor, -1)


def feather(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """(H, W) weights of the generated image: 1 on the mask, falling to 0 over 2 * radius pixels
    outside it (a dilation followed by a box blur)."""
    m = mask[None, None].float()
    if radius <= 0:
        return m[0, 0]
    k = 2 * radius + 1
    grown = F.max_pool2d(m, k, stride=1, padding=radius)
    return F.avg_pool2d(grown, k, stride=1, padding=radius, count_include_pad=False)[0, 0]


def paste_back(original: torch.Tensor, generated: torch.Tensor, mask: torch.Tensor, radius: int) -> torch.Tensor:
    """generated (N, 3, H, W) with the original's pixels outside `mask` (feathered)."""
    alpha = feather(mask, radius).to(generated)  # (H, W)
    return generated * alpha + original.to(generated) * (1 - alpha)


def default_feather(resolution: int) -> int:
    return max(1, resolution // 64)  # 4 px at 256


def _setup(generator: RAR | DecodeBackend, tokenizer, jobs) -> tuple[DecodeBackend, int, int]:
    """(backend, resolution, grid) after checking the pair and every job's count and image shape."""
    if not jobs:
        raise ValueError("jobs is empty; give at least one EditJob.")
    for job in jobs:
        check_counts(num=job.num)
    backend = generator if isinstance(generator, DecodeBackend) else prepare(generator)
    res, grid = tokenizer.config.resolution, backend.config.grid_size
    check_pair(backend, tokenizer)
    for job in jobs:
        if job.image.shape != (3, res, res):
            raise ValueError(f"image must be a (3, {res}, {res}) float tensor in [0, 1] (the tokenizer's resolution), "
                             f"got shape {tuple(job.image.shape)}.")
    return backend, res, grid


def _label(backend: DecodeBackend, label) -> int:
    c = backend.config.num_classes if label is None else int(label)
    if not 0 <= c <= backend.config.num_classes:
        raise ValueError(f"class {c} is outside [0, {backend.config.num_classes}] "
                         f"({backend.config.num_classes} or None = no class).")
    return c


@dataclass
class EditJob:
    """One request of `inpaint_many` / `outpaint_many`: image (3, H, W) in [0, 1], mask (H, W) bool
    (True = regenerate; inpainting only), class (None = unconditional), number of results and
    seed. Its results are the rows (seed, index 0..num-1), whatever else shares the batch."""
    image: torch.Tensor
    mask: torch.Tensor | None = None
    label: int | None = None
    num: int = 4
    seed: int = 0


def _rows(backend: DecodeBackend, jobs: list[EditJob]) -> tuple[torch.Tensor, list[int], list[int]]:
    """labels (N,), seeds and indices of the jobs' rows, job after job."""
    labels = torch.tensor([_label(backend, j.label) for j in jobs for _ in range(j.num)], device=backend.device)
    return labels, [j.seed for j in jobs for _ in range(j.num)], [i for j in jobs for i in range(j.num)]


@torch.inference_mode()
def inpaint(generator: RAR | DecodeBackend, tokenizer, image: torch.Tensor, mask: torch.Tensor, label=None, *,
            num: int = 4, dilate: int = 0, paste: bool = True, feather_radius: int | None = None, seed: int = 0,
            settings: SamplingSettings | None = None, order=None, kept_first: bool = True,
            schedule_over: str = "sequence", progress: bool = False, reconstruction: bool = True) -> dict:
    """Regenerate the masked part of `image` `num` times with class `label` (None = unconditional;
    another class than the image's edits it). `settings`, `order`, `kept_first`, `schedule_over`
    and `progress` are `rar.edit`'s. Returns {"images" (num, 3, H, W),
    "raw" (the decodes before pasting back), "tokens" (num, T), "keep" (T,), "masked" (3, H, W),
    "reconstruction" (3, H, W), the tokenizer's decode of the whole image, one more decode: skipped
    with `reconstruction=False`}."""
    return inpaint_many(generator, tokenizer, [EditJob(image, mask, label, num, seed)], dilate=dilate, paste=paste,
                        feather_radius=feather_radius, settings=settings, order=order, kept_first=kept_first,
                        schedule_over=schedule_over, progress=progress, reconstruction=reconstruction)[0]


@torch.inference_mode()
def inpaint_many(generator: RAR | DecodeBackend, tokenizer, jobs: list[EditJob], *, dilate: int = 0,
                 paste: bool = True, feather_radius: int | None = None, settings: SamplingSettings | None = None,
                 order=None, kept_first: bool = True, schedule_over: str = "sequence",
                 progress: bool = False, reconstruction: bool = True) -> list[dict]:
    """`inpaint` of several requests (each its own image, mask, class, count and seed) decoded as
    one batch (several users of `rar app`); result k equals `inpaint` of job k alone, token for
    token, and its images are decoded as their own batch so they are equal pixel for pixel too."""
    backend, res, grid = _setup(generator, tokenizer, jobs)
    device, radius = backend.device, default_feather(res) if feather_radius is None else feather_radius
    images, masks, codes, keeps = [], [], [], []
    for job in jobs:
        if job.mask is None or job.mask.shape != (res, res):
            shape = None if job.mask is None else tuple(job.mask.shape)
            raise ValueError(f"mask must be ({res}, {res}) like the image, got {shape}.")
        images.append(job.image.to(device).float())
        masks.append(job.mask.to(device).bool())
        keeps.append(~token_mask(masks[-1], res // grid, dilate).flatten())  # (T,)
        codes.append(tokenizer.encode(images[-1][None]))  # (1, T)
    labels, seeds, indices = _rows(backend, jobs)
    nums = [j.num for j in jobs]
    out = edit(backend, torch.cat([c.expand(n, -1) for c, n in zip(codes, nums)]),
               torch.cat([k.expand(n, -1) for k, n in zip(keeps, nums)]), labels, settings=settings, order=order,
               kept_first=kept_first, schedule_over=schedule_over, seed=seeds, indices=indices,
               progress=progress)  # (N, T)
    results = []
    for image, mask, c, keep, part in zip(images, masks, codes, keeps, out.split(nums)):
        raw = tokenizer.decode(part).float()  # (num, 3, H, W)
        pixels = pixel_mask(~keep.view(grid, grid), res // grid) if dilate else mask
        results.append({"images": paste_back(image, raw, pixels, radius) if paste else raw, "raw": raw,
                        "tokens": part, "keep": keep,
                        "masked": torch.where(mask, torch.full_like(image, 0.5), image)})
        if reconstruction:
            results[-1]["reconstruction"] = tokenizer.decode(c).float()[0]
    return results


def parse_extend(specs) -> list[tuple[str, int]]:
    """["right:4", "down:2"] (or one comma-separated string, or such pairs) -> [("right", 4), ("down", 2)]."""
    if isinstance(specs, str):
        specs = specs.split(",")
    out = []
    for spec in specs:
        side, _, k = (spec[0], ":", str(spec[1])) if isinstance(spec, tuple) else str(spec).strip().partition(":")
        if side not in SIDES or not k.isdigit() or int(k) < 1:
            raise ValueError(f"extend {spec!r} must be SIDE:K with SIDE one of {', '.join(SIDES)} and K a positive "
                             "number of token rows or columns, e.g. right:4.")
        out.append((side, int(k)))
    if not out:
        raise ValueError("extend is empty; give e.g. right:4.")
    return out


# The largest outpainted canvas, per side, in multiples of the trained grid (64x64 tokens, 1024 px,
# for a 16x16 model): past it the number of windows (each a full kept-first decode) grows into
# hours, so a request beyond it is refused rather than left running.
MAX_CANVAS_FACTOR = 4


def check_canvas(sides: list[tuple[str, int]], grid: int) -> tuple[int, int]:
    """The grown canvas (rows, cols) in tokens; a ValueError when a side exceeds MAX_CANVAS_FACTOR x grid."""
    rows = grid + sum(k for s, k in sides if s in ("up", "down"))
    cols = grid + sum(k for s, k in sides if s in ("left", "right"))
    limit = MAX_CANVAS_FACTOR * grid
    if max(rows, cols) > limit:
        raise ValueError(f"extend {', '.join(f'{s}:{k}' for s, k in sides)} would grow the {grid}x{grid} token grid to "
                         f"{rows}x{cols}; at most {limit} token rows and columns ({MAX_CANVAS_FACTOR}x the trained "
                         "grid) are allowed.")
    return rows, cols


def window_plan(height: int, width: int, side: str, k: int, grid: int) -> list[tuple[int, int]]:
    """Top-left corners (row, col) of the grid x grid windows that fill a strip of k new token
    columns (left/right) or rows (up/down) added to a height x width canvas (its size after the
    strip is added), in the order they are generated: from the known side outwards, each window
    half known context and half new (its last one may hold more context), and tiling the other
    axis with half-window overlaps."""
    vertical = side in ("up", "down")
    along, across = (height, width) if vertical else (width, height)
    step = max(1, grid // 2)
    if side in ("right", "down"):
        starts = [min(e, along) - grid for e in range(along - k + step, along + step, step)]
    else:
        starts = [max(s, 0) for s in range(k - step, -step, -step)]
    starts = list(dict.fromkeys(max(0, min(s, along - grid)) for s in starts))
    tiles = list(dict.fromkeys([*range(0, max(across - grid, 0), step), max(across - grid, 0)]))
    return [(a, t) if vertical else (t, a) for a in starts for t in tiles]


@torch.inference_mode()
def outpaint(generator: RAR | DecodeBackend, tokenizer, image: torch.Tensor, extend, label=None, *, num: int = 4,
             paste: bool = True, feather_radius: int | None = None, seed: int = 0,
             settings: SamplingSettings | None = None, order=None, kept_first: bool = True,
             schedule_over: str = "sequence", progress: bool = False) -> dict:
    """Grow `image` beyond the trained grid by `extend` ([("right", 4)] or "right:4,down:2") token
    columns/rows with a sliding window of the trained size: each window holds known context next
    to the new strip, and its unknown tokens are generated by kept-first decoding (`settings` ...
    `progress` as in `rar.edit`). Returns
    {"images" (num, 3, H', W'), "raw", "tokens" (num, h', w'), "known" (h', w') the original's
    tokens, "canvas" (3, H', W') the original on grey}."""
    return outpaint_many(generator, tokenizer, [EditJob(image, None, label, num, seed)], extend, paste=paste,
                         feather_radius=feather_radius, settings=settings, order=order, kept_first=kept_first,
                         schedule_over=schedule_over, progress=progress)[0]


@torch.inference_mode()
def outpaint_many(generator: RAR | DecodeBackend, tokenizer, jobs: list[EditJob], extend, *, paste: bool = True,
                  feather_radius: int | None = None, settings: SamplingSettings | None = None, order=None,
                  kept_first: bool = True, schedule_over: str = "sequence", progress: bool = False) -> list[dict]:
    """`outpaint` of several requests with the same `extend` (each its own image, class, count and
    seed) decoded as one batch; result k equals `outpaint` of job k alone (see `inpaint_many`)."""
    backend, res, grid = _setup(generator, tokenizer, jobs)
    sides = parse_extend(extend)
    check_canvas(sides, grid)
    device, f = backend.device, res // grid
    images = [job.image.to(device).float() for job in jobs]
    nums = [j.num for j in jobs]
    codes = torch.cat([tokenizer.encode(im[None]).view(1, grid, grid).expand(n, -1, -1)
                       for im, n in zip(images, nums)]).clone()  # (N, g, g)
    labels, seeds, indices = _rows(backend, jobs)
    N = labels.shape[0]
    known = torch.ones(grid, grid, dtype=torch.bool, device=device)
    original = known.clone()  # where the original image's tokens are, on the final canvas
    window = 0
    for side, k in sides:
        pad = {"left": (k, 0, 0, 0), "right": (0, k, 0, 0), "up": (0, 0, k, 0), "down": (0, 0, 0, k)}[side]
        codes, known, original = (F.pad(t, pad) for t in (codes, known, original))
        for r, c in window_plan(*known.shape, side, k, grid):
            sub_keep = known[r:r + grid, c:c + grid].flatten()  # (T,)
            if bool(sub_keep.all()):
                continue
            sub = codes[:, r:r + grid, c:c + grid].reshape(N, -1)
            out = edit(backend, sub, sub_keep.expand(N, -1), labels, settings=settings, order=order,
                       kept_first=kept_first, schedule_over=schedule_over, seed=[mix_seed(s, window) for s in seeds],
                       indices=indices, progress=progress)  # (N, T)
            codes[:, r:r + grid, c:c + grid] = out.view(N, grid, grid)
            known[r:r + grid, c:c + grid] = True
            window += 1
    new = ~pixel_mask(original, f)  # (H', W') generated pixels
    radius = default_feather(res) if feather_radius is None else feather_radius
    results = []
    for image, part in zip(images, codes.split(nums)):
        raw = tokenizer.decode(part).float()  # (num, 3, H', W'), each request's own decode batch
        canvas = torch.full_like(raw[0], 0.5)
        canvas[:, ~new] = image.flatten(1)
        results.append({"images": paste_back(canvas, raw, new, radius) if paste else raw, "raw": raw, "tokens": part,
                        "known": original, "canvas": canvas})
    return results
