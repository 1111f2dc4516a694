"""Sampling for evaluation: N images into an ADM-format `.npz` (`arr_0` uint8 N x H x W x 3,
`arr_1` int64 labels), the file that FID / IS / precision / recall are computed from.

Sample i has class `i // num_per_class` (classes in order, as upstream) and randomness fixed by
(seed, i). The work is cut into fixed chunks of `chunk_size` samples; process r of W takes chunks
r, r + W, ... and writes each finished chunk atomically to `<out>.chunks/`. A re-run skips
finished chunks, and the final file is assembled from the chunks with fixed zip timestamps, so
it is byte-identical whatever the number of processes and interruptions.

Every chunk and the final file carry the settings that decide their content (`rar_settings`: the
generator's and tokenizer's weight hashes, seed, classes, per-class count, chunk size and the
resolved sampling settings). A re-run with other settings refuses, naming what differs, instead
of mixing two runs in one file; `overwrite=True` (`--overwrite`) replaces what differs.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.checks import check_counts, check_pair
from ..core.files import check_not_empty, ensure_writable_dir
from ..core.seeds import resolve_seed
from ..data.images import to_uint8
from ..decode.backend import DecodeBackend
from ..inference.refinement import RefineSettings
from ..inference.sampler import SamplingSettings, as_backend, check_plan, with_overrides
from ..tokenizer.vqgan import state_dict_sha256
from .sample_files import sample_batches

SETTINGS_KEY = "rar_settings"
PARALLEL_KEYS = ("steps", "schedule")


def chunk_path(out: Path, c: int) -> Path:
    return Path(f"{out}.chunks") / f"chunk-{c:06d}.npz"


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """np.savez layout with fixed zip metadata (bytes depend only on the arrays), written atomically."""
    tmp = Path(f"{path}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            arr = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)  # (keeps 0-d arrays 0-d)
            np.lib.format.write_array(buf, arr, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o600 << 16
            zf.writestr(info, buf.getvalue())
    os.replace(tmp, path)
    return path


def eval_settings(model: DecodeBackend, tokenizer, *, num_classes: int, num_per_class: int, seed: int,
                  chunk_size: int, settings: SamplingSettings, order=None, refine: RefineSettings | None = None) -> dict:
    """Everything that decides the content of the evaluation file (not the batch size or the
    number of processes, which do not change a sample)."""
    weights = model.model
    resolved = settings.resolve(weights.sampling)
    return {"generator_sha256": state_dict_sha256(weights), "decode_dtype": str(model.dtype),
            "tokenizer_sha256": state_dict_sha256(tokenizer), "seed": int(seed), "num_classes": int(num_classes),
            "num_per_class": int(num_per_class), "chunk_size": int(chunk_size),
            "order": None if order is None else (order if isinstance(order, str) else torch.as_tensor(order).tolist()),
            # steps / schedule only when set, so that files of sequential decoding keep their settings
            **{k: v for k, v in dataclasses.asdict(resolved).items() if resolved.steps is not None or k not in PARALLEL_KEYS},
            **({"refine": dataclasses.asdict(refine)} if refine is not None and refine.active else {})}


def read_settings(path: Path) -> dict | None:
    """The settings recorded in a chunk or final file (None: the file records none)."""
    with np.load(path) as z:
        return json.loads(z[SETTINGS_KEY].item()) if SETTINGS_KEY in z.files else None


def _differences(found: dict | None, wanted: dict) -> str:
    if found is None:
        return "it records no settings (not written by this version of rar sample-eval)"
    short = lambda v: v[:12] if isinstance(v, str) and len(v) == 64 else v  # noqa: E731 - hashes
    keys = [k for k in wanted if found.get(k) != wanted[k]]
    return "; ".join(f"{k} {short(found.get(k))!r} there, {short(wanted[k])!r} now" for k in keys)


def _check_existing(out: Path, wanted: dict, n_chunks: int, overwrite: bool, rank: int, world_size: int) -> bool:
    """Whether `out` is already complete with these settings. Chunks (or a final file) made with
    other settings are an error naming the differences, unless `overwrite`: then each rank deletes
    the differing chunks it owns (rank 0 those no rank owns), and the final file is replaced."""
    files = ([out] if out.is_file() else []) + sorted(Path(f"{out}.chunks").glob("chunk-*.npz"))
    complete = False
    for f in files:
        try:
            diff = _differences(read_settings(f), wanted) if zipfile.is_zipfile(f) else \
                "it is not an .npz archive written by rar sample-eval"
        except FileNotFoundError:
            continue  # deleted by another rank meanwhile
        if not f.exists():
            continue
        if diff and not overwrite:
            raise ValueError(f"{f} was made with other settings ({diff}); run with the same settings to finish "
                             f"it, choose another output, or pass --overwrite (overwrite=True) to redo it.")
        c = int(f.stem.split("-")[1]) if f != out else None
        owner = (c % world_size if c < n_chunks else 0) if c is not None else None
        if diff and owner == rank:
            f.unlink(missing_ok=True)
        complete = complete or (f == out and not diff)
    return complete


def sample_eval(model, tokenizer, out_npz, *, num_per_class: int = 50, num_classes: int | None = None,
                seed: int = 0, batch_size: int = 32, chunk_size: int = 256, rank: int = 0, world_size: int = 1,
                progress: bool = True, on_chunk=None, overwrite: bool = False, refine: RefineSettings | None = None,
                settings: SamplingSettings | None = None, order=None, guidance_scale: float | None = None,
                guidance_scale_pow: float | None = None, temperature: float | None = None, top_k: int | None = None,
                top_p: float | None = None) -> dict:
    """Write this process's share of the chunks; returns counts. `assemble_npz` joins them.
    `settings` (or the loose keywords that override its fields) and `order` as in `rar.generate`;
    they are recorded in every chunk and in the final file."""
    check_not_empty(out_npz, "output")
    out = Path(out_npz)
    if out.suffix.lower() != ".npz" or out.is_dir():
        raise ValueError(f"output {str(out_npz)!r} is {'an existing folder' if out.is_dir() else 'not an .npz file name'}; "
                         "expected a file name ending in .npz, e.g. samples.npz.")
    num_classes = model.config.num_classes if num_classes is None else num_classes
    available = model.config.num_classes
    if not 1 <= num_classes <= available:
        raise ValueError(f"num_classes must be between 1 and the generator's {available} classes, got {num_classes}.")
    check_counts(num_per_class=num_per_class, chunk_size=chunk_size, batch_size=batch_size)
    resolve_seed(seed, None)  # before any folder is made
    total, n_chunks = num_classes * num_per_class, -(-num_classes * num_per_class // chunk_size)
    settings = with_overrides(settings, guidance_scale, guidance_scale_pow, temperature, top_k, top_p)
    check_plan(model.model if isinstance(model, DecodeBackend) else model, settings, order)  # before any work
    check_pair(model, tokenizer)
    backend = as_backend(model)  # prepared once, not per batch; it knows the dtype decoding runs in
    wanted = eval_settings(backend, tokenizer, num_classes=num_classes, num_per_class=num_per_class, seed=seed,
                           chunk_size=chunk_size, settings=settings, order=order, refine=refine)
    base = {"total": total, "total_chunks": n_chunks, "settings": wanted}
    if _check_existing(out, wanted, n_chunks, overwrite, rank, world_size):  # assembled earlier: nothing to do
        return {**base, "chunks_done": 0, "chunks_skipped": 0, "images": 0, "seconds": 0.0, "complete": True}
    ensure_writable_dir(Path(f"{out}.chunks"), "sample-eval chunk folder")  # before any sampling
    chunks = [c for c in range(n_chunks) if c % world_size == rank]
    todo = [c for c in chunks if not chunk_path(out, c).is_file()]
    mine = sum(min(chunk_size, total - c * chunk_size) for c in todo)
    bar = tqdm(total=mine, desc=f"sample-eval rank {rank}", unit="img", disable=not progress, smoothing=0.1)
    t0 = time.perf_counter()
    for c in todo:
        indices = range(c * chunk_size, min((c + 1) * chunk_size, total))
        labels = torch.tensor([i // num_per_class for i in indices], device=backend.device)
        images = np.concatenate([to_uint8(pics) for _, _, pics in sample_batches(
            backend, labels, indices, settings=settings, seed=seed, batch_size=batch_size, order=order,
            refine=refine, tokenizer=tokenizer)])
        write_npz(chunk_path(out, c), {"arr_0": images, "arr_1": labels.cpu().numpy().astype(np.int64),
                                       SETTINGS_KEY: np.array(json.dumps(wanted, sort_keys=True))})
        bar.update(len(indices))
        if on_chunk is not None:
            on_chunk(c)
    bar.close()
    return {**base, "chunks_done": len(todo), "chunks_skipped": len(chunks) - len(todo), "images": mine,
            "seconds": time.perf_counter() - t0}


def assemble_npz(out_npz, total: int, chunk_size: int, keep_chunks: bool = False) -> Path:
    """Join all chunks into `out_npz` with their (identical) settings; a missing chunk, or chunks of
    different settings, are an error naming them."""
    out = Path(out_npz)
    n_chunks = -(-total // chunk_size)
    missing = [chunk_path(out, c) for c in range(n_chunks) if not chunk_path(out, c).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {n_chunks} chunks are not written yet (first: {missing[0]}); "
                                f"run the same sample-eval command again to finish them.")
    images, labels, settings = [], [], None
    for c in range(n_chunks):
        with np.load(chunk_path(out, c)) as z:
            images.append(z["arr_0"])
            labels.append(z["arr_1"])
            mine = z[SETTINGS_KEY].item() if SETTINGS_KEY in z.files else None
        if c and mine != settings:
            raise ValueError(f"{chunk_path(out, c)} was made with other settings than {chunk_path(out, 0)}; "
                             "rerun sample-eval with --overwrite.")
        settings = mine
    arrays = {"arr_0": np.concatenate(images), "arr_1": np.concatenate(labels)}
    write_npz(out, arrays if settings is None else {**arrays, SETTINGS_KEY: np.array(settings)})
    if not keep_chunks:
        for f in Path(f"{out}.chunks").glob("chunk-*"):  # (with any .tmp a crash left behind)
            f.unlink()
        Path(f"{out}.chunks").rmdir()
    return out
