"""Sampling: raster-order (or any scan order) decoding with a preallocated KV cache and
classifier-free guidance on a cosine schedule (paper Sec. 4.1; upstream `RAR.generate`).

The decode engine (`rar.decode`: the prepared backend, the KV cache, the CPU kernels) gives the
same tokens as upstream's sampler, faster; this module holds the sampling policy on top of it:
settings, guidance schedule, filtering and the draw.

Randomness: sample i uses its own generator seeded from (seed, indices[i]), with all its uniforms
drawn up front, so a sample does not depend on the batch it is in or the process that draws it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..core.checks import check_indices, check_labels, check_sampling_values, check_tokens
from ..core.seeds import mix_seed, resolve_seed, row_seeds
from ..decode.backend import DecodeBackend, prepare
from ..decode.cache import CachedDecoder
from ..model.config import SamplingDefaults
from ..model.orders import is_permutation, named_order
from ..model.transformer import RAR
from .draw import draw, guide, raise_if_not_finite, with_unconditional
from .parallel import STEP_ORDERS, check_steps, random_orders, row_groups, run_parallel, wavefront_order, \
    wavefront_times


def guidance_schedule(guidance_scale: float, power: float, num_steps: int) -> torch.Tensor:
    """(T,) float32 scales 1 + (g - 1)(1 - cos(pi (t/T)^p)) / 2 with upstream's rounding: (t/T)^p in
    float64 (a Python float raised to a tensor), the rest in float32. p = 0 gives the constant g (0^0 = 1)."""
    return guidance_scales(guidance_scale, power, torch.arange(num_steps, dtype=torch.float64) / num_steps)


def guidance_scales(guidance_scale: float, power: float, progress: torch.Tensor) -> torch.Tensor:
    """The power-cosine schedule at float64 `progress` values in [0, 1), any shape: float32 scales."""
    ramp = (progress.double() ** float(power)).float()
    step = (1 - torch.cos(ramp * torch.pi)) * 1 / 2
    return (guidance_scale - 1) * step + 1


def as_backend(model: RAR | DecodeBackend, packed: bool = True) -> DecodeBackend:
    """A prepared backend as it is; a model is prepared now, at the cost `generate` documents."""
    if not isinstance(model, (DecodeBackend, RAR)):
        raise TypeError(f"model must be a rar.RAR (e.g. rar.from_pretrained(...)) or the backend of rar.prepare(model), "
                        f"got {type(model).__name__}.")
    return model if isinstance(model, DecodeBackend) else prepare(model, packed=packed)


def generation_order(order, model, device, batch_size: int | None = None) -> torch.Tensor | str:
    """Raster indices in generation order from None (raster), a scan-order name, a permutation (T,)
    or, with `batch_size`, one permutation per sample (B, T): (T,), or (B, T) when given so. The
    names of orders made per call (`random`: one per sample from the seed; `wavefront`: from the
    number of steps) come back as they are; `decode_orders` makes them."""
    T = model.config.num_tokens
    if order is None:
        return torch.arange(T, device=device)
    if isinstance(order, str) and order in STEP_ORDERS:
        return order
    if isinstance(order, str):
        order = named_order(order, model.config.grid_size)
    try:
        order = torch.as_tensor(order, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"order must be a scan-order name or a permutation of 0..{T - 1}, got {str(order)[:60]!r}.") from None
    if order.ndim == 2 and batch_size is not None and order.shape != (batch_size, T):
        raise ValueError(f"a per-sample order must have shape (B, T) = ({batch_size}, {T}), got {tuple(order.shape)}.")
    if order.shape not in ((T,), (batch_size, T)) or order.is_floating_point() or not is_permutation(order):
        raise ValueError(f"order must be a scan-order name or a permutation of 0..{T - 1}"
                         + (" (or one per sample)" if batch_size is not None else "") + ".")
    return order.long()


@dataclass(frozen=True)
class SamplingSettings:
    """How tokens are drawn. A field left None takes the model's preset value (`SamplingDefaults`:
    guidance scale, its schedule's power, temperature) when `resolve`d; top_k / top_p None means
    no filtering. Every sampling function takes one as `settings=`; their loose keywords of the
    same names, where given, override its fields."""
    guidance_scale: float | None = None
    guidance_scale_pow: float | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    steps: int | None = None  # network passes (parallel decoding); None = one per token
    schedule: str | None = None  # group sizes over the passes (`rar.inference.parallel`); None = cosine

    @property
    def guided(self) -> bool:
        """Whether unconditional rows run: a scale of 0 or 1 needs none."""
        return self.guidance_scale not in (0.0, 1.0)

    def overridden(self, **values) -> "SamplingSettings":
        """These settings with the fields given a value other than None replaced."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})

    def resolve(self, defaults: SamplingDefaults) -> "SamplingSettings":
        """Every unset field from `defaults`, every value checked for range."""
        g = defaults.guidance_scale if self.guidance_scale is None else float(self.guidance_scale)
        p = defaults.guidance_scale_pow if self.guidance_scale_pow is None else float(self.guidance_scale_pow)
        temp = defaults.temperature if self.temperature is None else float(self.temperature)
        check_sampling_values(g, p, temp, self.top_k, self.top_p)
        steps, schedule = check_steps(1 if self.steps is None else self.steps, self.schedule)
        steps = None if self.steps is None else steps
        return SamplingSettings(g, p, temp, None if self.top_k is None else int(self.top_k),
                                None if self.top_p is None else float(self.top_p), steps, schedule)


