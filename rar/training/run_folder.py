"""What a training run writes and reads back: the run folder, atomic checkpoints, metrics.jsonl,
progress, TensorBoard scalars, sample grids and the loss curve.

Checkpoints are folders `checkpoints/step-NNNNNNN/` holding `state.pt` (model, optimizer, step,
data position; written by rank 0) and `rng-R.pt` (each rank's RNG state). They are assembled
under a `.tmp` name and renamed when complete, so a crash never leaves a half-written checkpoint
that a restart would pick up.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..files import ensure_writable_dir
from ..runconfig import load_config, save_config, to_dict


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def prepare_out_dir(cfg, out: Path, rank: int) -> None:
    """Check the run folder: writable, and a resumed run uses the same config except for the keys
    in RESUMABLE_CHANGES. Every rank checks, so that all stop alike (`write_config` writes it)."""
    from .config import RESUMABLE_CHANGES, TrainConfig

    saved_path = out / "config.yaml"
    if saved_path.is_file() and any((out / "checkpoints").glob("step-*")):
        saved = _flat(to_dict(load_config(TrainConfig, saved_path)))
        for key, value in _flat(to_dict(cfg)).items():
            if key.split(".")[0] not in RESUMABLE_CHANGES and saved.get(key) != value:
                raise ValueError(f"{out} holds a run with {key}={saved.get(key)!r}, but this config has "
                                 f"{key}={value!r}; use another out_dir or the same config to resume.")
    ensure_writable_dir(out, "out_dir")  # every rank, so that all stop alike (the probe names differ)
    _barrier()


LOCK_NAME = ".train.lock"


def acquire_lock(out: Path, rank: int, device=None) -> None:
    """One training run per out_dir (two would mix their checkpoints and logs): rank 0 creates
    out_dir/.train.lock; a lock left by a process that no longer runs on this host is taken over.
    Every rank raises alike when another run holds it."""
    held_by = _try_lock(out / LOCK_NAME) if rank == 0 else None
    free = torch.tensor([held_by is None], dtype=torch.int32, device=device)
    if dist.is_initialized():
        dist.broadcast(free, src=0)
    if not free.item():
        raise ValueError(f"{out} is in use by another training run ({held_by or 'reported by rank 0'}); wait for it, "
                         f"use another out_dir, or delete {out / LOCK_NAME} if that run is gone.")


def release_lock(out: Path, rank: int) -> None:
    if rank == 0:
        (out / LOCK_NAME).unlink(missing_ok=True)


def _try_lock(path: Path) -> str | None:
    """None when this process now holds the lock, else who holds it."""
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                owner = {}
            if owner.get("host") == me["host"] and not _running(owner.get("pid")):
                path.unlink(missing_ok=True)  # left by a run that was killed: take it over
                continue
            return f"pid {owner.get('pid')} on {owner.get('host')}"
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        return None
    return f"a lock at {path} that could not be taken"


def _running(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def write_config(cfg, out: Path, rank: int) -> None:
    """The resolved config as out_dir/config.yaml (rank 0)."""
    if rank == 0:
        save_config(cfg, out / "config.yaml")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(tr, rec: dict) -> Path:
    ckpts = tr.out / "checkpoints"
    final = ckpts / f"step-{tr.step:07d}"
    tmp = ckpts / f"step-{tr.step:07d}.tmp"
    if tr.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    torch.save(rng_state(), tmp / f"rng-{tr.rank}.pt")
    _barrier()
    if tr.rank == 0:
        state = {"model": tr.raw.state_dict(), "optimizer": tr.opt.state_dict(), "step": tr.step,
                 "images_seen": rec["images_seen"], "epoch": rec["epoch"], "world_size": tr.world,
                 "model_config": tr.raw.config.to_dict(), "regularization": tr.raw.regularization.to_dict()}
        torch.save(state, tmp / "state.pt")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # atomic: the checkpoint appears complete or not at all
        for old in sorted(ckpts.glob("step-*[0-9]"))[:-tr.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _load_checkpoint(folder: Path, rank: int) -> dict | str:
    """The checkpoint's state with this rank's RNG state under "rng", or why it cannot resume exactly."""
    try:
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unreadable: an older checkpoint is used instead
        return f"unreadable state.pt ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    rng_file = folder / f"rng-{rank}.pt"
    try:
        state["rng"] = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
        if state["rng"] is not None and not torch.is_tensor(state["rng"].get("cpu")):
            raise ValueError("no CPU generator state in it")
    except Exception as err:  # noqa: BLE001 - a damaged RNG file: the run would not continue exactly
        return f"unreadable {rng_file.name} ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return state


def latest_checkpoint(out: Path, rank: int, device=None) -> dict | None:
    """The newest complete checkpoint that loads on every rank (the ranks agree on it, so that all
    resume from the same step), with this rank's RNG state under "rng"; None if there is none."""
    for folder in sorted((out / "checkpoints").glob("step-*[0-9]"), reverse=True):
        state = _load_checkpoint(folder, rank)
        usable = torch.tensor([isinstance(state, dict)], dtype=torch.int32, device=device)
        if dist.is_initialized():
            dist.all_reduce(usable, op=dist.ReduceOp.MIN)
        if usable.item():
            return state
        print(f"warning: rank {rank} skips checkpoint {folder}: "
              + (state if isinstance(state, str) else "another rank cannot load it"))
    return None


