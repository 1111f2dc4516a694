"""Token shards on disk: the layout, and `TokenShards`, the reader training uses. They are written
by `rar.tokenizer.shard_writer` (which runs the tokenizer).

Layout of a folder (S shards, sizes fixed by `shard_size`, independent of world size):

    tokens-00000-of-0000S.npy   uint16 (n, views, T) codes (uint32 when the codebook > 65536)
    labels-00000-of-0000S.npy   int64 (n,) class indices
    shard-00000-of-0000S.json   per-shard count and failed images; written last, marks it done
    manifest.json               written once every shard is done (by whichever rank finishes last)

Views: view 0 is the center crop; with `flip` view 1 is its horizontal mirror; with `ten_crop`
the 10 views of `TEN_CROP_VIEWS`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import numpy as np

FORMAT = "rar-token-shards"
TEN_CROP_VIEWS = ["top_left", "top_right", "bottom_left", "bottom_right", "center",
                  "flip_top_left", "flip_top_right", "flip_bottom_left", "flip_bottom_right", "flip_center"]


class _Concat:
    """Read-only row-concatenation of memory-mapped shard arrays (no copy until indexed)."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = [p for p in parts if len(p)] or parts[:1]
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])  # (S+1,)
        self.shape = (int(self.offsets[-1]),) + tuple(parts[0].shape[1:])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            i = int(index) + (self.shape[0] if index < 0 else 0)
            if not 0 <= i < self.shape[0]:
                raise IndexError(f"index {index} out of range for {self.shape[0]} images.")
            s = int(np.searchsorted(self.offsets, i, side="right") - 1)
            return np.asarray(self.parts[s][i - self.offsets[s]])
        idx = np.arange(self.shape[0])[index] if isinstance(index, slice) else np.asarray(index)
        idx = np.where(idx < 0, idx + self.shape[0], idx)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1  # (n,)
        out = np.empty((len(idx),) + self.shape[1:], self.dtype)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.parts[s][idx[sel] - self.offsets[s]]
        return out

    def __array__(self, dtype=None, copy=None):
        arr = np.concatenate([np.asarray(p) for p in self.parts])
        return arr.astype(dtype) if dtype is not None else arr


