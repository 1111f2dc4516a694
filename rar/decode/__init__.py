"""The decode engine: `prepare(model)` -> `DecodeBackend` (weights in the layouts a decode step
reads fastest), the `KVCache`, the cached step of one block for any number of new rows
(`step.cached_step`) and the batch runner on it (`CachedDecoder`), and `cpu/`, the CPU kernels
chosen by `CPUCapability` (two compiled at run time from `cpu/csrc/`). No sampling policy lives
here: guidance, temperature and orders are `rar.inference`'s."""
from .backend import DecodeBackend, fold_adaln, prepare
from .cache import CachedDecoder, KVCache
from .cpu.capability import CPUCapability

__all__ = ["CPUCapability", "CachedDecoder", "DecodeBackend", "KVCache", "fold_adaln", "prepare"]
