"""The draw of one token per row from guided logits: top-k / top-p filtering and inverse-CDF
sampling with each row's own uniform (so a sample depends only on its seed and index)."""
from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Keep the top-k logits and/or the smallest set whose probability reaches top_p; the rest -inf."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits



def draw(logits: torch.Tensor, top_k: int | None, top_p: float | None, u: torch.Tensor) -> torch.Tensor:
    """One token per row by inverse-CDF sampling with the row's own uniform u (B,)."""
    if top_k == 1:
        return logits.argmax(-1)
    probs = filter_logits(logits, top_k, top_p).softmax(-1)  # (B, V)
    cdf = probs.cumsum(-1)
    tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    return tok.clamp_max(logits.shape[-1] - 1)


def with_unconditional(labels: torch.Tensor, null_label: int, guided: bool):
    """The decoder's rows for classifier-free guidance: (labels then as many null labels, a function
    that doubles any per-row tensor alike, None staying None); without guidance the labels as they are."""
    if not guided:
        return labels, lambda t: t
    return torch.cat([labels, torch.full_like(labels, null_label)]), lambda t: None if t is None else torch.cat([t, t])


def guide(logits: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Guided logits u + (c - u) * scale from the (2B, ...) logits of `with_unconditional`'s rows."""
    B = logits.shape[0] // 2
    cond, uncond = logits[:B], logits[B:]
    return uncond + (cond - uncond) * scale


def raise_if_not_finite(finite: torch.Tensor) -> None:
    """The sampling loops' one check, at the end (no sync per step), that every logit was finite."""
    if not finite:
        raise FloatingPointError("the model produced non-finite logits (NaN or inf) while sampling, so the tokens "
                                 "would be meaningless; check that its weights are finite.")
