"""Sampling: labels -> tokens. `prepare(model)` once, then `generate(backend, labels, seed=...)`."""
from .cpu import CPUCapability
from .decoder import DecodeBackend, fold_adaln, prepare
from .editing import edit
from .sampler import SamplingSettings, cached_logits, filter_logits, generate, guidance_schedule, resolve_settings

__all__ = ["CPUCapability", "DecodeBackend", "SamplingSettings", "cached_logits", "edit", "filter_logits", "fold_adaln",
           "generate", "guidance_schedule", "prepare", "resolve_settings"]
