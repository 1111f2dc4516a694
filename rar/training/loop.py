"""Training RAR (paper Sec. 3): next-token cross-entropy where each sequence is randomly permuted
with probability r(step), r annealed from 1 to 0, plus class-label dropout for guidance.

Runs as one process or under torchrun (torch.distributed + DistributedDataParallel; the caller
initialises the process group). Everything random is a pure function of (seed, step) or lives in
the checkpoint, so a run killed at any point and restarted with the same command continues
exactly: same batches, same orders, same losses.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..core.checks import check_tokenizer_fits
from ..core.devices import check_memory, keep_freed_memory, resolve_device
from ..core.runconfig import config_from_dict
from ..core.schedules import warmup_cosine
from ..core.seeds import mix_seed
from ..data.batches import TokenData, gather_batch, global_batch_indices, load_token_shards, synthetic_tokens
from ..model.config import RARConfig
from ..model.orders import drop_labels, named_order, random_ratio, sample_orders
from ..model.transformer import RAR
from ..model.weights import save_generator
from ..tokenizer.vqgan import load_any_tokenizer
from . import checkpoints, logs, plots
from .config import OptimSection, TrainConfig, model_preset
from ..core.threads import ThreadGovernor
from .evaluation import RunEvaluator


def compute_loss(model, tokens: torch.Tensor, labels: torch.Tensor, orders: torch.Tensor,
                 recompute: str = "selective") -> torch.Tensor:
    """The RAR objective: cross-entropy of logits[b, j] against tokens[b, orders[b, j]]."""
    logits = model(tokens, labels, orders, recompute=recompute)  # (B, T, V)
    targets = tokens.gather(1, orders)  # (B, T) tokens in factorization order
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


# Activation floats kept per token and layer for the backward pass, in units of the width, a little
# under what was measured (torch 2.13, CPU: tiny at batch 1024 and RAR-B at batch 8 kept 31-44 d
# with checkpointing=attention, 23-33 d with selective); full keeps each block's input plus one
# block's activations while it is recomputed.
KEPT_PER_TOKEN_LAYER = {"attention": 28, "selective": 20, "full": 2}


def training_bytes(config: RARConfig, micro_batch: int, checkpointing: str) -> int:
    """A lower bound of one training step's memory: weights, gradients and AdamW's two moments
    (16 bytes per parameter), the activations kept for backward and the logits with their
    gradient, all fp32. A step refused by it cannot fit; one allowed may still not."""
    d, L, T, V = config.hidden_size, config.num_layers, config.num_tokens + 1, config.codebook_size
    params = L * (4 * d * d + 2 * d * config.mlp_size + 6 * d * d) + V * d
    kept = KEPT_PER_TOKEN_LAYER[checkpointing] * L + (KEPT_PER_TOKEN_LAYER["attention"] if checkpointing == "full" else 0)
    return 16 * params + 4 * micro_batch * T * (kept * d + 3 * V)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to optim.lr, then cosine decay to optim.end_lr at max_steps."""
    return warmup_cosine(step, cfg.optim.lr, cfg.optim.end_lr, cfg.steps_of(cfg.optim.warmup_steps), cfg.max_steps)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: not on norms, biases, embeddings, position tables, [cls]."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "embed" in name or "token" in name or "norm" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, o: OptimSection) -> torch.optim.AdamW:
    """AdamW with the paper's grouping; the fused kernel (one pass over each tensor, no temporaries)
    where torch has one (CPU and CUDA)."""
    device = next(model.parameters()).device.type
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                             fused=device in ("cpu", "cuda") or None)


def load_data(cfg: TrainConfig) -> TokenData:
    if cfg.data.synthetic:  # sized like the preset: its tokens per image, codebook and classes
        mc = RARConfig.preset(cfg.model.preset)
        return synthetic_tokens(cfg.data.synthetic_samples, mc.num_tokens, mc.codebook_size, mc.num_classes,
                                seed=cfg.seed)
    data = load_token_shards(cfg.data.path)
    if cfg.data.tokenizer:  # set by the user: it must exist and fit the tokens, before any training
        check_data_tokenizer(data, cfg.data.tokenizer, cfg.data.path)
    data.tokenizer = cfg.data.tokenizer or data.tokenizer
    return data


def check_data_tokenizer(data: TokenData, path: str, data_path: str) -> None:
    """data.tokenizer must exist and have the shards' codebook and tokens per image (a mismatch would
    otherwise surface only when the first sample grid is decoded, after training)."""
    try:
        vq = load_any_tokenizer(path).config
    except (OSError, ValueError) as err:
        raise type(err)(f"data.tokenizer: {err}") from None
    check_tokenizer_fits(f"the token shards {data_path!r}", data.codebook_size, data.tokens.shape[-1],
                         f"data.tokenizer {path!r}", vq.codebook_size, vq.num_tokens)


