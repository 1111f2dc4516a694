"""Sampling to files: class ids or names -> tokens -> images on disk (what `rar sample` does)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.checks import check_counts, check_pair
from ..core.devices import check_memory, resolve_device
from ..core.files import check_not_empty, check_outputs, ensure_writable_dir
from ..data.images import save_grid, save_images, to_uint8
from ..decode.backend import DecodeBackend, prepare
from ..inference.refinement import RefineSettings, apply_refine
from ..inference.sampler import SamplingSettings, check_plan, generate, generation_order
from ..model.config import get_preset
from ..model.weights import check_sizes, load_generator
from ..tokenizer.vqgan import load_any_tokenizer
from .classes import class_names_of, parse_classes, read_class_names


def sample_batches(backend: DecodeBackend, labels: torch.Tensor, indices: range, *, settings: SamplingSettings,
                   seed: int, batch_size: int, order=None, refine: RefineSettings | None = None, tokenizer=None,
                   bar=None) -> Iterator[tuple[range, torch.Tensor, torch.Tensor | None]]:
    """The sampling loop of `rar sample` and `rar sample-eval`: samples `indices` (labels (n,)) in
    batches of `batch_size`, each refined when `refine` is active and decoded to float images in
    [0, 1] by `tokenizer` when given. Yields (indices, tokens (b, T), images (b, 3, H, W) or None)."""
    for s in range(0, len(indices), batch_size):
        idx, lab = indices[s:s + batch_size], labels[s:s + batch_size]
        tokens = generate(backend, lab, settings=settings, seed=seed, indices=idx, order=order)
        tokens = apply_refine(backend, tokens, lab, refine, seed=seed, indices=idx, sampling=settings)
        images = None
        if tokenizer is not None:
            with torch.inference_mode():
                images = tokenizer.decode(tokens).float()
        if bar is not None:
            bar.update(len(idx))
        yield idx, tokens, images


def sample_to_folder(generator_path, out_dir, *, classes: str = "0", class_names=None, num_per_class: int = 4,
                     seed: int = 0, tokenizer=None, preset: str | None = None, batch_size: int = 16,
                     device: str = "cpu", dtype: str = "float32", progress: bool = True,
                     refine: RefineSettings | None = None, settings: SamplingSettings | None = None,
                     order=None, overwrite: bool = False) -> str:
    """Sample `num_per_class` images of each class; writes tokens.npy, labels.npy and, with a
    tokenizer, grid.png (one row per class) and images/NNNNN_class-C.png. Returns a summary line.
    Every argument is checked, and the output folder made writable, before any sampling; files
    that exist there are replaced only with `overwrite`."""
    check_counts(num_per_class=num_per_class, batch_size=batch_size)
    device = resolve_device(device)
    model = load_generator(generator_path).to(device=device, dtype=getattr(torch, dtype))  # our own copy
    defaults = model.sampling
    if preset:  # the generator must have the preset's sizes; its tuned settings fill unset ones
        chosen = get_preset(preset)
        check_sizes(chosen.config, model.config, f"generator {str(generator_path)!r}")
        defaults = chosen.sampling
    order = generation_order(order, model, device)  # a bad order fails before any work
    settings = (settings or SamplingSettings()).resolve(defaults)  # bad values fail here
    check_plan(model, settings, order)
    names = read_class_names(class_names, model.config.num_classes) if class_names else class_names_of(generator_path, model.config.num_classes)
    ids = parse_classes(classes, model.config.num_classes, names)
    vq = None if tokenizer is None else load_any_tokenizer(tokenizer).to(device).eval()
    if vq is not None:
        check_pair(model, vq, repr(str(generator_path)), repr(str(tokenizer)))
    per_image = model.config.num_tokens * 8 + (5 * 3 * vq.config.resolution ** 2 if vq is not None else 0)
    n = len(ids) * num_per_class
    check_memory(n * per_image, "cpu", f"keeping {n} samples (tokens and images) until they are written",
                 "use fewer classes or a smaller --num-per-class, or rar sample-eval (written in chunks)")
    labels = torch.tensor(ids).repeat_interleave(num_per_class)  # (N,)
    files = [f"images/{i:05d}_class-{int(c)}.png" for i, c in enumerate(labels)] + ["grid.png"] if vq is not None else []
    check_not_empty(out_dir, "output folder")
    check_outputs([Path(out_dir) / f for f in ["tokens.npy", "labels.npy", *files]], overwrite=overwrite,
                  inputs=[generator_path, tokenizer])
    out = ensure_writable_dir(out_dir, "output folder")
    backend = prepare(model)  # once, not per batch
    tokens, images, t0 = [], [], time.perf_counter()
    with tqdm(total=len(labels), desc="sample", unit="img", disable=not progress) as bar:
        for _, tok, pics in sample_batches(backend, labels, range(len(labels)), settings=settings, seed=seed,
                                           batch_size=batch_size, order=order, refine=refine, tokenizer=vq, bar=bar):
            tokens.append(tok.cpu())
            if pics is not None:
                images.append(pics.cpu())
    seconds = time.perf_counter() - t0
    tokens = torch.cat(tokens)
    np.save(out / "tokens.npy", tokens.numpy())
    np.save(out / "labels.npy", labels.numpy())
    line = f"{len(labels)} samples in {seconds:.1f} s ({len(labels) / seconds:.2f} img/s); tokens in {out / 'tokens.npy'}"
    if vq is not None:
        pics = to_uint8(torch.cat(images))
        save_grid(pics, out / "grid.png", nrow=num_per_class)
        save_images(pics, out / "images", [f"{i:05d}_class-{int(c)}" for i, c in enumerate(labels)])
        line += f"; grid in {out / 'grid.png'}"
    return line
