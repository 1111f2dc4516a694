"""Editing with known tokens: inpainting, outpainting and class-conditional editing at the token
level (`edit`), by kept-first any-order decoding.

A model trained on permuted orders with target-aware positions (paper Sec. 3.2-3.3) can predict
any position next. So the known tokens are fed first, all of them in one batched prefill pass
(`rar.decode.cache`), and the unknown ones are then generated one by one, each seeing
every known token wherever it lies, including those below and to the right of it. The baseline
any causal (raster) model can do, `kept_first=False`, teacher-forces the known tokens in raster
order instead: a generated token sees only the known tokens before it in the scan.

Guidance schedule. The power-cosine schedule ramps the guidance scale over the sequence:
`schedule_over="sequence"` (default) counts positions in the whole sequence, known tokens
included, as if the known tokens had been generated (so the generated tokens start late on the
ramp, as they would in a generation that produced the known tokens); `"generated"` counts only
the tokens this call generates, so the first generated token gets scale 1 and the last nearly g,
whatever part of the image is known. BENCHMARKS.md compares the two on the digits.
"""
from __future__ import annotations

import torch

from ..core.checks import check_indices, check_labels, check_tokens
from ..decode.backend import DecodeBackend
from ..model.transformer import RAR
from .parallel import check_steps, row_groups, run_parallel
from .sampler import (SamplingSettings, as_backend, decode_orders, guidance_scales, resolve_seeds, resolve_settings,
                      run_decoder, sample_uniforms)

SCHEDULES = ("generated", "sequence")


def _check_tokens_and_keep(tokens, keep, backend: DecodeBackend) -> tuple[torch.Tensor, torch.Tensor]:
    # the tokens' own shape and type first (their codes only where kept: unknown ones may hold anything)
    tokens = check_tokens(tokens, backend.config, backend.device, known=torch.zeros((), dtype=torch.bool))
    try:
        keep = torch.as_tensor(keep, device=backend.device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"keep must be a bool tensor of the tokens' shape (True = keep), got {str(keep)[:60]!r}.") from None
    if keep.shape != tokens.shape or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a bool tensor of the tokens' shape {tuple(tokens.shape)} (True = keep), "
                         f"got a {str(keep.dtype).removeprefix('torch.')} tensor of shape {tuple(keep.shape)}.")
    tokens = check_tokens(tokens, backend.config, backend.device, known=keep)
    return tokens.clamp(0, backend.config.codebook_size - 1), keep  # unknown positions may hold anything (e.g. -1)


def kept_first_orders(orders: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, T) orders with each row's kept positions first, then the others, each part in the
    row's `orders` (a stable partition)."""
    unknown = (~keep.gather(1, orders)).to(torch.int8)  # (B, T) in order space
    return orders.gather(1, unknown.argsort(dim=1, stable=True))


def edit_schedule(g: float, power: float, kept: torch.Tensor, forced: torch.Tensor | None, num_tokens: int,
                  schedule_over: str) -> torch.Tensor:
    """(B, steps) guidance scales: `forced` (B, T) marks teacher-forced steps (the raster baseline),
    else row b's step j generates token j after kept[b] known ones (see the module docstring)."""
    B, T = kept.shape[0], num_tokens
    j = torch.arange(T, dtype=torch.float64, device=kept.device)[None].expand(B, T)  # (B, T) steps
    if forced is None:
        generated_before, known_before = j, kept[:, None].double()
        to_generate = (T - kept)[:, None].double()
    else:
        fresh = (~forced).double()
        generated_before = fresh.cumsum(1) - fresh
        known_before = torch.zeros_like(j)
        to_generate = fresh.sum(1, keepdim=True)
    if schedule_over == "generated":
        progress = generated_before / to_generate.clamp(min=1)
    else:
        progress = (known_before + j) / T
    return guidance_scales(g, power, progress.clamp(max=1))


@torch.inference_mode()
def edit(model: RAR | DecodeBackend, tokens, keep, labels, *, settings: SamplingSettings | None = None,
         order=None, kept_first: bool = True, schedule_over: str = "sequence", seed: int | None = None,
         generator: torch.Generator | None = None, indices=None, progress: bool = False, pack_weights: bool = True,
         guidance_scale: float | None = None, guidance_scale_pow: float | None = None,
         temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
         steps: int | None = None, schedule: str | None = None) -> torch.Tensor:
    """Regenerate the tokens not kept: tokens (B, T) raster layout, keep (B, T) bool (True = keep),
    labels (B,) (the null label `num_classes` = unconditional). Returns (B, T) with every kept
    token unchanged.

    Kept-first (default): each row's kept tokens are fed first in one batched prefill, then its
    other positions are generated in `order` restricted to them (None = raster, a scan-order
    name, a permutation (T,) or one per sample (B, T)); each sample may have its own mask. With
    `kept_first=False`, the raster baseline: decode in `order`, teacher-forcing kept tokens.
    Sampling settings, `seed`/`generator`/`indices` and `model` as in `rar.generate`: a sample
    depends only on (seed, index), and `seed` may be one per row (several users' edits in one
    batch); none kept equals `generate` with the same order and seed.
    `steps` < T decodes the unknown tokens in at most that many passes (`rar.inference.parallel`),
    after the same one-pass prefill of the kept ones; rows that share their number of kept
    tokens and group sizes decode as one batch.
    """
    if schedule_over not in SCHEDULES:
        raise ValueError(f"schedule_over must be one of {SCHEDULES}, got {schedule_over!r}.")
    if not isinstance(kept_first, bool):
        raise ValueError(f"kept_first must be True or False, got {kept_first!r}.")
    backend = as_backend(model, packed=pack_weights)
    tokens, keep = _check_tokens_and_keep(tokens, keep, backend)
    labels = check_labels(labels, backend.config.num_classes, backend.device)
    B, T = tokens.shape
    if labels.shape[0] != B:
        raise ValueError(f"labels has {labels.shape[0]} entries for {B} rows of tokens; give one label per row.")
    s = resolve_settings(backend.sampling, guidance_scale, guidance_scale_pow, temperature, top_k, top_p, settings,
                         steps, schedule, backend.config.codebook_size)
    n_steps, _ = check_steps(s.steps or T, s.schedule, T)
    seed, indices = resolve_seeds(seed, generator, B), check_indices(indices, B)
    orders, times = decode_orders(order, backend, tokens.device, B, seed, indices, n_steps)
    uniforms = sample_uniforms(seed, indices, T, tokens.device)  # (B, T)
    out = tokens.clone()
    todo = (~keep).any(1).nonzero()[:, 0]  # rows with something to generate
    if todo.numel() == 0:
        return out
    tokens, keep, labels, orders, uniforms = (t[todo] for t in (tokens, keep, labels, orders, uniforms))
    if kept_first:
        kept, forced = keep.sum(1), None
        orders = kept_first_orders(orders, keep)
    else:
        kept, forced = None, keep.gather(1, orders)  # (B', T) in order space
    scales = edit_schedule(s.guidance_scale, s.guidance_scale_pow, torch.zeros_like(todo) if kept is None else kept,
                           forced, T, schedule_over)
    if n_steps == T:
        out[todo] = run_decoder(backend, labels, orders, s, uniforms, scales.float(), kept=kept, tokens=tokens,
                                forced=forced, progress=progress)
        return out
    known = torch.zeros_like(todo) if kept is None else kept
    sizes = row_groups(orders, known, n_steps, s.schedule, times if s.schedule is None else None)
    out[todo] = run_parallel(backend, labels, orders, s, uniforms, scales.float(), sizes, kept=kept, tokens=tokens,
                             forced=forced, progress=progress)
    return out
