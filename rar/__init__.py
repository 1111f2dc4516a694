"""rar: Randomized Autoregressive visual generation (Yu et al., ICCV 2025, arXiv 2411.00776).

Public names are imported lazily so that `import rar` and `rar --help` stay fast.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "RARConfig": "rar.config",
    "PRESETS": "rar.config",
    "RAR": "rar.model",
    "KVCache": "rar.model",
    "load_official_generator": "rar.checkpoint",
    "save_generator": "rar.checkpoint",
    "load_generator": "rar.checkpoint",
    "random_ratio": "rar.orders",
    "sample_orders": "rar.orders",
    "named_order": "rar.orders",
    "drop_labels": "rar.orders",
    "generate": "rar.sampler",
    "VQGAN": "rar.vqgan",
    "VQGANConfig": "rar.vqgan",
    "load_official_tokenizer": "rar.vqgan",
    "load_any_tokenizer": "rar.vqgan",
    "save_tokenizer": "rar.vqgan",
    "TokenShards": "rar.shards",
    "tokenize_folder": "rar.shards",
    "tokenize_dataset": "rar.shards",
    "train_tokenizer": "rar.tokenizer_train",
    "train": "rar.train",
    "TrainConfig": "rar.train_config",
    "cached_logits": "rar.sampler",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name == "metrics":
        return importlib.import_module("rar.metrics")
    raise AttributeError(f"module 'rar' has no attribute {name!r}")
