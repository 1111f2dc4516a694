"""rar: Randomized Autoregressive visual generation (Yu et al., ICCV 2025, arXiv 2411.00776).

The package follows the data: `rar.tokenizer` (images -> tokens), `rar.data` (token shards,
batches), `rar.model` (config, transformer, orders, weight files), `rar.training`, `rar.sampling`
(labels -> tokens), `rar.evaluation` (images -> metrics). See docs/architecture.md.

Public names are imported lazily so that `import rar` and `rar --help` stay fast.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "RARConfig": "rar.model.config",
    "Regularization": "rar.model.config",
    "SamplingDefaults": "rar.model.config",
    "Preset": "rar.model.config",
    "PRESETS": "rar.model.config",
    "RAR": "rar.model.transformer",
    "KVCache": "rar.sampling.cached_decoder",
    "load_official_generator": "rar.model.weights",
    "save_generator": "rar.model.weights",
    "load_generator": "rar.model.weights",
    "random_ratio": "rar.model.orders",
    "sample_orders": "rar.model.orders",
    "named_order": "rar.model.orders",
    "drop_labels": "rar.model.orders",
    "generate": "rar.sampling.sampler",
    "cached_logits": "rar.sampling.sampler",
    "edit": "rar.sampling.editing",
    "from_pretrained": "rar.hub",
    "refine": "rar.sampling.refine",
    "log_likelihood": "rar.evaluation.likelihood",
    "classify": "rar.evaluation.likelihood",
    "prepare": "rar.sampling.decoder",
    "VQGAN": "rar.tokenizer.vqgan",
    "VQGANConfig": "rar.tokenizer.vqgan",
    "load_official_tokenizer": "rar.tokenizer.vqgan",
    "load_any_tokenizer": "rar.tokenizer.vqgan",
    "save_tokenizer": "rar.tokenizer.vqgan",
    "TokenShards": "rar.data.shards",
    "tokenize_folder": "rar.data.shards",
    "tokenize_dataset": "rar.data.shards",
    "train_tokenizer": "rar.tokenizer.training",
    "train": "rar.training.loop",
    "TrainConfig": "rar.training.config",
}
# subpackages and modules reachable as attributes after a bare `import rar`
_MODULES = {"model": "rar.model", "tokenizer": "rar.tokenizer", "data": "rar.data", "training": "rar.training",
            "sampling": "rar.sampling", "evaluation": "rar.evaluation", "metrics": "rar.evaluation.metrics"}

__all__ = sorted(_EXPORTS) + sorted(_MODULES) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    raise AttributeError(f"module 'rar' has no attribute {name!r}")
