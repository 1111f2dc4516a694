"""`rar score`: per-image likelihood (bits per token) and, for a class-conditional generator, the
class it finds most likely, for image folders or token shards, written as CSV."""
from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.checks import check_counts, check_pair
from ..core.devices import resolve_device
from ..core.files import check_not_empty, check_outputs, ensure_writable_dir, require_path, write_atomic
from ..data.images import IMAGE_EXTENSIONS, image_tensor, list_image_folder, load_rgb
from ..data.shards import TokenShards
from ..inference.likelihood import classify, log_likelihood, likelihood_orders
from ..model.weights import load_generator
from ..tokenizer.vqgan import load_any_tokenizer
from .classes import class_names_of

CLASSIFY_MAX_CLASSES = 100  # classifying costs one pass per class: by default only up to this many classes


def _flat_images(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_data(data, tokenizer, class_names=None, num_classes=None) -> tuple[list[str], torch.Tensor | None, np.ndarray | None,
                                                           list[Path] | None]:
    """(names, tokens or None, labels or None, image paths or None) of token shards (a folder with
    manifest.json: tokens and labels), an ImageNet-layout folder (labels from the class
    subfolders: by name when every folder is one of `class_names`, else by sorted position, as
    `rar tokenize` numbers them, or by number when every folder is a class id) or a flat folder
    of images (no labels)."""
    root = require_path(data, "data", "folder", "an image folder or token shards")
    if (root / "manifest.json").is_file():
        shards = TokenShards(root)
        tokens = torch.from_numpy(np.stack([np.asarray(shards[i][0]).reshape(shards.views, -1)[0]
                                            for i in range(len(shards))]).astype(np.int64))
        return [str(i) for i in range(len(shards))], tokens, shards.labels, None
    if not any(root.iterdir()):
        raise ValueError(f"data {str(root)!r} is an empty folder; expected token shards or images.")
    if tokenizer is None:
        raise ValueError(f"data {str(root)!r} holds images: pass --tokenizer to turn them into tokens.")
    if any(p.is_dir() for p in root.iterdir()):
        paths, labels, folders = list_image_folder(root)
        if class_names and set(folders) <= set(class_names):
            labels = np.asarray([class_names.index(f) for f in folders], dtype=np.int64)[labels]  # one lookup per folder
        elif all(f.isdecimal() for f in folders):  # folders named by class id ("3", "7"): those ids, not positions
            labels = np.asarray([int(f) for f in folders], dtype=np.int64)[labels]
            if num_classes is not None and int(labels.max()) >= num_classes:
                raise ValueError(f"data {str(root)!r} has the class folder {str(int(labels.max()))!r}; the generator's "
                                 f"classes are 0..{num_classes - 1}.")
    else:
        paths, labels = _flat_images(root), None
        if not paths:
            raise ValueError(f"data {str(root)!r} has no image files ({', '.join(IMAGE_EXTENSIONS)}) and no manifest.json.")
    return [str(p.relative_to(root)) for p in paths], None, labels, paths


def check_data_fits(data, config, tokens: torch.Tensor | None, labels) -> None:
    """Tokens and labels of `data` against the generator's `config`, before any scoring."""
    if tokens is not None and (tokens.shape[1] != config.num_tokens or int(tokens.max()) >= config.codebook_size):
        raise ValueError(f"data {str(data)!r} holds {tokens.shape[1]} tokens per image with codes up to "
                         f"{int(tokens.max())}; the generator expects {config.num_tokens} tokens of a codebook of "
                         f"{config.codebook_size} (token shards of its own tokenizer).")
    if labels is not None and len(labels) and (int(np.min(labels)) < 0 or int(np.max(labels)) >= config.num_classes):
        raise ValueError(f"data {str(data)!r} has class ids {int(np.min(labels))}..{int(np.max(labels))} (class folders "
                         f"count in sorted order unless named as the generator's classes); the generator has classes "
                         f"0..{config.num_classes - 1}.")


def _encode(tokenizer, paths: list[Path], resolution: int, device) -> torch.Tensor:
    return tokenizer.encode(torch.stack([image_tensor(load_rgb(p), resolution) for p in paths]).to(device))


def score_to_csv(generator, data, out_csv, *, tokenizer=None, orders: str = "raster", num_orders: int = 1,
                 seed: int = 0, classify_images: bool | None = None, batch_size: int = 32, device: str = "cpu",
                 progress: bool = True, overwrite: bool = False) -> str:
    """Write one CSV row per image: its name, label (if the data has them), NLL in bits per token
    (under its label, else unconditional), and with classification the predicted class, its
    probability and the label's. `classify_images=None` classifies when the generator has at
    most 100 classes (each class costs one forward pass per image and order). An existing CSV is
    replaced only with `overwrite`, and only once the new one is complete. Returns a summary."""
    check_counts(batch_size=batch_size, num_orders=num_orders)
    check_not_empty(out_csv, "output")
    out = Path(out_csv)
    if out.suffix.lower() != ".csv" and not out.is_dir():
        raise ValueError(f"output {str(out_csv)!r} is not a .csv file name; expected e.g. scores.csv.")
    check_outputs([out], overwrite=overwrite, inputs=[data, generator, tokenizer])
    device = resolve_device(device)
    model = load_generator(generator).to(device).eval()
    likelihood_orders(orders, num_orders, seed, 1, model)  # a bad order fails before any work
    vq = None
    if tokenizer is not None:
        vq = load_any_tokenizer(tokenizer).to(device).eval()
        check_pair(model, vq, repr(str(generator)), repr(str(tokenizer)))
    names, tokens, labels, paths = read_data(data, vq, class_names_of(generator, model.config.num_classes),
                                           model.config.num_classes)
    check_data_fits(data, model.config, tokens, labels)
    C = model.config.num_classes
    do_classify = C <= CLASSIFY_MAX_CLASSES if classify_images is None else classify_images
    ensure_writable_dir(out.parent if str(out.parent) else Path("."), "output folder")

    kw = dict(orders=orders, num_orders=num_orders, seed=seed)
    t0, total = time.perf_counter(), {"bits": 0.0, "correct": 0}

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "label", "nll_bits_per_token"] + (["predicted_class", "predicted_probability",
                                                                  "label_probability"] if do_classify else []))
            for s in tqdm(range(0, len(names), batch_size), desc="score", unit="batch", disable=not progress):
                e = min(s + batch_size, len(names))
                tok = tokens[s:e].to(device) if tokens is not None else _encode(vq, paths[s:e], vq.config.resolution, device)
                lab = torch.as_tensor(labels[s:e], device=device) if labels is not None else torch.full((e - s,), C, device=device)
                bits = (log_likelihood(model, tok, lab, **kw) / math.log(2)).tolist()
                post = classify(model, tok, **kw) if do_classify else None
                for i in range(e - s):
                    row = [names[s + i], "" if labels is None else int(labels[s + i]), f"{bits[i]:.5f}"]
                    if post is not None:
                        p, c = post[i].max(0)
                        row += [int(c), f"{float(p):.5f}", "" if labels is None else f"{float(post[i, int(labels[s + i])]):.5f}"]
                        total["correct"] += int(labels is not None and int(c) == int(labels[s + i]))
                    w.writerow(row)
                total["bits"] += sum(bits)

    write_atomic(out, write)
    total_bits, correct = total["bits"], total["correct"]
    line = (f"{len(names)} images scored in {time.perf_counter() - t0:.1f} s: mean {total_bits / len(names):.4f} bits per "
            f"token ({orders}{f', {num_orders} orders' if orders == 'random' else ''})")
    if do_classify and labels is not None:
        line += f"; generative classification accuracy {100 * correct / len(names):.2f}%"
    return line + f"; {out}"
