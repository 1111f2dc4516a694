"""Checks of user input shared by every layer: each failure is a ValueError of one sentence that
names the input, the value and what was expected."""
from __future__ import annotations

import math
import warnings

import torch

from .seeds import whole_number

# Temperatures: below GREEDY_TEMPERATURE the draw is practically an argmax (a warning); below
# MIN_TEMPERATURE logits / temperature can overflow float32 and the draws degenerate (refused).
GREEDY_TEMPERATURE = 0.05
MIN_TEMPERATURE = 1e-6


def check_counts(**counts) -> None:
    """Each keyword must be a positive integer (numbers of samples, batch sizes, ...): a ValueError
    naming the first that is not."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def finite(value) -> bool:
    """A real number (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_probability(name: str, value) -> None:
    """`value` in [0, 1) (dropout rates and the like)."""
    if not (finite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}.")


def check_sampling_values(guidance_scale: float, guidance_scale_pow: float, temperature: float,
                          top_k=None, top_p=None, owner: str = "") -> None:
    """The ranges of the sampling settings, wherever they are set (a preset's defaults, a call's
    arguments, a sample file's settings); `owner` prefixes each name in the message."""
    for name, value in (("guidance_scale", guidance_scale), ("guidance_scale_pow", guidance_scale_pow),
                        ("temperature", temperature)):
        if not finite(value):
            raise ValueError(f"{owner}{name} must be a finite number, got {value!r}.")
    if temperature <= 0:
        raise ValueError(f"{owner}temperature must be positive, got {temperature}.")
    if temperature < MIN_TEMPERATURE:  # logits / temperature overflow float32: the draws turn into NaN
        raise ValueError(f"{owner}temperature must be at least {MIN_TEMPERATURE:g}, got {temperature:g}; for greedy "
                         "decoding use top_k=1.")
    if temperature < GREEDY_TEMPERATURE:
        warnings.warn(f"{owner}temperature {temperature:g} is below {GREEDY_TEMPERATURE:g}: sampling is practically "
                      "greedy, so the samples of a class will be (nearly) alike; top_k=1 says so explicitly.",
                      stacklevel=2)
    if guidance_scale_pow < 0:
        raise ValueError(f"{owner}guidance_scale_pow must be non-negative, got {guidance_scale_pow}.")
    if top_k is not None and (isinstance(top_k, bool) or not finite(top_k) or int(top_k) != top_k or top_k < 1):
        raise ValueError(f"{owner}top_k must be a positive integer (or unset), got {top_k!r}.")
    if top_p is not None and not (finite(top_p) and 0 < float(top_p) <= 1):
        raise ValueError(f"{owner}top_p must be in (0, 1] (or unset), got {top_p!r}.")


def check_label_ids(labels: torch.Tensor, num_classes: int) -> None:
    """labels: a non-empty 1-D integer tensor of class ids in [0, num_classes] (num_classes = no class)."""
    if labels.ndim != 1 or labels.numel() == 0:
        raise ValueError(f"labels must be a non-empty 1-D tensor of class ids, got shape {tuple(labels.shape)}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class ids, got a {str(labels.dtype).removeprefix('torch.')} tensor.")
    bad = (labels < 0) | (labels > num_classes)
    if bad.any():
        raise ValueError(f"class id {int(labels[bad][0])} is outside [0, {num_classes}] "
                         f"({num_classes} = no class).")


def check_labels(labels, num_classes: int, device, batch: int | None = None) -> torch.Tensor:
    """labels as a (B,) int64 tensor on `device`, checked for shape and range; with `batch`, B must equal it."""
    try:
        labels = torch.as_tensor(labels, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"labels must be class ids (a list or a 1-D integer tensor), got {str(labels)[:60]!r}.") from None
    check_label_ids(labels, num_classes)
    if batch is not None and labels.shape != (batch,):
        raise ValueError(f"labels must be ({batch},) integer class ids, one per image, got shape {tuple(labels.shape)}.")
    return labels.long()


def check_tokens(tokens, config, device, known: torch.Tensor | None = None) -> torch.Tensor:
    """tokens as a non-empty (B, T) int64 tensor on `device`, T = config.num_tokens, with codes in
    [0, config.codebook_size); with `known` (B, T) bool only those positions are checked (editing:
    unknown positions may hold anything, e.g. -1)."""
    T, V = config.num_tokens, config.codebook_size
    try:
        tokens = torch.as_tensor(tokens, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"tokens must be a (B, {T}) integer tensor of codes, got {str(tokens)[:60]!r}.") from None
    if tokens.ndim != 2 or tokens.shape[1] != T or tokens.shape[0] == 0:
        raise ValueError(f"tokens must be a non-empty (B, T) tensor with T = {T} (the model's num_tokens), "
                         f"got shape {tuple(tokens.shape)}.")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be integer codes, got a {str(tokens.dtype).removeprefix('torch.')} tensor.")
    tokens = tokens.long()  # (shards store uint16, which has no comparisons on CPU)
    bad = (tokens < 0) | (tokens >= V)
    if known is not None:
        bad &= known
    if bad.any():
        raise ValueError(f"{'kept ' if known is not None else ''}token {int(tokens[bad][0])} is outside the codebook "
                         f"[0, {V}).")
    return tokens


def check_indices(indices, batch_size: int) -> list[int]:
    """Sample indices (default 0..B-1), one per sample."""
    if indices is None:
        return list(range(batch_size))
    try:
        items = list(indices)
    except TypeError:
        items = None
    values = [whole_number(i) for i in items] if items is not None else [None]
    if any(v is None or v < 0 for v in values):
        raise ValueError(f"indices must be one integer >= 0 per sample (a list or range), got {str(indices)[:60]!r}.")
    indices = values
    if len(indices) != batch_size:
        raise ValueError(f"indices has {len(indices)} entries for {batch_size} samples; give one index per sample.")
    return list(indices)


def check_tokenizer_fits(target: str, codebook_size: int, num_tokens: int, tokenizer: str,
                         tokenizer_codebook: int, tokenizer_tokens: int) -> None:
    """A generator (or token shards, the `target`, e.g. "generator 'runs/x'") and a tokenizer work
    together only with the same codebook and the same number of tokens per image; checked when both
    are known, before any work (never after sampling or training)."""
    if (codebook_size, num_tokens) != (tokenizer_codebook, tokenizer_tokens):
        raise ValueError(f"{tokenizer} (codebook {tokenizer_codebook}, {tokenizer_tokens} tokens per image) does not "
                         f"fit {target} (codebook {codebook_size}, {num_tokens} tokens per image); use the tokenizer "
                         "that made its tokens.")


def check_pair(model, vq, generator_name: str = "", tokenizer_name: str = "") -> None:
    """`check_tokenizer_fits` for a loaded generator (or decode backend) and tokenizer."""
    g, t = model.config, vq.config
    check_tokenizer_fits(f"the generator {generator_name}".rstrip(), g.codebook_size, g.num_tokens,
                         f"the tokenizer {tokenizer_name}".rstrip(), t.codebook_size, t.num_tokens)
