"""Sampling for evaluation: N images into an ADM-format `.npz` (`arr_0` uint8 N x H x W x 3,
`arr_1` int64 labels), the file that FID / IS / precision / recall are computed from.

Sample i has class `i // num_per_class` (classes in order, as upstream) and randomness fixed by
(seed, i). The work is cut into fixed chunks of `chunk_size` samples; process r of W takes chunks
r, r + W, ... and writes each finished chunk atomically to `<out>.chunks/`. A re-run skips
finished chunks, and the final file is assembled from the chunks with fixed zip timestamps, so
it is byte-identical whatever the number of processes and interruptions.
"""
from __future__ import annotations

import io
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..data.images import to_uint8
from ..sampling.sampler import as_backend, generate


def chunk_path(out: Path, c: int) -> Path:
    return Path(f"{out}.chunks") / f"chunk-{c:06d}.npz"


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """np.savez layout with fixed zip metadata (bytes depend only on the arrays), written atomically."""
    tmp = Path(f"{path}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o600 << 16
            zf.writestr(info, buf.getvalue())
    os.replace(tmp, path)
    return path


def sample_chunk(model, tokenizer, labels: torch.Tensor, indices: range, seed: int, batch_size: int,
                 **sampling) -> np.ndarray:
    """uint8 (n, H, W, 3) images of samples `indices` (labels (n,)), in batches of batch_size."""
    out = []
    for s in range(0, len(indices), batch_size):
        idx = indices[s:s + batch_size]
        tokens = generate(model, labels[s:s + batch_size], seed=seed, indices=idx, **sampling)
        with torch.inference_mode():
            out.append(to_uint8(tokenizer.decode(tokens).float()))
    return np.concatenate(out)


def sample_eval(model, tokenizer, out_npz, *, num_per_class: int = 50, num_classes: int | None = None,
                seed: int = 0, batch_size: int = 32, chunk_size: int = 256, rank: int = 0, world_size: int = 1,
                progress: bool = True, on_chunk=None, **sampling) -> dict:
    """Write this process's share of the chunks; returns counts. `assemble_npz` joins them."""
    from tqdm.auto import tqdm

    out = Path(out_npz)
    num_classes = num_classes or model.config.num_classes
    total = num_classes * num_per_class
    if out.is_file():  # assembled by an earlier run: nothing left to do
        return {"chunks_done": 0, "chunks_skipped": 0, "images": 0, "seconds": 0.0, "total": total,
                "total_chunks": -(-total // chunk_size), "complete": True}
    chunks = [c for c in range(-(-total // chunk_size)) if c % world_size == rank]
    todo = [c for c in chunks if not chunk_path(out, c).is_file()]
    chunk_path(out, 0).parent.mkdir(parents=True, exist_ok=True)
    backend = as_backend(model)  # prepared once, not per batch
    device = backend.device
    mine = sum(min(chunk_size, total - c * chunk_size) for c in todo)
    bar = tqdm(total=mine, desc=f"sample-eval rank {rank}", unit="img", disable=not progress, smoothing=0.1)
    t0 = time.perf_counter()
    for c in todo:
        indices = range(c * chunk_size, min((c + 1) * chunk_size, total))
        labels = torch.tensor([i // num_per_class for i in indices], device=device)
        images = sample_chunk(backend, tokenizer, labels, indices, seed, batch_size, **sampling)
        write_npz(chunk_path(out, c), {"arr_0": images, "arr_1": labels.cpu().numpy().astype(np.int64)})
        bar.update(len(indices))
        if on_chunk is not None:
            on_chunk(c)
    bar.close()
    return {"chunks_done": len(todo), "chunks_skipped": len(chunks) - len(todo), "images": mine,
            "seconds": time.perf_counter() - t0, "total_chunks": -(-total // chunk_size), "total": total}


def assemble_npz(out_npz, total: int, chunk_size: int, keep_chunks: bool = False) -> Path:
    """Join all chunks into `out_npz`; a missing chunk is an error naming it."""
    out = Path(out_npz)
    n_chunks = -(-total // chunk_size)
    missing = [chunk_path(out, c) for c in range(n_chunks) if not chunk_path(out, c).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {n_chunks} chunks are not written yet (first: {missing[0]}); "
                                f"run the same sample-eval command again to finish them.")
    images, labels = [], []
    for c in range(n_chunks):
        with np.load(chunk_path(out, c)) as z:
            images.append(z["arr_0"])
            labels.append(z["arr_1"])
    write_npz(out, {"arr_0": np.concatenate(images), "arr_1": np.concatenate(labels)})
    if not keep_chunks:
        for c in range(n_chunks):
            chunk_path(out, c).unlink()
        chunk_path(out, 0).parent.rmdir()
    return out