def step_batch(cfg: TrainConfig, data: TokenData, step: int, num_classes: int, label_dropout: float):
    """The whole global batch of `step` (identical on every rank): tokens, labels, orders, r."""
    idx = global_batch_indices(step, cfg.batch_size, len(data), cfg.seed)
    g = torch.Generator().manual_seed(mix_seed(cfg.seed, step, 1))
    r = random_ratio(step, cfg.steps_of(cfg.anneal_start), cfg.steps_of(cfg.anneal_end), cfg.r_final)
    T = data.tokens.shape[-1]
    base = None if cfg.order == "raster" else named_order(cfg.order, math.isqrt(T))
    orders = sample_orders(cfg.batch_size, T, r, g, base=base)  # (G, T)
    views = torch.randint(0, data.tokens.shape[1] if cfg.data.flip_views else 1, (cfg.batch_size,), generator=g)
    tokens, labels = gather_batch(data, idx, views)
    labels = drop_labels(labels, label_dropout, num_classes, g)
    return tokens, labels, orders, r


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg  # ranges were checked when cfg was built
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        if cfg.batch_size % (self.world * cfg.grad_accum):
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by processes x grad_accum "
                             f"= {self.world} x {cfg.grad_accum}.")
        self.device = resolve_device(cfg.device)
        self.out = Path(cfg.out_dir)
        self.data = load_data(cfg)
        preset = model_preset(cfg, self.data.tokens.shape[-1], self.data.codebook_size, self.data.num_classes)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.raw = RAR(preset.config, preset.regularization, preset.sampling).to(self.device)
        self.model = self.raw
        too_big = [c for c in cfg.sample_classes if c >= preset.config.num_classes]
        if too_big:
            raise ValueError(f"sample_classes has class {too_big[0]}, but the data has "
                             f"{preset.config.num_classes} classes (0..{preset.config.num_classes - 1}).")
        self.opt = make_optimizer(self.raw, cfg.optim)
        micro = cfg.batch_size // (self.world * cfg.grad_accum)
        check_memory(training_bytes(preset.config, micro, cfg.checkpointing), self.device,
                     f"a training step of {micro} sequences per process and micro-batch",
                     "lower batch_size, raise grad_accum or use checkpointing=full")
        self.step = 0
        torch.manual_seed(mix_seed(cfg.seed, self.rank, 2))  # dropout masks differ per rank

    def sample_grid(self, name: str) -> Path | None:
        """out_dir/`name`: a grid of samples (rank 0, when the data names its tokenizer)."""
        if self.rank != 0:
            return None
        return plots.sample_grid(self.raw, self.data.tokenizer, self.out / name, self.cfg.sample_classes, self.cfg.order)

    def resume(self) -> None:
        state = checkpoints.latest_checkpoint(self.out, self.rank, self.device)
        if state is None:
            checkpoints.check_fresh_start(self.out, self.rank, self.cfg.start_over)
            return
        self.raw.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.step = state["step"]
        checkpoints.set_rng_state(state.get("rng"))
        if self.rank == 0:
            logs.truncate_metrics(self.out, self.step)
            logs.truncate_metrics(self.out, self.step, "eval.jsonl")

    def wrap(self) -> None:
        """Ready the model for training steps: DDP, torch.compile, and on CPU an allocator that
        keeps freed memory (`keep_freed_memory`)."""
        if self.device.type == "cpu":
            keep_freed_memory()
        if self.cfg.tf32 and self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.raw, device_ids=ids)
        if self.cfg.compile:
            self.model = torch.compile(self.model)

    def train_step(self) -> dict:
        """One optimizer step over this rank's slice of the global batch, in grad_accum chunks."""
        cfg = self.cfg
        tokens, labels, orders, r = step_batch(cfg, self.data, self.step, self.raw.config.num_classes,
                                               self.raw.regularization.label_dropout)
        per_rank = cfg.batch_size // self.world
        mine = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        chunks = [t[mine].to(self.device).chunk(cfg.grad_accum) for t in (tokens, labels, orders)]
        lr = lr_at(cfg, self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
        total = torch.zeros((), device=self.device)
        for i, (tok, lab, ordr) in enumerate(zip(*chunks)):
            last = i == cfg.grad_accum - 1
            # DDP all-reduces gradients only on the last micro-batch; no_sync() is entered once per
            # micro-batch and covers its forward and backward.
            with nullcontext() if last or self.world == 1 else self.model.no_sync():
                with autocast:
                    loss = compute_loss(self.model, tok, lab, ordr, cfg.checkpointing) / cfg.grad_accum
                loss.backward()
            total += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), cfg.optim.grad_clip or float("inf"))
        if self.world > 1:
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
        loss_value = total.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {self.step + 1}; stopping. The last good "
                                     f"checkpoint in {self.out / 'checkpoints'} is kept; lower optim.lr or use fp32.")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "loss": loss_value, "lr": lr, "random_ratio": r,
                "grad_norm": float(grad_norm), "epoch": self.step * cfg.batch_size / len(self.data),
                "images_seen": self.step * cfg.batch_size}