def resolve_settings(defaults: SamplingDefaults, guidance_scale=None, guidance_scale_pow=None, temperature=None,
                     top_k=None, top_p=None, settings: SamplingSettings | None = None, steps=None,
                     schedule=None, codebook_size: int | None = None) -> SamplingSettings:
    """`settings` (default: all unset) with the loose keywords given applied, resolved against the
    model's `defaults` and checked (top_k against `codebook_size` when given)."""
    s = with_overrides(settings, guidance_scale, guidance_scale_pow, temperature, top_k, top_p, steps,
                       schedule).resolve(defaults)
    check_top_k(s, codebook_size)
    return s


def check_top_k(s: SamplingSettings, codebook_size: int | None) -> None:
    if codebook_size is not None and s.top_k is not None and s.top_k > codebook_size:
        raise ValueError(f"top_k must be at most the codebook size {codebook_size} (it keeps the top_k most likely "
                         f"codes), got {s.top_k}.")


def with_overrides(settings: SamplingSettings | None, guidance_scale=None, guidance_scale_pow=None, temperature=None,
                   top_k=None, top_p=None, steps=None, schedule=None) -> SamplingSettings:
    """`settings` (default: all unset) with the loose keywords that are given applied over it: the
    thin keyword layer of every sampling function."""
    if settings is not None and not isinstance(settings, SamplingSettings):
        raise TypeError(f"settings must be a rar.SamplingSettings (or None), got {type(settings).__name__}; pass "
                        "SamplingSettings(guidance_scale=...) or the loose keywords guidance_scale=... instead.")
    return (settings or SamplingSettings()).overridden(
        guidance_scale=guidance_scale, guidance_scale_pow=guidance_scale_pow, temperature=temperature,
        top_k=top_k, top_p=top_p, steps=steps, schedule=schedule)


def check_plan(model, settings: SamplingSettings | None, order) -> SamplingSettings:
    """The resolved settings, with their steps and `order` checked against the model, before any
    work: what the file front-ends call first."""
    s = (settings or SamplingSettings()).resolve(model.sampling)
    check_top_k(s, model.config.codebook_size)
    check_steps(s.steps or model.config.num_tokens, s.schedule, model.config.num_tokens)
    generation_order(order, model, "cpu")
    return s


def decode_orders(order, model, device, batch_size: int, seed: int, indices, steps: int):
    """(B, T) generation orders and, for `wavefront`, the pass at which each raster position is due
    (T,) (else None): `random` draws one order per sample from (seed, index)."""
    T = model.config.num_tokens
    if isinstance(order, str) and order == "random":
        return random_orders(seed, indices, T, device), None
    if isinstance(order, str) and order == "wavefront":
        return wavefront_order(model.config.grid_size, steps).to(device).expand(batch_size, T), \
            wavefront_times(model.config.grid_size, steps).to(device)
    return generation_order(order, model, device, batch_size).expand(batch_size, T), None


def resolve_seeds(seed, generator: torch.Generator | None, batch_size: int):
    """`resolve_seed` for one seed, or a list of `batch_size` checked seeds (one per sample)."""
    if isinstance(seed, (list, tuple)) or (torch.is_tensor(seed) and seed.ndim == 1):
        seeds = [resolve_seed(int(s) if torch.is_tensor(s) else s, None) for s in seed]
        if len(seeds) != batch_size:
            raise ValueError(f"seed has {len(seeds)} values for {batch_size} samples; give one seed, or one per sample.")
        return seeds
    return resolve_seed(seed, generator)


