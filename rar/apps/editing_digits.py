"""Editing measured on the digits: for each task (a part of the token grid missing), the raster
baseline against kept-first any-order decoding, with the true label and unconditionally, scored
by the demo's digit classifier (does the completion show the digit's true class?) and by the
Fréchet distance in its features against the held-out digits (not FID).

Tasks on the g x g token grid of each held-out digit (g = 8 for the demo):
  top_half, bottom_half, left_half   that half missing;
  centre_square                      the central (g/sqrt 2)^2 square missing (half the area, rounded);
  random_half                        half the tokens missing, drawn per digit (seeded);
  outpaint_right                     the right quarter missing: one window of
                                     `rar outpaint --extend right:g/4`, scored against the true digit.
Completions are scored as decoded (no pixels pasted back), so only the tokens count.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.seeds import mix_seed
from ..data.images import save_grid, to_uint8
from ..decode.backend import DecodeBackend, prepare
from ..inference.editing import edit
from ..inference.image_editing import pixel_mask
from ..metrics.digits import DigitClassifier, decode_uint8, predict_digits, score

TASKS = ("top_half", "bottom_half", "left_half", "centre_square", "random_half", "outpaint_right")


def task_keep(task: str, grid: int, n: int, seed: int = 0) -> torch.Tensor:
    """(n, grid * grid) bool keep masks (True = known) of a task."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    if task == "top_half":
        missing = rows < grid // 2
    elif task == "bottom_half":
        missing = rows >= grid - grid // 2
    elif task == "left_half":
        missing = cols < grid // 2
    elif task == "centre_square":
        side = round(grid / math.sqrt(2))
        lo = (grid - side) // 2
        missing = (rows >= lo) & (rows < lo + side) & (cols >= lo) & (cols < lo + side)
    elif task == "outpaint_right":
        missing = cols >= grid - max(1, grid // 4)
    elif task == "random_half":
        g = torch.Generator().manual_seed(mix_seed(seed, 7))
        scores = torch.rand(n, grid * grid, generator=g)
        missing = scores.argsort(1).argsort(1) < grid * grid // 2  # exactly half per digit
        return ~missing
    else:
        raise ValueError(f"unknown editing task {task!r}; expected one of {', '.join(TASKS)}.")
    return (~missing).flatten().expand(n, -1).clone()


def digit_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 digits (N, H, W) -> float (N, 3, H, W) in [0, 1] (grey replicated, as tokenized)."""
    x = torch.from_numpy(np.asarray(images)).float() / 255.0
    return x[:, None].expand(-1, 3, -1, -1).contiguous() if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


CHUNK = 500  # images per tokenizer call


@torch.inference_mode()
def encode_digits(tokenizer, images: np.ndarray, device=None) -> torch.Tensor:
    """uint8 digits (N, H, W) -> their tokens (N, T), in chunks of `CHUNK` images."""
    x = digit_tensor(images)
    return torch.cat([tokenizer.encode(x[s:s + CHUNK].to(device)) for s in range(0, len(x), CHUNK)])


@torch.inference_mode()
def complete(backend: DecodeBackend, tokenizer, codes: torch.Tensor, keep: torch.Tensor, labels: torch.Tensor, *,
             batch_size: int = 250, seed: int = 0, **edit_kwargs) -> np.ndarray:
    """Completions of `codes` (N, T) as uint8 images (N, H, W, 3), sample i drawn with (seed, i)."""
    out = []
    for s in range(0, len(codes), batch_size):
        idx = range(s, min(s + batch_size, len(codes)))
        tok = edit(backend, codes[s:idx.stop], keep[s:idx.stop], labels[s:idx.stop], seed=seed, indices=idx,
                   **edit_kwargs)
        out.append(decode_uint8(tokenizer, tok))
    return np.concatenate(out)


def evaluate_editing(generator, tokenizer, classifier: DigitClassifier, images: np.ndarray, labels: np.ndarray, *,
                     tasks=TASKS, methods=("raster", "kept_first"), conditions=("conditional", "unconditional"),
                     schedules=("generated",), seed: int = 0, batch_size: int = 250, progress: bool = False,
                     **sampling) -> dict:
    """Scores of every (task, method, condition, schedule) on held-out digits (N, H, W) uint8 with
    labels (N,): {"reference": scores of the tokenizer's reconstructions, "results": [rows]}; each
    row holds task, method, condition, schedule, accuracy, fd and seconds."""
    backend = generator if isinstance(generator, DecodeBackend) else prepare(generator)
    grid, null = backend.config.grid_size, backend.config.num_classes
    codes = encode_digits(tokenizer, images, backend.device)  # (N, T)
    heldout_pred, heldout_feat = predict_digits(classifier, images)
    recon = decode_uint8(tokenizer, codes)
    out = {"num": int(len(images)), "reference": {"heldout_accuracy": float((heldout_pred == labels).mean()),
                                                  **{f"reconstruction_{k}": v for k, v in
                                                     score(classifier, recon, labels, heldout_feat).items()}},
           "results": []}
    truth = torch.as_tensor(labels, device=backend.device).long()
    combos = [(t, m, c, s) for t in tasks for m in methods for c in conditions for s in schedules
              if not (c == "unconditional" and s != schedules[0])]  # no guidance without a class: one schedule
    for task, method, cond, sched in tqdm(combos, desc="editing tasks", disable=not progress, leave=False):
        keep = task_keep(task, grid, len(codes), seed).to(backend.device)
        lab = truth if cond == "conditional" else torch.full_like(truth, null)
        t0 = time.perf_counter()
        done = complete(backend, tokenizer, codes, keep, lab, batch_size=batch_size, seed=seed,
                        kept_first=method == "kept_first", schedule_over=sched, **sampling)
        out["results"].append({"task": task, "method": method, "condition": cond, "schedule": sched,
                               **score(classifier, done, labels, heldout_feat),
                               "seconds": round(time.perf_counter() - t0, 2)})
    return out


def class_edit(backend: DecodeBackend, tokenizer, classifier: DigitClassifier, images: np.ndarray, labels: np.ndarray,
               *, task: str = "top_half", seed: int = 0, batch_size: int = 250, **sampling) -> dict:
    """Class-conditional editing: each digit's `task` part regenerated with the class (c + 1) mod 10;
    the share the classifier then reads as that class, for the raster baseline and kept-first."""
    codes = encode_digits(tokenizer, images, backend.device)
    target = (np.asarray(labels) + 1) % 10
    keep = task_keep(task, backend.config.grid_size, len(codes), seed).to(backend.device)
    lab = torch.as_tensor(target, device=backend.device).long()
    out = {}
    for method in ("raster", "kept_first"):
        done = complete(backend, tokenizer, codes, keep, lab, batch_size=batch_size, seed=seed,
                        kept_first=method == "kept_first", **sampling)
        out[method] = float((predict_digits(classifier, done)[0] == target).mean())
    return out


@torch.inference_mode()
def editing_figure(backend: DecodeBackend, tokenizer, images: np.ndarray, labels: np.ndarray, path, *,
                   task: str = "top_half", seed: int = 0) -> None:
    """editing.png: one held-out digit per class in columns; rows: original, masked (grey = to
    regenerate), raster baseline, kept-first (true class), kept-first with class (c + 1) mod 10."""
    pick = [int(np.flatnonzero(np.asarray(labels) == c)[0]) for c in range(10) if (np.asarray(labels) == c).any()]
    x = digit_tensor(images[pick]).to(backend.device)
    codes = tokenizer.encode(x)
    grid, f = backend.config.grid_size, x.shape[-1] // backend.config.grid_size
    keep = task_keep(task, grid, len(pick), seed).to(backend.device)
    pixels = pixel_mask(keep.view(-1, 1, grid, grid), f)  # (n, 1, H, W)
    truth = torch.as_tensor(np.asarray(labels)[pick], device=backend.device).long()
    rows = [to_uint8(x), to_uint8(torch.where(pixels, x, torch.full_like(x, 0.5)))]
    for kept_first, lab in ((False, truth), (True, truth), (True, (truth + 1) % 10)):
        tok = edit(backend, codes, keep, lab, seed=seed, indices=pick, kept_first=kept_first)
        rows.append(to_uint8(tokenizer.decode(tok).float()))
    save_grid(np.concatenate(rows), path, nrow=len(pick))


def format_table(res: dict) -> str:
    """The results as a markdown table: one row per task, accuracy / FD per method and condition."""
    rows = res["results"]
    keys = list(dict.fromkeys((r["method"], r["condition"], r["schedule"]) for r in rows))
    head = "| task | " + " | ".join(f"{m} {c[:6]}." + (f" ({s})" if len({k[2] for k in keys}) > 1 else "")
                                     for m, c, s in keys) + " |"
    lines = [head, "|---" * (len(keys) + 1) + "|"]
    for task in dict.fromkeys(r["task"] for r in rows):
        cells = []
        for k in keys:
            r = next((r for r in rows if (r["task"], r["method"], r["condition"], r["schedule"]) == (task, *k)), None)
            cells.append("-" if r is None else f"{100 * r['accuracy']:.1f}% / {r['fd']:.2f}")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    ref = res["reference"]
    lines.append(f"\nAccuracy / FD (in the digit classifier's features, not FID) over {res['num']} held-out digits. "
                 f"Reference: the tokenizer's reconstructions of the whole digits, {100 * ref['reconstruction_accuracy']:.1f}% "
                 f"/ {ref['reconstruction_fd']:.2f}; the classifier on the held-out digits themselves "
                 f"{100 * ref['heldout_accuracy']:.1f}%.")
    return "\n".join(lines)
