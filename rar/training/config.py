"""The typed configuration of `rar train` (YAML + dotted overrides via `rar.core.runconfig`).

Defaults are the paper's recipe where it has one (AdamW 4e-4, betas 0.9/0.96, weight decay 0.03,
grad-norm clip 1.0, end lr 1e-5, label dropout 0.1, annealing from 50% to 75% of training).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from ..core.checks import check_probability
from ..core.checks import finite as _finite
from ..core.runconfig import check_types as _check_types
from ..core.runconfig import require as _require
from ..model.config import PRESETS, Preset, get_preset
from ..model.orders import NAMED_ORDERS
from ..model.transformer import RECOMPUTE_MODES


def _probability(key: str, v) -> None:
    check_probability(f"config key {key!r}", v)


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

    def __post_init__(self) -> None:
        _check_types(self, 'model.')
        _require(self.preset in PRESETS, "model.preset", self.preset, f"one of {', '.join(PRESETS)}")
        for name in ("hidden_size", "num_layers", "num_heads", "mlp_size"):
            v = getattr(self, name)
            _require(v is None or v > 0, f"model.{name}", v, "a positive integer (or unset)")
        for name in ("dropout", "attn_dropout", "label_dropout"):
            if getattr(self, name) is not None:
                _probability(f"model.{name}", getattr(self, name))
        for name, low in (("guidance_scale", -math.inf), ("guidance_scale_pow", 0.0)):
            v = getattr(self, name)
            _require(v is None or (_finite(v) and v >= low), f"model.{name}", v,
                     "a finite number" + (" >= 0" if low == 0 else "") + " (or unset)")
        v = self.temperature
        _require(v is None or (_finite(v) and v > 0), "model.temperature", v, "a positive number (or unset)")


@dataclass
class DataSection:
    path: str = ""  # a folder written by `rar tokenize`
    tokenizer: str = ""  # the tokenizer that made the tokens: decodes the sample grids (optional)
    synthetic: bool = False  # use rar.data.synthetic_tokens instead (smoke tests, trying the command)
    synthetic_samples: int = 2048
    flip_views: bool = True  # pick a random stored view (e.g. the horizontal flip) per sample

    def __post_init__(self) -> None:
        _check_types(self, 'data.')
        _require(self.synthetic_samples > 0, "data.synthetic_samples", self.synthetic_samples, "positive")


MAX_EVAL_SAMPLES = 50_000


@dataclass
class EvalSection:
    """Evaluation during training (`rar.training.evaluation`), written to eval.jsonl; off unless `every` > 0."""
    every: int = 0  # evaluate every this many steps and at the last step (0: never)
    heldout: str = ""  # token shards of held-out images (rar tokenize): bits per token in the run's order
    samples: int = 0  # this many samples (the digits in turn): FD in the demo's classifier features, class accuracy
    seed: int = 0  # of those samples: the same ones at every evaluation

    def __post_init__(self) -> None:
        _check_types(self, 'eval.')
        for name in ("every", "samples", "seed"):
            _require(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, f"eval.{name}",
                     getattr(self, name), "an integer >= 0")
        _require(self.every == 0 or bool(self.heldout) or self.samples > 0, "eval.every", self.every,
                 "0 unless eval.heldout or eval.samples says what to evaluate")
        _require(self.samples <= MAX_EVAL_SAMPLES, "eval.samples", self.samples,
                 f"at most {MAX_EVAL_SAMPLES} (the samples are drawn at every evaluation)")


@dataclass
class OptimSection:
    lr: float = 4e-4
    beta1: float = 0.9
    beta2: float = 0.96
    weight_decay: float = 0.03  # on weight matrices only, not norms, biases, embeddings, position tables
    warmup_steps: float = 0.25  # steps, or a fraction of max_steps when <= 1
    end_lr: float = 1e-5  # cosine decay ends here
    grad_clip: float = 1.0  # 0 disables

    def __post_init__(self) -> None:
        _check_types(self, 'optim.')
        _require(_finite(self.lr) and self.lr > 0, "optim.lr", self.lr, "a positive number")
        _probability("optim.beta1", self.beta1)
        _probability("optim.beta2", self.beta2)
        for name in ("weight_decay", "warmup_steps", "end_lr", "grad_clip"):
            v = getattr(self, name)
            _require(_finite(v) and v >= 0, f"optim.{name}", v, "a finite number >= 0")
        _require(self.end_lr <= self.lr, "optim.end_lr", self.end_lr, f"at most optim.lr ({self.lr}): the cosine "
                 "schedule decays from lr to end_lr")


@dataclass
class TrainConfig:
    out_dir: str = "runs/rar"
    max_steps: int = 1000
    batch_size: int = 64  # global batch per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1
    anneal_start: float = 0.5  # randomness annealing start: a step, or a fraction of max_steps when <= 1
    anneal_end: float = 0.75
    # The permutation probability anneals from 1 to r_final (the paper: 0, raster order at the end); a
    # floor > 0 keeps the model able to decode in any order, for editing (rar.model.orders.random_ratio).
    r_final: float = 0.0
    # The scan order of the sequences that are not permuted: the order annealing ends in (the paper's
    # Table 3 trains one model per order); sample such a model in the same order.
    order: str = "raster"
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
    # CPU threads: None adapts between torch's count and fewer while other processes compete for the
    # cores (rar.training.threads; results do not change); a number fixes it.
    num_threads: Optional[int] = None
    tensorboard: bool = True
    progress: bool = True
    # An out_dir holding a run whose checkpoints do not load is an error, unless start_over: then its
    # metrics.jsonl is cleared and training starts at 0. (Logged steps but no checkpoint: it starts over by itself.)
    start_over: bool = False
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def steps_of(self, value: float) -> int:
        """A schedule point given as a step or as a fraction (<= 1) of max_steps."""
        return int(round(value * self.max_steps)) if value <= 1 else int(value)

    def __post_init__(self) -> None:
        _check_types(self, '')
        _require(self.precision in ("fp32", "bf16"), "precision", self.precision, "'fp32' or 'bf16'")
        _require(self.checkpointing in RECOMPUTE_MODES, "checkpointing", self.checkpointing,
                 f"one of {', '.join(RECOMPUTE_MODES)}")
        for name in ("max_steps", "batch_size", "grad_accum", "save_every", "keep_last", "log_every"):
            _require(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        _require(self.batch_size % self.grad_accum == 0, "batch_size", self.batch_size,
                 f"divisible by grad_accum ({self.grad_accum})")
        _require(self.sample_every >= 0, "sample_every", self.sample_every, ">= 0 (0: only at the end)")
        _require(self.seed >= 0, "seed", self.seed, ">= 0")
        _require(self.num_threads is None or self.num_threads > 0, "num_threads", self.num_threads,
                 "a positive integer (or unset: adapt)")
        _require(all(c >= 0 for c in self.sample_classes), "sample_classes", self.sample_classes, "class ids >= 0")
        _require(bool(self.out_dir), "out_dir", self.out_dir, "a folder path")
        _require(self.data.synthetic or bool(self.data.path), "data.path", self.data.path,
                 "a folder written by `rar tokenize` (or set data.synthetic=true)")
        for name in ("anneal_start", "anneal_end"):
            _require(_finite(getattr(self, name)) and getattr(self, name) >= 0, name, getattr(self, name),
                     "a step, or a fraction of max_steps in [0, 1]")
        _require(_finite(self.r_final) and 0 <= self.r_final <= 1, "r_final", self.r_final, "a probability in [0, 1]")
        _require(self.order in NAMED_ORDERS, "order", self.order, f"one of {', '.join(NAMED_ORDERS)}")
        _require(self.steps_of(self.anneal_end) >= self.steps_of(self.anneal_start), "anneal_end", self.anneal_end,
                 f"at or after anneal_start ({self.anneal_start})")
        _require(self.device == "auto" or _is_device(self.device), "device", self.device,
                 "auto, cpu, cuda or cuda:N")


def _is_device(name: str) -> bool:

    try:
        torch.device(name)
    except RuntimeError:
        return False
    return True


# Keys that may change when a run is resumed (the rest must match the saved config).
RESUMABLE_CHANGES = {"max_steps", "save_every", "keep_last", "log_every", "sample_every", "progress",
                     "tensorboard", "device", "compile", "sample_classes", "checkpointing", "start_over",
                     "num_threads", "eval"}


def model_preset(cfg: TrainConfig, num_tokens: int, codebook_size: int, num_classes: int) -> Preset:
    """The generator's architecture, dropouts and sampling defaults: the preset's, changed by the
    `model` section's set keys, with the data's tokens per image, codebook and classes."""
    base = get_preset(cfg.model.preset)
    given = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "preset" and v is not None}

    def part(obj):
        return dataclasses.replace(obj, **{k: v for k, v in given.items() if hasattr(obj, k)})
    config = part(base.config).replace(num_tokens=num_tokens, codebook_size=codebook_size, num_classes=num_classes)
    return Preset(config, part(base.sampling), part(base.regularization))
