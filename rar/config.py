"""Generator configuration and presets (DiT style: presets are data).

The sizes of `rar_b` ... `rar_xxl` are those of the released checkpoints; each preset also
carries the sampling settings the paper tuned for it (guidance scale, its cosine-schedule power,
temperature), which `rar.generate` uses when the caller leaves them unset.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RARConfig:
    hidden_size: int = 768
    num_layers: int = 24
    num_heads: int = 16
    mlp_size: int = 3072
    num_tokens: int = 256  # image tokens per image (T); a square grid of side sqrt(T)
    codebook_size: int = 1024  # V
    num_classes: int = 1000  # C; label C is the "no class" label of classifier-free guidance
    dropout: float = 0.1
    attn_dropout: float = 0.1
    label_dropout: float = 0.1
    # Tuned sampling settings of the preset (paper, Table 8 / official configs).
    guidance_scale: float = 16.0
    guidance_scale_pow: float = 2.75
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}.")
        for name in ("hidden_size", "num_layers", "num_heads", "mlp_size", "num_tokens", "codebook_size", "num_classes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RARConfig.{name} must be positive, got {getattr(self, name)}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        """Side of the token grid (16 for 256 tokens); used by the named scan orders."""
        side = math.isqrt(self.num_tokens)
        if side * side != self.num_tokens:
            raise ValueError(f"num_tokens {self.num_tokens} is not a square; named 2-D scan orders need a square grid.")
        return side

    @property
    def null_label(self) -> int:
        """The "no class" label (= num_classes)."""
        return self.num_classes

    @classmethod
    def preset(cls, name: str, **overrides) -> "RARConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}.")
        return dataclasses.replace(PRESETS[name], **overrides)

    def replace(self, **changes) -> "RARConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RARConfig":
        return config_from_dict(cls, d)


def config_from_dict(cls, d: dict):
    """Build a config dataclass from a saved dict; an unknown key is an error naming it."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; expected a subset of {sorted(known)}.")
    return cls(**d)


PRESETS: dict[str, RARConfig] = {
    "rar_b": RARConfig(768, 24, 16, 3072, guidance_scale=16.0, guidance_scale_pow=2.75, temperature=1.0),
    "rar_l": RARConfig(1024, 24, 16, 4096, guidance_scale=15.5, guidance_scale_pow=2.5, temperature=1.02),
    "rar_xl": RARConfig(1280, 32, 16, 5120, guidance_scale=6.9, guidance_scale_pow=1.5, temperature=1.02),
    "rar_xxl": RARConfig(1408, 40, 16, 6144, guidance_scale=8.0, guidance_scale_pow=1.2, temperature=1.02),
    # Trains in minutes on a laptop CPU: 8x8 tokens, 64-entry codebook, 10 classes.
    "tiny": RARConfig(128, 4, 4, 512, num_tokens=64, codebook_size=64, num_classes=10,
                      dropout=0.0, attn_dropout=0.0, label_dropout=0.1,
                      guidance_scale=3.0, guidance_scale_pow=1.0, temperature=1.0),
}
