"""Editing cost against whole-image generation, same weights, same process, alternating runs
(issue #15's target: regenerating 25% of RAR-B's tokens takes at most 0.4x the time of generating
whole images at batch 1 and at most 0.65x at batch 8).

    python benchmarks/edit_speed.py --preset rar_b --batch-size 8 [--fraction 0.25] [--rounds 3]

Editing K of T tokens is one prefill of the T - K known tokens (one compute-bound pass) plus K
decode steps. Each sample gets its own random mask with exactly `fraction` * T tokens to
regenerate (`--mixed` draws a different count per sample instead: rows then carry padding). The
best of `rounds` timings of each counts; the host line (CPU capability, DRAM bandwidth, matmul
peak) is printed beside the ratio. Weights are random, as in sample_speed.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sample_speed import build_model, host_line  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="rar_b")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--mixed", action="store_true", help="a different number of tokens to regenerate per sample")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from rar.inference import generate, prepare
    from rar.inference.editing import edit

    torch.set_num_threads(args.threads)
    model = build_model(args.preset, "cpu", torch.float32)
    cfg, B, T = model.config, args.batch_size, model.config.num_tokens
    labels = torch.arange(B) * 7 % cfg.num_classes
    backend = prepare(model, rows=2 * B)
    g = torch.Generator().manual_seed(0)
    counts = torch.full((B,), round(args.fraction * T))
    if args.mixed:
        counts = torch.randint(round(0.5 * args.fraction * T), round(1.5 * args.fraction * T) + 1, (B,), generator=g)
    rank = torch.rand(B, T, generator=g).argsort(1).argsort(1)
    keep = rank >= counts[:, None]  # (B, T): counts[b] random tokens of row b to regenerate
    tokens = torch.randint(0, cfg.codebook_size, (B, T), generator=g)
    runs = {"generate": lambda: generate(backend, labels, seed=0),
            "edit": lambda: edit(backend, tokens, keep, labels, seed=0)}
    best = {k: float("inf") for k in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    line, host = host_line(args.threads, torch.float32)
    ratio = best["edit"] / best["generate"]
    print(line)
    print(f"{args.preset} batch {B}: generate {best['generate']:.2f} s, edit {int(counts.sum())} of {B * T} tokens "
          f"({100 * counts.sum() / (B * T):.0f}%) {best['edit']:.2f} s: ratio {ratio:.3f}")
    print(json.dumps({"preset": args.preset, "batch_size": B, "fraction": args.fraction, "mixed": args.mixed,
                      "generate_s": best["generate"], "edit_s": best["edit"], "ratio": ratio, **host}))


if __name__ == "__main__":
    main()