def sample_uniforms(seed, indices, num_tokens: int, device) -> torch.Tensor:
    """(B, T) uniforms of samples `indices`, each from its own generator seeded by (seed, index);
    `seed` is one integer or one per sample (`row_seeds`)."""
    return torch.stack([torch.rand(num_tokens, generator=torch.Generator().manual_seed(mix_seed(s, i)))
                        for s, i in zip(row_seeds(seed, len(indices)), indices)]).to(device)


@torch.inference_mode()
def generate(model: RAR | DecodeBackend, labels, *, settings: SamplingSettings | None = None,
             seed=None, generator: torch.Generator | None = None, indices=None, order=None,
             progress: bool = False, pack_weights: bool = True, guidance_scale: float | None = None,
             guidance_scale_pow: float | None = None, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, steps: int | None = None, schedule: str | None = None) -> torch.Tensor:
    """Sample image tokens (B, T) in raster layout for class `labels` (B,).

    `model` is the `DecodeBackend` of `rar.prepare(model)`, or a `rar.RAR`, which is then prepared
    on every call (folding adaLN and laying out every weight: about a second for RAR-B on a 2-core
    CPU; prepare once when sampling several batches). `settings` (`SamplingSettings`; the loose
    keywords guidance_scale ... schedule override its fields): unset values come from the model's
    preset. A guidance scale of 0 or 1 runs no unconditional rows. `order`: None (raster), a
    scan-order name, `random` (one order per sample from its seed), `wavefront`, a permutation
    (T,) or one per sample (B, T). `steps` (default T): network passes; fewer decode several
    tokens per pass in groups of sizes following `schedule` (`rar.inference.parallel`).
    Randomness: `seed` (or one integer drawn from `generator`) and each sample's index
    (`indices`, default 0..B-1) fix its tokens, whatever the batch; `seed` may also be one integer
    per sample, so that requests of several users decode as one batch and each gets exactly the
    tokens of a lone call with its own seed. `pack_weights=False` decodes a
    model with its own linears and torch's attention (the reference path; slower on CPU).
    """
    backend = as_backend(model, packed=pack_weights)
    labels = check_labels(labels, backend.config.num_classes, backend.device)
    s = resolve_settings(backend.sampling, guidance_scale, guidance_scale_pow, temperature, top_k, top_p, settings,
                         steps, schedule, backend.config.codebook_size)
    B, T = labels.shape[0], backend.config.num_tokens
    n_steps, _ = check_steps(s.steps or T, s.schedule, T)
    seed, indices = resolve_seeds(seed, generator, B), check_indices(indices, B)
    orders, times = decode_orders(order, backend, labels.device, B, seed, indices, n_steps)
    uniforms = sample_uniforms(seed, indices, T, labels.device)  # (B, T)
    scales = guidance_schedule(s.guidance_scale, s.guidance_scale_pow, T).to(labels.device).expand(B, T)
    if n_steps == T:
        return run_decoder(backend, labels, orders, s, uniforms, scales, progress=progress)
    sizes = row_groups(orders, torch.zeros(B, dtype=torch.long), n_steps, s.schedule, times if s.schedule is None else None)
    return run_parallel(backend, labels, orders, s, uniforms, scales, sizes, progress=progress)


