"""Train a small MaskGIT-VQGAN (same architecture as the official tokenizer) on a small image set.

Losses: reconstruction (L2 by default) + codebook ||sg[z] - e||^2 + beta * ||z - sg[e]||^2 with the
straight-through estimator, as in VQ-VAE / the official quantizer. Two measures keep the codebook
in use (the usual failure of small VQ models is a handful of live codes):

* k-means init: the first `kmeans_init_step` steps train a plain autoencoder (no quantization);
  then the codebook is set by k-means on encoder outputs, so every code starts where data lives;
* dead-code restart: every `restart_every` steps, codes unused since the last check are moved
  onto random encoder outputs of the current batch.

No perceptual or adversarial loss: both need downloaded weights or many more steps, and the
digits tokenizer is plainly readable without them (see `report.json` of a run).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..core.checks import check_counts, finite
from ..core.devices import resolve_device
from ..core.files import check_outputs, ensure_writable_dir
from ..core.runconfig import check_types, config_from_dict, load_config, require, save_config, to_dict
from ..core.schedules import warmup_cosine
from ..core.threads import ThreadGovernor
from ..data.images import load_folder_images, make_grid, psnr, to_uint8
from ..data.mnist import load_mnist_digits
from .vqgan import VQGAN, VQGANConfig, load_any_tokenizer, save_tokenizer


@dataclass
class TokenizerDataConfig:
    dataset: str = "digits"  # "digits" (built-in MNIST demo digits) or "folder"
    path: Optional[str] = None  # image folder when dataset == "folder"
    n_train: int = 4500  # digits: train split size (the rest is held out)
    holdout: int = 500  # folder: images held out for PSNR / codebook usage
    max_images: Optional[int] = None  # folder: cap on images loaded (they are held in memory)
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self, 'data.')
        require(self.dataset in ("digits", "folder"), "data.dataset", self.dataset, "'digits' or 'folder'")
        for name in ("n_train", "holdout"):
            require(getattr(self, name) > 0, f"data.{name}", getattr(self, name), "a positive integer")
        require(self.max_images is None or self.max_images > 0, "data.max_images", self.max_images, "positive")
        require(self.seed >= 0, "data.seed", self.seed, "an integer >= 0")


@dataclass
class TokenizerTrainConfig:
    model: VQGANConfig = field(default_factory=lambda: VQGANConfig.preset("digits_f4_32"))
    data: TokenizerDataConfig = field(default_factory=TokenizerDataConfig)
    steps: int = 1200
    batch_size: int = 16  # small batches, more steps: better PSNR per CPU second (measured)
    lr: float = 8e-3
    min_lr_ratio: float = 0.05  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    recon_loss: str = "l2"  # "l2" or "l1"
    codebook_weight: float = 1.0
    commitment_cost: float = 0.25
    kmeans_init_step: int = 150  # 0 disables the autoencoder warm-up + k-means init
    restart_every: int = 50  # 0 disables dead-code restarts
    seed: int = 0
    device: str = "cpu"
    num_threads: Optional[int] = None  # torch CPU threads while training (None: governed, `ThreadGovernor`)
    out_dir: str = "runs/tokenizer_digits"
    log_every: int = 100
    grid_images: int = 32
    reuse: bool = True  # skip training when out_dir already holds a finished run of this config
    progress: bool = True

    def __post_init__(self) -> None:
        check_types(self, '')
        for name in ("steps", "batch_size", "log_every", "grid_images"):
            require(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        for name in ("warmup_steps", "kmeans_init_step", "restart_every", "seed"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "an integer >= 0")
        require(finite(self.lr) and self.lr > 0, "lr", self.lr, "a positive number")
        require(finite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio,
                "in [0, 1]")
        for name in ("weight_decay", "grad_clip", "codebook_weight", "commitment_cost"):
            require(finite(getattr(self, name)) and getattr(self, name) >= 0, name, getattr(self, name),
                    "a finite number >= 0")
        require(all(finite(b) and 0 <= b < 1 for b in self.betas), "betas", self.betas, "two numbers in [0, 1)")
        require(self.recon_loss in ("l1", "l2"), "recon_loss", self.recon_loss, "'l1' or 'l2'")
        require(self.num_threads is None or self.num_threads > 0, "num_threads", self.num_threads, "positive")


# The `--quick` setting: about 35 s on one CPU thread for the digits (PSNR ~24 dB, still readable).
QUICK_OVERRIDES = ("steps=300", "kmeans_init_step=50", "restart_every=25")


def _as_float_images(images) -> torch.Tensor:
    """uint8 (N, H, W[, 3]) arrays or float (N, 3, H, W) tensors -> float (N, 3, H, W) in [0, 1]."""
    if torch.is_tensor(images) and images.is_floating_point():
        return images.float()
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4):
        raise ValueError(f"images must be uint8 (N, H, W) / (N, H, W, 3) or float (N, 3, H, W), got "
                         f"{arr.dtype} {arr.shape}.")
    if arr.ndim == 3:
        arr = arr[..., None]
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 255.0  # (N, C, H, W)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def load_training_images(cfg: TokenizerTrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) float images (N, 3, H, W) in [0, 1] for the configured dataset."""
    d = cfg.data
    if d.dataset == "digits":

        data = load_mnist_digits(seed=d.seed, n_train=d.n_train)
        return _as_float_images(data["train_images"]), _as_float_images(data["test_images"])
    if d.dataset == "folder":

        if not d.path:
            raise ValueError("data.path must name an image folder when data.dataset is 'folder'.")
        images = _as_float_images(load_folder_images(d.path, cfg.model.resolution, d.max_images)[0])
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(d.seed))
        if len(images) <= d.holdout:
            raise ValueError(f"folder {d.path!r} has {len(images)} images, not more than data.holdout={d.holdout}.")
        return images[order[d.holdout:]], images[order[: d.holdout]]
    raise ValueError(f"data.dataset must be 'digits' or 'folder', got {d.dataset!r}.")


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means on rows of x (N, D) -> centroids (k, D); empty clusters get a random point."""
    g = torch.Generator().manual_seed(seed)
    centers = x[torch.randperm(len(x), generator=g)[:k]].clone()  # (k, D)
    for _ in range(iters):
        assign = torch.cdist(x, centers).argmin(1)  # (N,)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)  # (k,)
        empty = counts == 0
        centers = torch.where(empty[:, None], x[torch.randint(len(x), (k,), generator=g)], sums / counts.clamp_min(1)[:, None])
    return centers


@torch.no_grad()
def evaluate(model: VQGAN, images: torch.Tensor, batch_size: int = 250) -> dict:
    """PSNR of decode(encode(x)) and codebook usage (fraction of codes used) on `images`."""
    model.eval()
    device = next(model.parameters()).device
    codes, recons = [], []
    for i in range(0, len(images), batch_size):
        c = model.encode(images[i: i + batch_size].to(device))  # (b, T)
        codes.append(c.cpu())
        recons.append(model.decode(c).cpu())  # (b, 3, H, W) in [0, 1]
    codes_all, recon = torch.cat(codes), torch.cat(recons)
    counts = torch.bincount(codes_all.flatten(), minlength=model.config.codebook_size).double()
    p = counts / counts.sum()
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    return {"psnr": psnr(images, recon), "psnr_uint8": psnr(images, torch.from_numpy(to_uint8(recon)).permute(0, 3, 1, 2) / 255.0),
            "codebook_usage": float((counts > 0).double().mean()), "codebook_perplexity": perplexity,
            "images": len(images), "recon": recon}


def write_recon_grid(originals, recons, path: Union[str, Path], n: int = 32, nrow: int = 8) -> Path:
    """PNG with originals on the left, their reconstructions on the right, split by a gray bar.
    The n images are spread evenly over the set (sets sorted by class then show every class)."""
    pick = np.linspace(0, len(originals) - 1, num=min(n, len(originals))).round().astype(np.int64)
    left = make_grid(to_uint8(originals[pick]), nrow)
    right = make_grid(to_uint8(recons[pick]), nrow)
    bar = np.full((left.shape[0], 4, 3), 128, np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    Image.fromarray(np.concatenate([left, bar, right], axis=1)).save(path)
    return path


def _losses(model: VQGAN, cfg: TokenizerTrainConfig, x: torch.Tensor, quantize: bool):
    z = model.encode_continuous(x)  # (B, D, h, w)
    if not quantize:  # autoencoder warm-up before the k-means init
        return _recon_loss(model.decode_latent(z), x, cfg), torch.zeros(()), z, None
    codes, q = model.quantize(z)  # (B, T), (B, D, h, w)
    vq = cfg.codebook_weight * F.mse_loss(q, z.detach()) + cfg.commitment_cost * F.mse_loss(z, q.detach())
    recon = model.decode_latent(z + (q - z).detach())  # straight-through
    return _recon_loss(recon, x, cfg), vq, z, codes


def _recon_loss(recon: torch.Tensor, x: torch.Tensor, cfg: TokenizerTrainConfig) -> torch.Tensor:
    if cfg.recon_loss == "l2":
        return F.mse_loss(recon, x)
    if cfg.recon_loss == "l1":
        return F.l1_loss(recon, x)
    raise ValueError(f"recon_loss must be 'l1' or 'l2', got {cfg.recon_loss!r}.")


@torch.no_grad()
def _init_codebook(model: VQGAN, train: torch.Tensor, cfg: TokenizerTrainConfig, gen: torch.Generator) -> None:
    idx = torch.randperm(len(train), generator=gen)[:512]
    z = model.encode_continuous(train[idx].to(cfg.device))  # (n, D, h, w)
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).cpu()  # (n*h*w, D)
    model.quantize.embedding.weight.copy_(kmeans(flat, cfg.model.codebook_size, seed=cfg.seed))


@torch.no_grad()
def _restart_dead(model: VQGAN, usage: torch.Tensor, z: torch.Tensor, opt, gen: torch.Generator) -> int:
    dead = (usage == 0).nonzero().flatten()
    if len(dead) == 0:
        return 0
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*h*w, D)
    pick = torch.randint(len(flat), (len(dead),), generator=gen).to(flat.device)
    weight = model.quantize.embedding.weight
    weight[dead] = flat[pick]
    for v in opt.state.get(weight, {}).values():  # forget the Adam moments of moved codes
        if torch.is_tensor(v) and v.shape == weight.shape:
            v[dead] = 0
    return len(dead)


def _coerce_config(config) -> TokenizerTrainConfig:
    if isinstance(config, TokenizerTrainConfig):
        return config
    if isinstance(config, dict):
        return config_from_dict(TokenizerTrainConfig, config)
    raise ValueError(f"config must be a TokenizerTrainConfig or a dict, got {type(config).__name__}.")


def _comparable(cfg: TokenizerTrainConfig) -> dict:
    """The config without the fields that do not change the trained weights."""
    return to_dict(dataclasses.replace(cfg, reuse=True, progress=True, log_every=1, grid_images=1))


def _finished_run(cfg: TokenizerTrainConfig, out: Path) -> Optional[dict]:
    """The saved report when `out` holds a finished run of exactly this config (for reuse)."""
    report_file, cfg_file = out / "report.json", out / "config.yaml"
    if not (cfg.reuse and report_file.is_file() and cfg_file.is_file() and (out / "tokenizer" / "model.safetensors").is_file()):
        return None
    try:
        same = _comparable(load_config(TokenizerTrainConfig, cfg_file)) == _comparable(cfg)
    except (ValueError, OSError):
        return None
    report = json.loads(report_file.read_text()) if same else None
    return report if report and report.get("data_source") == "config" else None


def train_tokenizer(config: Union[TokenizerTrainConfig, dict], images=None, holdout_images=None) -> dict:
    """Train a VQGAN as configured; write `out_dir/{tokenizer/, config.yaml, report.json,
    reconstructions.png}` and return the report (PSNR, codebook usage, losses, timing).

    `images` / `holdout_images` (uint8 (N, H, W[, 3]) or float (N, 3, H, W)) replace the configured
    dataset. With `reuse`, an out_dir holding a finished run of the same config is not retrained.
    """
    cfg = _coerce_config(config)
    out = Path(cfg.out_dir)
    if images is None and (done := _finished_run(cfg, out)) is not None:
        return {**done, "reused": True}
    ensure_writable_dir(out, "out_dir")  # before the training, not after it
    resolve_device(cfg.device)  # a device torch lacks is one sentence naming it, before any work
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _train(cfg, out, images, holdout_images)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TokenizerTrainConfig, out: Path, images, holdout_images) -> dict:
    start = time.time()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if images is None:
        train, held = load_training_images(cfg)
    else:
        train = _as_float_images(images)
        held = _as_float_images(holdout_images) if holdout_images is not None else train[: min(len(train), 500)]
    res = cfg.model.resolution
    if train.shape[-2:] != (res, res):
        raise ValueError(f"training images are {tuple(train.shape[-2:])} but model.resolution is {res}.")
    model = VQGAN(cfg.model).to(cfg.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    usage = torch.zeros(cfg.model.codebook_size, dtype=torch.long)
    history, restarts, t0 = [], 0, time.time()
    quantize = cfg.kmeans_init_step <= 0

    bar = tqdm(range(cfg.steps), desc="train-tokenizer", unit="step", disable=not cfg.progress)
    governor = ThreadGovernor(torch.get_num_threads()) if cfg.num_threads is None and cfg.device == "cpu" else None
    for step in bar:
        t_step = time.perf_counter()
        if not quantize and step >= cfg.kmeans_init_step:
            _init_codebook(model, train, cfg, gen)
            quantize = True
        model.train()
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, cfg.lr, cfg.lr * cfg.min_lr_ratio, cfg.warmup_steps, cfg.steps)
        x = train[torch.randint(len(train), (cfg.batch_size,), generator=gen)].to(cfg.device)  # (B, 3, H, W)
        rec, vq, z, codes = _losses(model, cfg, x, quantize)
        opt.zero_grad(set_to_none=True)
        (rec + vq).backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        history.append((step, rec.detach().item(), vq.detach().item()))
        if codes is not None:
            usage += torch.bincount(codes.flatten().cpu(), minlength=cfg.model.codebook_size)
            if cfg.restart_every > 0 and (step + 1) % cfg.restart_every == 0 and step + 1 < cfg.steps * 0.9:
                restarts += _restart_dead(model, usage, z, opt, gen)
                usage.zero_()
        if cfg.progress and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            bar.set_postfix(recon=f"{history[-1][1]:.4f}", vq=f"{history[-1][2]:.4f}")
        if governor is not None:
            governor.step_done(time.perf_counter() - t_step)
    seconds = time.time() - t0
    report = _finish(model, cfg, out, held, history, restarts, seconds, "config" if images is None else "arrays")
    report["total_seconds"] = time.time() - start  # data loading + training + evaluation + saving
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _finish(model, cfg, out: Path, held, history, restarts: int, seconds: float, data_source: str) -> dict:
    ev = evaluate(model, held)
    recon = ev.pop("recon")
    head = [h[1] for h in history[: max(1, len(history) // 20)]]
    tail = [h[1] for h in history[-max(1, len(history) // 20):]]
    report = {
        "psnr": ev["psnr"], "psnr_uint8": ev["psnr_uint8"], "codebook_usage": ev["codebook_usage"],
        "codebook_perplexity": ev["codebook_perplexity"], "holdout_images": ev["images"],
        "recon_loss_start": float(np.mean(head)), "recon_loss_end": float(np.mean(tail)),
        "dead_code_restarts": restarts, "steps": cfg.steps, "train_seconds": seconds,
        "tokenizer": cfg.model.describe(), "out_dir": str(out), "data_source": data_source,
    }
    save_tokenizer(model.cpu(), out / "tokenizer")
    save_config(cfg, out / "config.yaml")
    write_recon_grid(held, recon, out / "reconstructions.png", n=cfg.grid_images)
    (out / "losses.json").write_text(json.dumps({"step": [h[0] for h in history], "recon": [h[1] for h in history],
                                                 "vq": [h[2] for h in history]}) + "\n")
    return report


def format_report(report: dict) -> str:
    return (f"tokenizer: PSNR {report['psnr']:.2f} dB (uint8 {report['psnr_uint8']:.2f}), codebook usage "
            f"{100 * report['codebook_usage']:.1f}% (perplexity {report['codebook_perplexity']:.1f}) on "
            f"{report['holdout_images']} held-out images; recon loss {report['recon_loss_start']:.4f} -> "
            f"{report['recon_loss_end']:.4f}; {report.get('total_seconds', report['train_seconds']):.1f} s"
            + (" (reused)" if report.get("reused") else "") + f"; saved to {report['out_dir']}")


def train_tokenizer_from_yaml(path: Optional[str], overrides=(), quick: bool = False) -> dict:
    """CLI glue for `rar train-tokenizer CONFIG.yaml [key=value ...] [--quick]`."""
    cfg = load_config(TokenizerTrainConfig, path, [*(QUICK_OVERRIDES if quick else ()), *overrides])
    return train_tokenizer(cfg)


def reconstruct_images(tokenizer: Union[VQGAN, str, Path], images, out_path: Optional[Union[str, Path]] = None,
                       nrow: int = 8, device: str = "cpu") -> dict:
    """Encode + decode `images`; write an original | reconstruction grid when `out_path` is given.

    Returns PSNR, codebook usage and the number of images. `tokenizer` is a VQGAN or a path for
    `load_any_tokenizer`.
    """
    model = tokenizer if isinstance(tokenizer, VQGAN) else load_any_tokenizer(tokenizer)
    x = _as_float_images(images)
    ev = evaluate(model.to(device), x.to(device), batch_size=32)
    recon = ev.pop("recon")
    if out_path is not None:
        ev["grid"] = str(write_recon_grid(x.cpu(), recon, out_path, n=len(x), nrow=nrow))
    return ev


def reconstruct(tokenizer: Union[str, Path], out_path: Union[str, Path], data: Optional[str] = None,
                dataset: Optional[str] = None, n: int = 16, resolution: Optional[int] = None,
                device: str = "cpu", overwrite: bool = False) -> dict:
    """CLI glue for `rar reconstruct`: the first `n` images of a folder (`data`) or of the held-out
    demo digits (`dataset='digits'`), center-cropped to the tokenizer's resolution. An existing
    `out_path` is replaced only with `overwrite`."""
    if (data is None) == (dataset is None):
        raise ValueError("pass exactly one of data (an image folder) or dataset ('digits').")
    check_counts(num=n)
    check_outputs([out_path], overwrite=overwrite, inputs=[tokenizer, data], images=True)
    model = load_any_tokenizer(tokenizer)
    res = model.config.resolution if resolution is None else resolution
    if isinstance(res, bool) or not isinstance(res, int) or res < 1 or res % model.config.downsample_factor:
        raise ValueError(f"resolution must be a positive multiple of the tokenizer's downsampling factor "
                         f"{model.config.downsample_factor}, got {res!r}.")
    if dataset is not None:
        if dataset != "digits":
            raise ValueError(f"dataset must be 'digits', got {dataset!r}.")

        test = load_mnist_digits()["test_images"]  # sorted by class: spread the picks over it
        images = test[np.unique(np.linspace(0, len(test) - 1, num=min(n, len(test))).round().astype(np.int64))]
    else:

        images = load_folder_images(data, res, n, spread=True)[0]
    return reconstruct_images(model, images, out_path, device=device)