class TokenShards:
    """Reader of a token-shard folder: `tokens[i]` is (views, T) uint16, `labels[i]` an int64.

    `tokens` is memory-mapped (one np.memmap, or a concatenating view over several shards), so a
    training loop can index random batches of an ImageNet-sized set without loading it.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        mfile = self.path / "manifest.json"
        if self.path.is_file():
            raise ValueError(f"token shards {str(self.path)!r} is a file; expected a folder written by `rar tokenize`.")
        if not mfile.is_file():
            done = len(list(self.path.glob("shard-*-of-*.json"))) if self.path.is_dir() else 0
            raise FileNotFoundError(f"{str(self.path)!r} has no manifest.json: expected a folder written by "
                                    f"`rar tokenize` ({done} shard(s) finished there; re-run tokenization "
                                    "for the missing ranks).")
        self.manifest = read_manifest(mfile)
        parts, labels = [], []
        for sh in self.manifest["shards"]:
            parts.append(_load_npy(self.path / sh["tokens"], mmap=True))
            labels.append(_load_npy(self.path / sh["labels"], mmap=False))
        for t, lab, sh in zip(parts, labels, self.manifest["shards"]):
            _check_shard(self.path, sh, t, lab, self.manifest)
        self.tokens = parts[0] if len(parts) == 1 else _Concat(parts)
        self.labels = np.concatenate(labels).astype(np.int64)  # (N,)
        if len(self.tokens) != len(self.labels) or len(self.labels) != self.manifest["num_images"]:
            raise ValueError(f"{str(self.path)!r}: the shards hold {len(self.labels)} images but the manifest's "
                             f"num_images is {self.manifest['num_images']}; re-run `rar tokenize`.")
        if len(self.labels) == 0:  # nothing to train on, score or evaluate
            raise ValueError(f"token shards {str(self.path)!r} hold no images; expected at least one (rar tokenize of a "
                             "folder with images).")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return np.asarray(self.tokens[i]), int(self.labels[i])

    @property
    def views(self) -> int:
        return int(self.manifest["views_per_image"])

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.manifest["grid"])

    @property
    def tokens_per_image(self) -> int:
        return int(self.manifest["tokens_per_image"])

    @property
    def codebook_size(self) -> int:
        return int(self.manifest["codebook_size"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])


# The manifest keys training reads, with their types: a manifest missing one, or holding another
# type, is refused by name (a hand-edited or foreign manifest.json must not become a traceback).
MANIFEST_KEYS = {"shards": list, "num_images": int, "codebook_size": int, "grid": list, "tokens_per_image": int,
                 "views_per_image": int, "class_names": list, "num_classes": int}


def read_manifest(mfile: Path) -> dict:
    """manifest.json, checked: valid JSON, the format tag, every key training reads with its type."""
    try:
        m = json.loads(mfile.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"manifest {str(mfile)!r} is not valid JSON ({getattr(err, 'msg', err)}); expected the "
                         "manifest.json that `rar tokenize` writes.") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        what = f"a JSON {type(m).__name__}" if not isinstance(m, dict) else f"format {m.get('format')!r}"
        raise ValueError(f"manifest {str(mfile)!r} holds {what}; expected a {FORMAT} manifest (a JSON object "
                         "written by `rar tokenize`).")
    for key, kind in MANIFEST_KEYS.items():
        if key not in m:
            raise ValueError(f"manifest {str(mfile)!r} has no {key!r}; expected the manifest.json that `rar tokenize` "
                             "writes.")
        if not isinstance(m[key], kind) or isinstance(m[key], bool):
            raise ValueError(f"manifest {str(mfile)!r}: {key!r} is {m[key]!r}; expected "
                             f"{'an integer' if kind is int else 'a list'}.")
    grid = m["grid"]
    if len(grid) != 2 or not all(isinstance(g, int) and g > 0 for g in grid) or grid[0] * grid[1] != m["tokens_per_image"]:
        raise ValueError(f"manifest {str(mfile)!r}: grid {grid} does not give tokens_per_image "
                         f"{m['tokens_per_image']}; expected [rows, cols] with rows x cols tokens.")
    if m["codebook_size"] < 1 or m["views_per_image"] < 1 or m["num_classes"] != len(m["class_names"]):
        raise ValueError(f"manifest {str(mfile)!r}: codebook_size {m['codebook_size']}, views_per_image "
                         f"{m['views_per_image']} and num_classes {m['num_classes']} (for {len(m['class_names'])} "
                         "class names) must be positive and agree.")
    for sh in m["shards"]:
        if not (isinstance(sh, dict) and isinstance(sh.get("tokens"), str) and isinstance(sh.get("labels"), str)):
            raise ValueError(f"manifest {str(mfile)!r}: shard entry {sh!r} lacks its tokens and labels file names.")
    return m


def _load_npy(file: Path, mmap: bool) -> np.ndarray:
    if not file.is_file():
        raise FileNotFoundError(f"shard file {str(file)!r} listed in the manifest is missing.")
    try:
        return np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:  # truncated ("mmap length is greater ..."), not .npy, pickled
        raise ValueError(f"shard file {str(file)!r} is not a readable .npy array ({err}); it is truncated or was "
                         "not written by `rar tokenize`: re-run tokenization.") from None


def _check_shard(folder: Path, sh: dict, tokens: np.ndarray, labels: np.ndarray, m: dict) -> None:
    """One shard's arrays against the manifest: shapes, integer types, codes < codebook_size and
    labels in 0..num_classes-1 (the null label num_classes is the model's, never the data's)."""
    name = str(folder / sh["tokens"])
    want = (m["views_per_image"], m["tokens_per_image"])
    if tokens.ndim != 3 or tuple(tokens.shape[1:]) != want or tokens.dtype.kind not in "ui":
        raise ValueError(f"shard file {name!r} holds {tokens.dtype} {list(tokens.shape)}; expected integer codes "
                         f"[images, {want[0]}, {want[1]}] as the manifest says.")
    if labels.ndim != 1 or len(labels) != len(tokens) or labels.dtype.kind not in "ui":
        raise ValueError(f"shard file {str(folder / sh['labels'])!r} holds {labels.dtype} {list(labels.shape)}; "
                         f"expected {len(tokens)} integer labels, one per image.")
    if len(tokens):
        # unsigned codes (what rar tokenize writes) need only the max: one pass over the memory map
        lo, hi = (int(tokens.min()) if tokens.dtype.kind == "i" else 0), int(tokens.max())
        if lo < 0 or hi >= m["codebook_size"]:
            raise ValueError(f"shard file {name!r} holds code {hi if hi >= m['codebook_size'] else lo}; expected codes "
                             f"in 0..{m['codebook_size'] - 1} (the manifest's codebook_size).")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= m["num_classes"]:
            raise ValueError(f"shard file {str(folder / sh['labels'])!r} holds label {hi if lo >= 0 else lo}; expected "
                             f"class ids in 0..{m['num_classes'] - 1} (the manifest's num_classes; "
                             f"{m['num_classes']} is the model's null label, not a class).")
