"""Held-out bits per token and sample FD (digit-classifier features) against training step, from
the eval.jsonl that `rar train` writes with eval.every set (issue #27's convergence runs).

    python benchmarks/convergence_curves.py docs/convergence.png \
        "raster-only, 10k schedule=runs/convergence/raster_only/seed-0" \
        "raster-only, 4k=runs/ablation_converged/raster_only/seed-0" ...

Each argument after the output is LABEL=RUN_FOLDER; the table of every logged evaluation is printed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def read_eval(folder: str) -> list[dict]:
    path = Path(folder) / "eval.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(out: str, runs: list[str]) -> None:
    import matplotlib  # lazy: only this script plots
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for spec in runs:
        label, folder = spec.split("=", 1)
        recs = read_eval(folder)
        steps = [r["step"] for r in recs]
        axes[0].plot(steps, [r["heldout_bits_per_token"] for r in recs], marker="o", ms=3, label=label)
        if "sample_fd" in recs[0]:
            axes[1].plot(steps, [r["sample_fd"] for r in recs], marker="o", ms=3, label=label)
        print(f"{label}: " + ", ".join(f"{r['step']}: {r['heldout_bits_per_token']:.3f} bits"
                                       + (f" / FD {r['sample_fd']:.2f}" if "sample_fd" in r else "") for r in recs))
    axes[0].set(xlabel="training step (batch 64)", ylabel="held-out bits per token (run's order)",
                title="held-out NLL")
    axes[1].set(xlabel="training step (batch 64)", ylabel="FD of 300 samples (digit features)",
                title="sample quality")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
