"""The run folder of a training run: one run per folder (a lock), the saved config that a resume
must match, and atomic checkpoints.

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
from pathlib import Path

import torch
import torch.distributed as dist

from ..core.files import ensure_writable_dir
from ..core.runconfig import load_config, save_config, to_dict
from .config import RESUMABLE_CHANGES, TrainConfig


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def prepare_out_dir(cfg, out: Path, rank: int) -> None:
    """Check the run folder: writable, and a resumed run uses the same config except for the keys
    in RESUMABLE_CHANGES. Every rank checks, so that all stop alike (`write_config` writes it)."""
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


def save_checkpoint(out: Path, step: int, rank: int, world_size: int, model, optimizer, rec: dict,
                    keep_last: int) -> Path:
    """checkpoints/step-NNNNNNN/: state.pt (rank 0: model, optimizer, step, data position) and every
    rank's rng-R.pt, assembled under a .tmp name and renamed; only the newest `keep_last` are kept."""
    ckpts = out / "checkpoints"
    final = ckpts / f"step-{step:07d}"
    tmp = ckpts / f"step-{step:07d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")
    _barrier()
    if rank == 0:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                 "images_seen": rec["images_seen"], "epoch": rec["epoch"], "world_size": world_size,
                 "model_config": model.config.to_dict(), "regularization": model.regularization.to_dict()}
        torch.save(state, tmp / "state.pt")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # atomic: the checkpoint appears complete or not at all
        for old in sorted(ckpts.glob("step-*[0-9]"))[:-keep_last]:
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


def _aside(path: Path, stem: str, suffix: str = "") -> Path:
    """A free name `stem`, `stem-1`, ... beside `path` for moving something aside."""
    target, n = path.parent / f"{stem}{suffix}", 1
    while target.exists():
        target, n = path.parent / f"{stem}-{n}{suffix}", n + 1
    return target


def check_fresh_start(out: Path, rank: int, start_over: bool) -> None:
    """Before step 0 in a folder that already holds a run. A run that logged steps but never wrote a
    checkpoint (e.g. interrupted early) has nothing to resume: it starts over by itself, its
    metrics.jsonl moved aside to `metrics-before-start-over*.jsonl`. A run whose checkpoints do not
    load is an error saying why, unless `start_over`: then rank 0 clears metrics.jsonl (two runs
    never mix in one log) and moves the checkpoints aside to `checkpoints-before-start-over*/`.
    Nothing is deleted."""
    metrics, saved = out / "metrics.jsonl", sorted((out / "checkpoints").glob("step-*[0-9]"))
    logs = [p for p in (metrics, out / "eval.jsonl") if p.is_file() and p.stat().st_size > 0]
    if not logs and not saved:
        return
    if not saved:
        if rank == 0:
            kept = []
            for log in logs:  # metrics.jsonl -> metrics-before-start-over.jsonl, eval.jsonl alike
                kept.append(_aside(log, f"{log.stem}-before-start-over", ".jsonl"))
                log.rename(kept[-1])
            (out / "summary.json").unlink(missing_ok=True)
            print(f"{out} logged steps but wrote no checkpoint, so there is nothing to resume: starting over "
                  f"(its logs are kept as {', '.join(p.name for p in kept)}).")
        _barrier()
        return
    if not start_over:
        raise ValueError(f"{out} holds a run that cannot be resumed (none of its {len(saved)} checkpoints loads); "
                         f"set start_over=true to train again from step 0 in it, or use another out_dir.")
    if rank == 0:
        metrics.write_text("")
        evals = out / "eval.jsonl"
        if evals.is_file():  # its records belong to the run that cannot resume
            evals.rename(_aside(evals, "eval-before-start-over", ".jsonl"))
        (out / "summary.json").unlink(missing_ok=True)
        (out / "checkpoints").rename(_aside(out / "checkpoints", "checkpoints-before-start-over"))
    _barrier()
