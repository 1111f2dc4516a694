"""What a training run logs: metrics.jsonl (read back on resume), a tqdm bar, TensorBoard scalars
and the run's summary."""
from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm.auto import tqdm


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


def truncate_metrics(out: Path, step: int, name: str = "metrics.jsonl") -> None:
    """Drop records logged after the checkpoint we resume from, so the log (metrics.jsonl, or
    `name`, e.g. eval.jsonl) reads as one run."""
    path = out / name
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
            self.bar = tqdm(total=cfg.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard is optional
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


def append_record(out: Path, rec: dict, name: str = "eval.jsonl") -> None:
    """One JSON record at the end of out/`name` (rank 0 writes; an evaluation record per call)."""
    with open(out / name, "a") as f:
        f.write(json.dumps(rec) + "\n")