def run_decoder(backend: DecodeBackend, labels: torch.Tensor, orders: torch.Tensor, s: SamplingSettings,
                uniforms: torch.Tensor, scales: torch.Tensor, *, kept: torch.Tensor | None = None,
                tokens: torch.Tensor | None = None, forced: torch.Tensor | None = None,
                progress: bool = False) -> torch.Tensor:
    """The sampling loop shared by `generate` and `rar.edit`: labels (B,), orders (B, T). Row b feeds
    its first kept[b] tokens (from tokens (B, T), raster layout) in one prefill, then draws its
    j-th token (at orders[b, kept[b] + j]) with uniform uniforms[b, j] and guidance scale
    scales[b, j]; where forced[b, j] (teacher forcing) the token comes from `tokens` instead.
    Returns (B, T) raster layout; tokens the loop does not reach stay as in `tokens`."""
    B, T = orders.shape
    kept = torch.zeros(B, dtype=torch.long, device=orders.device) if kept is None else kept
    guided = s.guided
    rows, twice = with_unconditional(labels, backend.config.null_label, guided)  # (R,)
    dec = CachedDecoder(backend, rows, twice(orders), twice(kept))
    out = torch.empty(B, T, dtype=torch.long, device=orders.device) if tokens is None else tokens.clone()
    logits = dec.prefill(twice(tokens))  # (R, V)
    finite = torch.ones((), dtype=torch.bool, device=orders.device)  # checked once at the end: no sync per step
    num_steps = T - int(kept.min())
    steps = range(num_steps)
    if progress:
        steps = tqdm(steps, desc="sampling", unit="tok", leave=False)
    for j in steps:
        finite &= torch.isfinite(logits).all()
        if guided:
            logits = guide(logits, scales[:, j:j + 1])
        tok = draw(logits / s.temperature, s.top_k, s.top_p, uniforms[:, j])  # (B,)
        index = kept + j  # (B,) each row's index in its order; past T - 1 the row is done
        where = orders.gather(1, index.clamp(max=T - 1)[:, None])  # (B, 1) raster positions
        if forced is not None:
            tok = torch.where(forced[:, j], tokens.gather(1, where)[:, 0], tok)
        done = (index >= T)[:, None]
        out.scatter_(1, where, torch.where(done, out.gather(1, where), tok[:, None]))
        if j + 1 < num_steps:
            logits = dec.step(twice(tok), j)
    raise_if_not_finite(finite)
    return out


@torch.inference_mode()
def cached_logits(model: RAR | DecodeBackend, tokens: torch.Tensor, labels: torch.Tensor, order=None,
                  kept=None) -> torch.Tensor:
    """Teacher-forced cached decoding: the (B, T, V) logits the sampler sees at each step when the
    given tokens are fed, in `order` ((T,) or per sample (B, T)). Equals `model(tokens, labels,
    orders)` (tests hold the two together). With kept (B,), each row's first kept[b] tokens are fed
    by the one-pass prefill (the editing path) and the rest by decode steps. A model is decoded
    with its own linears (`prepare(model, packed=False)`); pass a backend to check another."""
    backend = as_backend(model, packed=False)
    tokens = check_tokens(tokens, backend.config, backend.device)
    B, T = tokens.shape
    labels = check_labels(labels, backend.config.num_classes, backend.device, B)
    if isinstance(order, str) and order in STEP_ORDERS:
        raise ValueError(f"order {order!r} is made per sampling call; give cached_logits the (B, T) orders themselves.")
    orders = generation_order(order, backend, tokens.device, B).expand(B, T)
    kept = torch.zeros(B, dtype=torch.long, device=tokens.device) if kept is None else torch.as_tensor(kept)
    if kept.shape != (B,) or kept.is_floating_point() or bool((kept < 0).any() | (kept > T).any()):
        raise ValueError(f"kept must be ({B},) integer counts of known tokens in [0, {T}], got {kept.tolist()}.")
    kept = kept.long().to(tokens.device)
    dec = CachedDecoder(backend, labels, orders, kept)
    pre = dec.prefill(tokens, all_logits=True)  # (B, K_max + 2, V); slot s of row b is its position s - offset
    # order index j is predicted at position j + 1 (clamped: past a row's last known token it is unused)
    slots = (dec.offsets[:, None] + torch.arange(1, dec.k_max + 2, device=tokens.device)).clamp(max=pre.shape[1] - 1)
    out = [pre.gather(1, slots[..., None].expand(-1, -1, pre.shape[-1]))]  # (B, K_max + 1, V)
    for j in range(T - 1 - int(kept.min())):
        i = (kept + j).clamp(max=T - 1)[:, None]
        out.append(dec.step(tokens.gather(1, orders.gather(1, i))[:, 0], j)[:, None])
    # Row b's logits for order index i: from the prefill while i <= kept[b], then from step i - kept[b] - 1.
    stacked = torch.cat(out, dim=1)  # (B, K_max + 1 + steps, V)
    i = torch.arange(T, device=tokens.device)[None]
    src = torch.where(i <= kept[:, None], i, dec.k_max + i - kept[:, None])  # (B, T)
    return stacked.gather(1, src[..., None].expand(-1, -1, stacked.shape[-1]))  # (B, T, V)