def check_fresh_start(out: Path, rank: int, start_over: bool) -> None:
    """Before step 0 in a folder that already holds a run: an error saying why it cannot resume,
    unless `start_over`. Then rank 0 clears metrics.jsonl (two runs never mix in one log) and moves
    the unusable checkpoints aside to `checkpoints-before-start-over*/` (nothing is deleted)."""
    metrics, saved = out / "metrics.jsonl", sorted((out / "checkpoints").glob("step-*[0-9]"))
    logged = metrics.is_file() and metrics.stat().st_size > 0
    if not logged and not saved:
        return
    if not start_over:
        why = (f"none of its {len(saved)} checkpoints loads" if saved
               else f"{metrics} has records but no checkpoint was written yet")
        raise ValueError(f"{out} holds a run that cannot be resumed ({why}); set start_over=true to train "
                         f"again from step 0 in it, or use another out_dir.")
    if rank == 0:
        metrics.write_text("")
        (out / "summary.json").unlink(missing_ok=True)
        if saved:
            aside, n = out / "checkpoints-before-start-over", 1
            while aside.exists():
                aside, n = out / f"checkpoints-before-start-over-{n}", n + 1
            (out / "checkpoints").rename(aside)
    _barrier()


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a last line cut short by a crash is ignored, any other
    unreadable line is an error naming the file and the line."""
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                break  # an interrupted write
            raise ValueError(f"{path} line {i + 1} is not a JSON record ({err}); fix or remove that line.") from err
    return records


def truncate_metrics(out: Path, step: int) -> None:
    """Drop records logged after the checkpoint we resume from, so the log reads as one run."""
    path = out / "metrics.jsonl"
    if path.is_file():
        records = read_metrics(path)
        keep = [r for r in records if r["step"] <= step]
        if len(keep) != len(path.read_text().splitlines()):
            path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def finished_summary(out: Path, step: int) -> dict | None:
    """The summary of a run already trained to `step` and exported, as it was written (not redone)."""
    summary, exported = out / "summary.json", out / "generator" / "config.json"
    if not (summary.is_file() and exported.is_file()):
        return None
    try:
        done = json.loads(summary.read_text())
    except json.JSONDecodeError:
        return None  # damaged: the export is redone and summary.json rewritten
    return done if isinstance(done, dict) and done.get("steps") == step else None


def summarize(out: Path, step: int, seconds: float) -> dict:
    """steps, the last logged loss and this session's seconds."""
    path = out / "metrics.jsonl"
    records = read_metrics(path) if path.is_file() else []
    return {"steps": step, "final_loss": records[-1]["loss"] if records else None, "seconds": seconds}


class Logger:
    """metrics.jsonl, a tqdm bar and TensorBoard scalars, on rank 0 only."""

    def __init__(self, cfg, out: Path, rank: int, start: int):
        self.active, self.t0 = rank == 0, time.perf_counter()
        self.bar = self.tb = None
        if not self.active:
            return
        if cfg.progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=cfg.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                self.tb = None  # tensorboard is optional
        self.file = open(out / "metrics.jsonl", "a")

    def log(self, rec: dict) -> None:
        if not self.active:
            return
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, rec["step"])
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", r=f"{rec['random_ratio']:.2f}",
                                 tok_s=f"{rec['tokens_per_s']:.0f}")

    def progress(self, rec: dict) -> None:
        if self.bar is not None:
            self.bar.update(rec["step"] - self.bar.n)

    def close(self) -> float:
        """Close the outputs; returns the seconds since the logger started."""
        if self.active:
            self.file.close()
            if self.bar is not None:
                self.bar.close()
            if self.tb is not None:
                self.tb.close()
        return time.perf_counter() - self.t0


def sample_grid(tr, name: str, per_class: int = 4) -> Path | None:
    """Decode a grid of samples of fixed classes, one row per class (needs the data's tokenizer),
    generated in the run's scan order (`TrainConfig.order`): the order its annealing ends in."""
    from ..data.images import save_grid
    from ..sampling.sampler import generate
    from ..tokenizer.vqgan import load_any_tokenizer

    if tr.rank != 0 or not tr.data.tokenizer or not Path(tr.data.tokenizer).exists():
        return None
    classes = tr.cfg.sample_classes or list(range(min(10, tr.raw.config.num_classes)))
    labels = torch.tensor(classes).repeat_interleave(per_class).to(tr.device)
    was_training = tr.raw.training
    tr.raw.eval()
    tokens = generate(tr.raw, labels, seed=0, order=None if tr.cfg.order == "raster" else tr.cfg.order)
    tr.raw.train(was_training)
    tokenizer = load_any_tokenizer(tr.data.tokenizer).to(tr.device)
    with torch.inference_mode():
        images = tokenizer.decode(tokens)
    path = tr.out / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_grid(images, path, nrow=per_class)


def plot_loss(out: Path) -> Path | None:
    """loss.png: the training loss with the randomness schedule r drawn on a second axis."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return None
    recs = read_metrics(path)
    if not recs:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in recs]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(steps, [r["loss"] for r in recs], color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["random_ratio"] for r in recs], color="tab:orange", linestyle="--", label="r")
    ax2.set_ylabel("random-order probability r", color="tab:orange")
    ax2.set_ylim(-0.05, 1.05)
    ax.set_title("RAR training loss and randomness annealing")
    fig.tight_layout()
    fig.savefig(out / "loss.png")
    plt.close(fig)
    return out / "loss.png"
