"""Generator configuration and presets (DiT style: presets are data).

A preset has three parts, kept apart because they change for different reasons:
- `RARConfig`, the architecture: exactly what a checkpoint's tensor shapes fix;
- `Regularization`, the dropout rates of training (no effect on sampling or scoring);
- `SamplingDefaults`, the sampling settings the paper tuned for the preset (guidance scale, its
  cosine-schedule power, temperature), which `rar.generate` uses when the caller leaves them unset.
The sizes of `rar_b` ... `rar_xxl` are those of the released checkpoints.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..core.checks import check_probability, check_sampling_values
from ..core.files import dataclass_from_dict

ARCHITECTURE_FIELDS = ("hidden_size", "num_layers", "num_heads", "mlp_size", "num_tokens", "codebook_size",
                       "num_classes")


@dataclass(frozen=True)
class RARConfig:
    """The architecture of a RAR generator."""
    hidden_size: int = 768
    num_layers: int = 24
    num_heads: int = 16
    mlp_size: int = 3072
    num_tokens: int = 256  # image tokens per image (T); a square grid of side sqrt(T)
    codebook_size: int = 1024  # V
    num_classes: int = 1000  # C; label C is the "no class" label of classifier-free guidance

    def __post_init__(self) -> None:
        for name in ARCHITECTURE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"RARConfig.{name} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}.")

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
        """The architecture of preset `name`, with some sizes changed by `overrides`."""
        return dataclasses.replace(get_preset(name).config, **overrides)

    def replace(self, **changes) -> "RARConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RARConfig":
        return dataclass_from_dict(cls, d)


@dataclass(frozen=True)
class Regularization:
    """Training-time dropout: residual branches and MLP hidden layer, attention probabilities, and
    the class label (replaced by "no class" for classifier-free guidance)."""
    dropout: float = 0.1
    attn_dropout: float = 0.1
    label_dropout: float = 0.1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_probability(f"Regularization.{f.name}", getattr(self, f.name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SamplingDefaults:
    """Sampling settings tuned for a preset (paper Table 8 / official configs)."""
    guidance_scale: float = 16.0
    guidance_scale_pow: float = 2.75
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_sampling_values(self.guidance_scale, self.guidance_scale_pow, self.temperature, owner="SamplingDefaults.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Preset:
    config: RARConfig
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    regularization: Regularization = field(default_factory=Regularization)


def split_flat_config(d: dict) -> tuple[RARConfig, Regularization | None, SamplingDefaults | None]:
    """The three parts of a flat dict holding all of their fields (the layout of saved generator
    folders before they were split); parts with none of their fields present come back None."""
    parts = []
    for cls in (RARConfig, Regularization, SamplingDefaults):
        names = {f.name for f in dataclasses.fields(cls)}
        parts.append({k: v for k, v in d.items() if k in names})
    unknown = sorted(set(d) - set().union(*parts))
    if unknown:
        raise ValueError(f"unknown generator config keys {unknown}.")
    arch, reg, samp = parts
    return (RARConfig(**arch), Regularization(**reg) if reg else None, SamplingDefaults(**samp) if samp else None)


PRESETS: dict[str, Preset] = {
    "rar_b": Preset(RARConfig(768, 24, 16, 3072), SamplingDefaults(16.0, 2.75, 1.0)),
    "rar_l": Preset(RARConfig(1024, 24, 16, 4096), SamplingDefaults(15.5, 2.5, 1.02)),
    "rar_xl": Preset(RARConfig(1280, 32, 16, 5120), SamplingDefaults(6.9, 1.5, 1.02)),
    "rar_xxl": Preset(RARConfig(1408, 40, 16, 6144), SamplingDefaults(8.0, 1.2, 1.02)),
    # Trains in minutes on a laptop CPU: 8x8 tokens, 64-entry codebook, 10 classes.
    "tiny": Preset(RARConfig(128, 4, 4, 512, num_tokens=64, codebook_size=64, num_classes=10),
                   SamplingDefaults(3.0, 1.0, 1.0), Regularization(0.0, 0.0, 0.1)),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}.")
    return PRESETS[name]


def preset_for(config: RARConfig) -> Preset | None:
    """The preset with exactly this architecture, if any (to recover its tuned settings)."""
    return next((p for p in PRESETS.values() if p.config == config), None)


FORMAT_NAME = "rar-generator"  # config.json "format" of a saved generator folder
FORMAT_VERSION = 2  # version 1 kept the dropouts and sampling settings inside one flat "config"


def generator_meta(config: RARConfig, regularization: Regularization, sampling: SamplingDefaults,
                   extra: dict | None = None) -> dict:
    """The config.json of a saved generator folder; `extra` adds keys such as class names."""
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": config.to_dict(),
            "regularization": regularization.to_dict(), "sampling": sampling.to_dict(), **(extra or {})}
