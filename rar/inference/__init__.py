"""The algorithms on the decode engine: `generate` (sampling), `edit` (kept-first any-order
decoding), `refine`, and `log_likelihood` / `classify` (any order). `rar.sampling` names this
package; `prepare` and the engine's types are re-exported from `rar.decode` for that name."""
from ..decode import CPUCapability, DecodeBackend, fold_adaln, prepare
from .editing import edit
from .likelihood import classify, log_likelihood
from .draw import filter_logits
from .refinement import RefineSettings, refine
from .sampler import SamplingSettings, cached_logits, generate, guidance_schedule, resolve_settings

__all__ = ["CPUCapability", "DecodeBackend", "RefineSettings", "SamplingSettings", "cached_logits", "classify", "edit",
           "filter_logits", "fold_adaln", "generate", "guidance_schedule", "log_likelihood", "prepare", "refine",
           "resolve_settings"]
