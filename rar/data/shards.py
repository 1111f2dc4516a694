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
        if not mfile.is_file():
            done = len(list(self.path.glob("shard-*-of-*.json"))) if self.path.is_dir() else 0
            raise FileNotFoundError(f"{str(self.path)!r} has no manifest.json: expected a folder written by "
                                    f"`rar tokenize` ({done} shard(s) finished there; re-run tokenization "
                                    "for the missing ranks).")
        self.manifest = json.loads(mfile.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{str(mfile)!r} is not a {FORMAT} manifest.")
        parts, labels = [], []
        for sh in self.manifest["shards"]:
            for k in ("tokens", "labels"):
                if not (self.path / sh[k]).is_file():
                    raise FileNotFoundError(f"shard file {str(self.path / sh[k])!r} listed in the manifest is missing.")
            parts.append(np.load(self.path / sh["tokens"], mmap_mode="r"))
            labels.append(np.load(self.path / sh["labels"]))
        self.tokens = parts[0] if len(parts) == 1 else _Concat(parts)
        self.labels = np.concatenate(labels).astype(np.int64)  # (N,)
        if len(self.tokens) != len(self.labels) or len(self.labels) != self.manifest["num_images"]:
            raise ValueError(f"{str(self.path)!r}: shard sizes disagree with the manifest's num_images.")

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