def train(cfg: TrainConfig, on_step=None) -> dict:
    """Train (or resume) the run in cfg.out_dir; returns a summary. `on_step(step)` is called after
    every optimizer step (tests use it to kill the process at a chosen step). `cfg` may also be a
    plain dict of config keys (checked as a YAML file's would be)."""
    if isinstance(cfg, dict):
        cfg = config_from_dict(TrainConfig, cfg, "train(...) config")
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a rar TrainConfig or a dict of its keys, got {type(cfg).__name__}.")
    tr = Trainer(cfg)
    checkpoints.prepare_out_dir(cfg, tr.out, tr.rank)
    checkpoints.acquire_lock(tr.out, tr.rank, tr.device)
    try:
        return _run(cfg, tr, on_step)
    finally:
        checkpoints.release_lock(tr.out, tr.rank)


def _run(cfg: TrainConfig, tr: Trainer, on_step) -> dict:
    """Resume, train the remaining steps, export; a finished run is returned as it is."""
    tr.resume()
    if tr.step >= cfg.max_steps and (done := logs.finished_summary(tr.out, tr.step)) is not None:
        return done  # a finished run: nothing to train, nothing rewritten
    tokenizer = cfg.data.tokenizer or tr.data.tokenizer
    evaluator = RunEvaluator(cfg, tr.out, tokenizer, tr.raw.config) if cfg.eval.every and tr.rank == 0 else None
    checkpoints.write_config(cfg, tr.out, tr.rank)
    tr.wrap()
    logger = logs.Logger(cfg, tr.out, tr.rank, start=tr.step)
    threads = torch.get_num_threads()
    try:
        _train_steps(cfg, tr, logger, on_step, evaluator)
    finally:
        torch.set_num_threads(threads)
    summary = logs.summarize(tr.out, tr.step, logger.close())
    if tr.rank == 0:
        save_generator(tr.raw, tr.out / "generator", extra={"class_names": tr.data.class_names,
                                                            "tokenizer": tr.data.tokenizer, "steps": tr.step})
        tr.sample_grid("samples/final.png")
        plots.plot_loss(tr.out)
        (tr.out / "summary.json").write_text(json.dumps(summary, indent=2))
    if dist.is_initialized():
        dist.barrier()
    return summary


def _train_steps(cfg: TrainConfig, tr: Trainer, logger, on_step, evaluator=None) -> None:
    """The steps from tr.step to max_steps: log, evaluate, save, sample; CPU threads fixed or governed."""
    governor = None
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    elif tr.device.type == "cpu":
        governor = ThreadGovernor(torch.get_num_threads())
    tokens_per_step = cfg.batch_size * tr.raw.config.num_tokens
    last_t, last_step = time.perf_counter(), tr.step
    while tr.step < cfg.max_steps:
        t0 = time.perf_counter()
        rec = tr.train_step()
        if governor is not None:
            governor.step_done(time.perf_counter() - t0)
        if tr.step % cfg.log_every == 0 or tr.step == cfg.max_steps:
            now = time.perf_counter()
            rec["tokens_per_s"] = tokens_per_step * (tr.step - last_step) / max(now - last_t, 1e-9)
            last_t, last_step = now, tr.step
            logger.log(rec)
        logger.progress(rec)
        if evaluator is not None and (tr.step % cfg.eval.every == 0 or tr.step == cfg.max_steps):
            logs.append_record(tr.out, evaluator(tr.raw, tr.step))  # before the checkpoint: a resume redoes it
        if tr.step % cfg.save_every == 0 or tr.step == cfg.max_steps:
            checkpoints.save_checkpoint(tr.out, tr.step, tr.rank, tr.world, tr.raw, tr.opt, rec, cfg.keep_last)
        if cfg.sample_every and tr.step % cfg.sample_every == 0:
            tr.sample_grid(f"samples/step-{tr.step:07d}.png")
        if on_step is not None:
            on_step(tr.step)
