"""Likelihood in any order and generative classification.

A RAR model trained on permuted orders (paper Sec. 3.2) defines, for every factorization order o,
a distribution p_o(x | c) = prod_j p(x[o_j] | c, x[o_<j]). `log_likelihood` scores images under
one order or several, by teacher-forced forward passes (one per image and order, batched):

- per order, the negative log-likelihood in nats per token, NLL_o = -log p_o(x | c) / T;
- over K orders, either their mean (`reduction="mean"`): the permutation objective the model was
  trained on, an upper bound on the mixture's NLL by Jensen's inequality; or the NLL of the
  uniform mixture of the K orders' distributions (`reduction="mixture"`, the default), a proper
  likelihood: -(log mean_o p_o(x | c)) / T = -(logsumexp_o(-T NLL_o) - log K) / T.
  With one order the two agree. `reduction="none"` returns the (B, K) per-order values.

Guidance does not apply: the scores are the model's own conditional (or, with the null label,
unconditional) distribution. `classify` turns log p(x | c) for every class into posteriors.
The model's train/eval mode is left as it was (scores are computed in eval mode, no dropout).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from ..core.checks import check_counts, check_labels, check_tokens
from ..core.seeds import resolve_seed
from ..model.orders import is_permutation, named_order
from ..model.transformer import RAR

REDUCTIONS = ("mixture", "mean", "none")


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """Eval mode (no dropout) for the duration, the caller's mode restored after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def likelihood_orders(orders, num_orders: int, seed: int, batch: int, model: RAR) -> torch.Tensor:
    """(B, K, T) orders from "raster", a scan-order name, "random" (`num_orders` permutations
    drawn from `seed`, the same for every image), or explicit (K, T) / (B, K, T) permutations."""
    cfg, device = model.config, next(model.parameters()).device
    T = cfg.num_tokens
    if isinstance(orders, str):
        if orders == "random":
            if isinstance(num_orders, bool) or int(num_orders) != num_orders or num_orders < 1:
                raise ValueError(f"num_orders must be a positive integer, got {num_orders!r}.")
            g = torch.Generator().manual_seed(resolve_seed(seed, None))  # an integer >= 0, never truncated
            orders = torch.rand(int(num_orders), T, generator=g).argsort(1)  # (K, T)
        else:
            orders = named_order(orders, cfg.grid_size)[None]  # (1, T)
    orders = torch.as_tensor(orders)
    if orders.ndim == 2:
        orders = orders[None].expand(batch, -1, -1)
    if orders.ndim != 3 or orders.shape[0] != batch or orders.shape[2] != T or orders.shape[1] == 0:
        raise ValueError(f"orders must be a name, 'random', or permutations of shape (K, {T}) or ({batch}, K, {T}), "
                         f"got shape {tuple(orders.shape)}.")
    if orders.is_floating_point() or not is_permutation(orders):
        raise ValueError(f"every order must be a permutation of 0..{T - 1}.")
    return orders.to(device).long()


def default_batch_size(model: RAR) -> int:
    """Rows per forward pass: about 2^25 floats of the widest activation or of the logits."""
    cfg = model.config
    return max(1, 2**25 // (cfg.num_tokens * max(cfg.codebook_size, cfg.mlp_size)))


@torch.inference_mode()
def order_nll(model: RAR, tokens: torch.Tensor, labels: torch.Tensor, orders: torch.Tensor,
              batch_size: int | None = None) -> torch.Tensor:
    """Per-token log-likelihoods of tokens (B, T) with labels (B,) under orders (B, K, T):
    (B, K, T) log p(x[o_j] | c, x[o_<j]), position j in the order's sequence."""
    B, K, T = orders.shape
    rows = batch_size or default_batch_size(model)
    flat_t = tokens.repeat_interleave(K, 0)  # (B*K, T)
    flat_l = labels.repeat_interleave(K, 0)
    flat_o = orders.reshape(B * K, T)
    out = []
    with evaluating(model):
        for s in range(0, B * K, rows):
            t, o = flat_t[s:s + rows], flat_o[s:s + rows]
            logp = F.log_softmax(model(t, flat_l[s:s + rows], o).float(), dim=-1)  # (r, T, V)
            out.append(logp.gather(-1, t.gather(1, o)[..., None])[..., 0])  # (r, T)
    return torch.cat(out).view(B, K, T)


def _check_model_and_batch(model, batch_size) -> None:
    if not isinstance(model, RAR):
        raise TypeError(f"model must be a rar.RAR (likelihoods need the training-time forward, not a prepared decode "
                        f"backend), got {type(model).__name__}.")
    if batch_size is not None:
        check_counts(batch_size=batch_size)


def log_likelihood(model: RAR, tokens, labels, *, orders="raster", num_orders: int = 1, seed: int = 0,
                   batch_size: int | None = None, reduction: str = "mixture") -> torch.Tensor:
    """Negative log-likelihood in nats per token of each image (B,) (see the module docstring):
    tokens (B, T) raster layout, labels (B,) (the null label `num_classes` = unconditional)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    _check_model_and_batch(model, batch_size)
    tokens = check_tokens(tokens, model.config, next(model.parameters()).device)
    labels = check_labels(labels, model.config.num_classes, tokens.device, tokens.shape[0])
    o = likelihood_orders(orders, num_orders, seed, tokens.shape[0], model)  # (B, K, T)
    nll = -order_nll(model, tokens, labels, o, batch_size).mean(-1)  # (B, K) nats per token
    if reduction == "none":
        return nll
    if reduction == "mean":
        return nll.mean(1)
    T, K = tokens.shape[1], nll.shape[1]
    return -(torch.logsumexp(-T * nll.double(), dim=1) - math.log(K)).float() / T


def classify(model: RAR, tokens, *, orders="raster", num_orders: int = 1, seed: int = 0,
             batch_size: int | None = None, prior=None) -> torch.Tensor:
    """Class posteriors p(c | x) (B, C) from log p(x | c) for every class c (the mixture over
    `orders`, the same orders for every class), batched over classes, with a uniform prior unless
    `prior` (C,) is given."""
    _check_model_and_batch(model, batch_size)
    tokens = check_tokens(tokens, model.config, next(model.parameters()).device)
    B, C = tokens.shape[0], model.config.num_classes
    o = likelihood_orders(orders, num_orders, seed, B, model)  # (B, K, T)
    labels = torch.arange(C, device=tokens.device).repeat(B)  # (B*C,)
    nll = log_likelihood(model, tokens.repeat_interleave(C, 0), labels, orders=o.repeat_interleave(C, 0),
                         batch_size=batch_size)  # (B*C,)
    logp = -nll.view(B, C) * tokens.shape[1]  # log p(x | c)
    if prior is not None:
        prior = torch.as_tensor(prior, dtype=torch.float32, device=logp.device)
        if prior.shape != (C,) or not torch.isfinite(prior).all() or (prior < 0).any() or not prior.sum() > 0:
            raise ValueError(f"prior must be ({C},) finite non-negative class weights with a positive sum, got "
                             + (f"shape {tuple(prior.shape)}." if prior.shape != (C,) else f"{prior.tolist()[:12]}."))
        logp = logp + torch.log(prior / prior.sum())
    return logp.softmax(-1)
