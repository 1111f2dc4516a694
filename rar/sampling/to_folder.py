"""Sampling to files: class ids or names -> tokens -> images on disk (what `rar sample` does)."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..common import check_counts, resolve_device
from ..files import ensure_writable_dir
from ..model.config import get_preset
from ..model.weights import check_sizes, load_generator
from .decoder import prepare
from .refine import RefineSettings, apply_refine
from .sampler import generate, resolve_order, resolve_settings


def imagenet_class_names() -> list[str]:
    """ImageNet-1k's class names in class-id order, with their synonyms (shipped with the package)."""
    from importlib import resources
    return resources.files("rar.data").joinpath("imagenet_classes.txt").read_text().splitlines()


def class_names_of(generator_path, num_classes: int | None = None) -> list[str] | None:
    """Class names saved beside a generator trained by `rar train`; ImageNet's for a 1000-class
    generator without its own (the official ones); else None."""
    from ..hub import is_name
    meta = Path(generator_path) / "config.json"
    if not is_name(generator_path) and meta.is_file():
        names = json.loads(meta.read_text()).get("class_names")
        if names:
            return names
    return imagenet_class_names() if num_classes == 1000 else None


def parse_classes(text: str, num_classes: int, names: list[str] | None = None) -> list[int]:
    """"1,7,282" or names ("tench,goldfish") -> class ids, each checked against [0, num_classes).
    Names are separated by commas; a name that several classes share is an error naming them."""
    lookup: dict[str, set[int]] = {}
    for i, n in enumerate(names or []):
        for syn in n.split(","):
            if syn.strip():
                lookup.setdefault(syn.strip().lower(), set()).add(i)
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item.lstrip("-").isdigit():
            c = int(item)
        elif item.lower() in lookup:
            ids = sorted(lookup[item.lower()])
            if len(ids) > 1:
                raise ValueError(f"class name {item!r} is ambiguous (class ids {', '.join(map(str, ids))}); give the id.")
            c = ids[0]
        else:
            known = f"; known names: {', '.join(list(lookup)[:10])}..." if lookup else " (this generator has no class names)"
            raise ValueError(f"class {item!r} is neither a class id nor a known class name{known}.")
        if not 0 <= c < num_classes:
            raise ValueError(f"class id {c} is outside [0, {num_classes}) for this generator.")
        out.append(c)
    if not out:
        raise ValueError("--classes is empty; give class ids such as 1,7,282.")
    return out


def read_class_names(path) -> list[str]:
    """One name per line, in class-id order; several comma-separated synonyms on a line all match."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"class-names file {str(p)!r} does not exist; expected one class name per line.")
    return [line.strip() for line in p.read_text().splitlines() if line.strip()]


def sample_to_folder(generator_path, out_dir, *, classes: str = "0", class_names=None, num_per_class: int = 4,
                     seed: int = 0,
                     tokenizer=None, preset: str | None = None, batch_size: int = 16, device: str = "cpu",
                     dtype: str = "float32", progress: bool = True, refine: RefineSettings | None = None,
                     **sampling) -> str:
    """Sample `num_per_class` images of each class; writes tokens.npy, labels.npy and, with a
    tokenizer, grid.png (one row per class) and images/NNNNN_class-C.png. Returns a summary line.
    Every argument is checked, and the output folder made writable, before any sampling."""
    check_counts(num_per_class=num_per_class, batch_size=batch_size)
    device = resolve_device(device)
    model = load_generator(generator_path).to(device=device, dtype=getattr(torch, dtype))  # our own copy
    defaults = model.sampling
    if preset:  # the generator must have the preset's sizes; its tuned settings fill unset ones
        chosen = get_preset(preset)
        check_sizes(chosen.config, model.config, f"generator {str(generator_path)!r}")
        defaults = chosen.sampling
    sampling = {k: v for k, v in sampling.items() if v is not None}
    order = resolve_order(sampling.pop("order", None), model, device)  # a bad order fails before any work
    sampling = dataclasses.asdict(resolve_settings(defaults, **sampling))  # bad values fail here
    names = read_class_names(class_names) if class_names else class_names_of(generator_path, model.config.num_classes)
    ids = parse_classes(classes, model.config.num_classes, names)
    labels = torch.tensor(ids).repeat_interleave(num_per_class)  # (N,)
    out = ensure_writable_dir(out_dir, "output folder")
    backend = prepare(model)  # once, not per batch
    vq = None
    if tokenizer is not None:
        from ..tokenizer.vqgan import load_any_tokenizer
        vq = load_any_tokenizer(tokenizer).to(device).eval()
    from tqdm.auto import tqdm

    tokens, images, t0 = [], [], time.perf_counter()
    bar = tqdm(total=len(labels), desc="sample", unit="img", disable=not progress)
    for start in range(0, len(labels), batch_size):
        idx = range(start, min(start + batch_size, len(labels)))
        tok = generate(backend, labels[start:idx.stop], seed=seed, indices=idx, order=order, **sampling)
        tok = apply_refine(backend, tok, labels[start:idx.stop], refine, seed=seed, indices=idx, **sampling)
        tokens.append(tok.cpu())
        if vq is not None:
            with torch.inference_mode():
                images.append(vq.decode(tok).float().cpu())
        bar.update(len(idx))
    bar.close()
    seconds = time.perf_counter() - t0
    tokens = torch.cat(tokens)
    np.save(out / "tokens.npy", tokens.numpy())
    np.save(out / "labels.npy", labels.numpy())
    line = f"{len(labels)} samples in {seconds:.1f} s ({len(labels) / seconds:.2f} img/s); tokens in {out / 'tokens.npy'}"
    if vq is not None:
        from ..data.images import save_grid, save_images, to_uint8
        pics = to_uint8(torch.cat(images))
        save_grid(pics, out / "grid.png", nrow=num_per_class)
        save_images(pics, out / "images", [f"{i:05d}_class-{int(c)}" for i, c in enumerate(labels)])
        line += f"; grid in {out / 'grid.png'}"
    return line
