"""Sample FD and class accuracy of trained ablation runs over a grid of guidance scales, with the
digit evaluation of `rar ablate` (issue #27's hypothesis check): is a run's FD a property of
the model, or of the one guidance scale (the tiny preset's 3.0) every run is sampled with?
The paper tunes guidance per model; this does the same on the digits, cheaply (no training).

    python benchmarks/ablation_guidance.py --tokenizer demo_out/tokenizer/tokenizer \
        "raster-only=runs/ablation_converged/raster_only/seed-0" \
        "annealed=runs/ablation_converged/annealed/seed-0" --scales 1 1.5 2 3 4 --seeds 0 1

Samples: --per-class per digit, raster order, sampling seeds --seeds (FD spread between them is
the sampling noise). Prints a markdown table and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from rar.apps.ablation_digits import _shared
from rar.inference import generate, prepare
from rar.metrics.digits import decode_uint8, score
from rar.model.weights import load_generator


def scores(backend, ctx: dict, per_class: int, guidance_scale: float, seed: int) -> dict:
    labels = torch.arange(10).repeat_interleave(per_class)
    tokens = torch.cat([generate(backend, labels[s:s + 250], seed=seed, indices=range(s, min(s + 250, len(labels))),
                                 guidance_scale=guidance_scale)
                        for s in range(0, len(labels), 250)])  # (n, T)
    return score(ctx["classifier"], decode_uint8(ctx["tokenizer"], tokens), labels.numpy(), ctx["heldout_features"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_FOLDER (its generator/ is loaded)")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--per-class", type=int, default=50)
    args = ap.parse_args()
    ctx = _shared({}, args.tokenizer)
    rows = []
    for spec in args.runs:
        label, folder = spec.split("=", 1)
        backend = prepare(load_generator(f"{folder}/generator"))
        for g in args.scales:
            got = [scores(backend, ctx, args.per_class, g, s) for s in args.seeds]
            fd, acc = [r["fd"] for r in got], [r["accuracy"] for r in got]
            rows.append({"run": label, "guidance_scale": g, "fd": statistics.fmean(fd),
                         "fd_spread": max(fd) - min(fd), "class_accuracy": statistics.fmean(acc)})
            print(f"{label} g={g}: FD {rows[-1]['fd']:.2f} (seeds {', '.join(f'{x:.2f}' for x in fd)}), "
                  f"acc {rows[-1]['class_accuracy']:.3f}", flush=True)
    print("\n| run | guidance | FD (mean of seeds) | FD spread | class acc. |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['guidance_scale']} | {r['fd']:.2f} | {r['fd_spread']:.2f} | {r['class_accuracy']:.3f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
