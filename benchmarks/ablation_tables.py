"""Markdown tables of `rar ablate` results for ABLATION.md: per variant, mean ± std over seeds of
each metric, with the paper's FID beside it where it has one.

    python benchmarks/ablation_tables.py runs/ablation_schedule/results.json [runs/ablation_orders/results.json]
    python benchmarks/ablation_tables.py runs/ablation_converged   # a study folder: every finished run in it

A study folder is read run by run (VARIANT/seed-N/eval.json, written when `rar ablate` evaluated
the run), so runs trained by several `rar ablate` calls into one folder (a subset of the seeds at
a time) come together in one table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from rar.apps.ablate import aggregate

PAPER_FID = {  # RAR-L on ImageNet 256 (the figures: Table 4 schedules, Table 3 orders)
    "raster_only": "3.08", "random_only": "3.01", "annealed": "2.18", "raster": "2.18", "z_curve": "2.29"}
METRICS = [("fd", "FD (digit features)", 2), ("class_accuracy", "class acc.", 3),
           ("heldout_bits_per_token", "held-out bits/token", 3), ("inpaint_top_half_accuracy", "top-half inpaint acc.", 3),
           ("parallel_fd", "FD at T/4 passes, random order", 2), ("parallel_class_accuracy", "class acc. at T/4", 3)]


def table(report: dict) -> str:
    lines = ["| variant | paper FID | " + " | ".join(m[1] for m in METRICS) + " | seeds |",
             "|---" * (len(METRICS) + 3) + "|"]
    for variant, m in report["summary"].items():
        cells = [f"{m[k]['mean']:.{d}f} ± {m[k]['std']:.{d}f}" if k in m else "-" for k, _, d in METRICS]
        n = len(next(iter(m.values()))["values"])
        lines.append(f"| {variant} | {PAPER_FID.get(variant, '-')} | " + " | ".join(cells) + f" | {n} |")
    per_run = ["", "Per run (FD / class accuracy):", ""]
    for r in report["runs"]:
        per_run.append(f"- {r['variant']} seed {r['seed']}: {r['metrics']['fd']:.2f} / {r['metrics']['class_accuracy']:.3f}")
    wall = f"\n\nWall time of the study: {report['seconds'] / 60:.1f} min.\n" if "seconds" in report else "\n"
    return "\n".join(lines + per_run) + wall


def collect(folder: Path) -> dict:
    """A results.json-like report of every evaluated run under a study folder."""
    runs = []
    for ev in sorted(folder.glob("*/seed-*/eval.json")):
        runs.append({"variant": ev.parent.parent.name, "seed": int(ev.parent.name.removeprefix("seed-")),
                     "out_dir": str(ev.parent), "metrics": json.loads(ev.read_text())["metrics"]})
    if not runs:
        raise SystemExit(f"{folder} holds no evaluated run (VARIANT/seed-N/eval.json)")
    return {"study": folder.name, "runs": runs, "summary": aggregate(runs)}


if __name__ == "__main__":
    for path in map(Path, sys.argv[1:]):
        rep = collect(path) if path.is_dir() else json.loads(path.read_text())
        print(f"### {rep['study']}\n\n{table(rep)}")
