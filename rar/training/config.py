"""The typed configuration of `rar train` (YAML + dotted overrides via `rar.runconfig`).

Defaults are the paper's recipe where it has one (AdamW 4e-4, betas 0.9/0.96, weight decay 0.03,
grad-norm clip 1.0, end lr 1e-5, label dropout 0.1, annealing from 50% to 75% of training).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional

from ..model.config import Preset, get_preset
from ..model.transformer import RECOMPUTE_MODES


@dataclass
class ModelSection:
    preset: str = "tiny"
    # Optional overrides of the preset; num_tokens / codebook_size / num_classes come from the data.
    hidden_size: Optional[int] = None
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_size: Optional[int] = None
    dropout: Optional[float] = None
    attn_dropout: Optional[float] = None
    label_dropout: Optional[float] = None
    guidance_scale: Optional[float] = None
    guidance_scale_pow: Optional[float] = None
    temperature: Optional[float] = None


@dataclass
class DataSection:
    path: str = ""  # a folder written by `rar tokenize`
    tokenizer: str = ""  # the tokenizer that made the tokens: decodes the sample grids (optional)
    synthetic: bool = False  # use rar.data.synthetic_tokens instead (smoke tests, trying the command)
    synthetic_samples: int = 2048
    flip_views: bool = True  # pick a random stored view (e.g. the horizontal flip) per sample


@dataclass
class OptimSection:
    lr: float = 4e-4
    beta1: float = 0.9
    beta2: float = 0.96
    weight_decay: float = 0.03  # on weight matrices only, not norms, biases, embeddings, position tables
    warmup_steps: float = 0.25  # steps, or a fraction of max_steps when <= 1
    end_lr: float = 1e-5  # cosine decay ends here
    grad_clip: float = 1.0  # 0 disables


@dataclass
class TrainConfig:
    out_dir: str = "runs/rar"
    max_steps: int = 1000
    batch_size: int = 64  # global batch per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1
    anneal_start: float = 0.5  # randomness annealing start: a step, or a fraction of max_steps when <= 1
    anneal_end: float = 0.75
    seed: int = 0
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    sample_every: int = 0  # 0: only at the end; needs a tokenizer to draw the grid
    sample_classes: List[int] = field(default_factory=list)  # classes of the sample grid; [] = the first 10
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    compile: bool = False
    # What the backward pass recomputes instead of keeping (rar.model.transformer.RECOMPUTE_MODES): "selective" keeps
    # only the linear layers' outputs (about half the activation memory, no slower on CPU), "full" only
    # each block's input (least memory, ~10-30% slower), "attention" everything but attention matrices.
    checkpointing: str = "selective"
    tf32: bool = True
    device: str = "auto"  # auto | cpu | cuda
    tensorboard: bool = True
    progress: bool = True
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)

    def steps_of(self, value: float) -> int:
        """A schedule point given as a step or as a fraction (<= 1) of max_steps."""
        return int(round(value * self.max_steps)) if value <= 1 else int(value)

    def validate(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}.")
        if self.checkpointing not in RECOMPUTE_MODES:
            raise ValueError(f"checkpointing must be one of {', '.join(RECOMPUTE_MODES)}, got {self.checkpointing!r}.")
        if self.max_steps <= 0 or self.batch_size <= 0 or self.grad_accum <= 0:
            raise ValueError("max_steps, batch_size and grad_accum must be positive.")
        if self.steps_of(self.anneal_end) < self.steps_of(self.anneal_start):
            raise ValueError(f"anneal_end ({self.anneal_end}) comes before anneal_start ({self.anneal_start}).")
        if not self.data.synthetic and not self.data.path:
            raise ValueError("data.path must name a folder written by `rar tokenize` (or set data.synthetic=true).")


# Keys that may change when a run is resumed (the rest must match the saved config).
RESUMABLE_CHANGES = {"max_steps", "save_every", "keep_last", "log_every", "sample_every", "progress",
                     "tensorboard", "device", "compile", "sample_classes", "checkpointing"}


def model_preset(cfg: TrainConfig, num_tokens: int, codebook_size: int, num_classes: int) -> Preset:
    """The generator's architecture, dropouts and sampling defaults: the preset's, changed by the
    `model` section's set keys, with the data's tokens per image, codebook and classes."""
    base = get_preset(cfg.model.preset)
    given = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "preset" and v is not None}

    def part(obj):
        return dataclasses.replace(obj, **{k: v for k, v in given.items() if hasattr(obj, k)})
    config = part(base.config).replace(num_tokens=num_tokens, codebook_size=codebook_size, num_classes=num_classes)
    return Preset(config, part(base.sampling), part(base.regularization))
