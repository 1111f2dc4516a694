"""rar: Randomized Autoregressive visual generation (Yu et al., ICCV 2025, arXiv 2411.00776).

Layers, each importing only those before it: `rar.core` (files, seeds, devices, configs, input
checks, weight names) -> `rar.model` (config, transformer, orders, weight files) -> `rar.decode`
(the decode engine: backend, KV cache, CPU kernels) -> `rar.inference` (generate, edit, refine,
likelihood) -> `rar.data` (images, token shards, batches) -> `rar.tokenizer` (VQGAN, its
training, the shard writer) -> `rar.metrics` -> `rar.training` -> `rar.apps` (the CLI, the web
app, the demo, file front-ends). See docs/architecture.md.

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
    "KVCache": "rar.decode.cache",
    "load_official_generator": "rar.model.weights",
    "save_generator": "rar.model.weights",
    "load_generator": "rar.model.weights",
    "random_ratio": "rar.model.orders",
    "sample_orders": "rar.model.orders",
    "named_order": "rar.model.orders",
    "drop_labels": "rar.model.orders",
    "generate": "rar.inference.sampler",
    "SamplingSettings": "rar.inference.sampler",
    "cached_logits": "rar.inference.sampler",
    "edit": "rar.inference.editing",
    "from_pretrained": "rar.apps.hub",
    "refine": "rar.inference.refinement",
    "log_likelihood": "rar.inference.likelihood",
    "classify": "rar.inference.likelihood",
    "prepare": "rar.decode.backend",
    "VQGAN": "rar.tokenizer.vqgan",
    "VQGANConfig": "rar.tokenizer.vqgan",
    "load_official_tokenizer": "rar.tokenizer.vqgan",
    "load_any_tokenizer": "rar.tokenizer.vqgan",
    "save_tokenizer": "rar.tokenizer.vqgan",
    "TokenShards": "rar.data.shards",
    "tokenize_folder": "rar.tokenizer.shard_writer",
    "tokenize_dataset": "rar.tokenizer.shard_writer",
    "train_tokenizer": "rar.tokenizer.training",
    "train": "rar.training.loop",
    "TrainConfig": "rar.training.config",
}
# subpackages and modules reachable as attributes after a bare `import rar`
_MODULES = {"core": "rar.core", "model": "rar.model", "decode": "rar.decode", "inference": "rar.inference",
            "tokenizer": "rar.tokenizer", "data": "rar.data", "training": "rar.training", "metrics": "rar.metrics",
            "apps": "rar.apps",
            # earlier names of two layers, kept for code written against them
            "sampling": "rar.inference", "evaluation": "rar.metrics"}

__all__ = sorted(_EXPORTS) + sorted(_MODULES) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    raise AttributeError(f"module 'rar' has no attribute {name!r}")
