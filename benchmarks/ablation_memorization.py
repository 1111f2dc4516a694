"""Do a run's samples copy its training digits? (issue #27's second hypothesis check.)

A model that overfits its 4,500 training digits can still score a good FD against the held-out
digits by reproducing training digits: FD in classifier features cannot tell a copy from a new
digit. This measures copying in token space. For each of 500 samples (50 per digit, raster
order, sampling seed 0) it finds the nearest training sequence by Hamming distance over the 64
tokens; the held-out digits, measured the same way, show how far a genuinely new digit lies.

    python benchmarks/ablation_memorization.py --train-tokens demo_out/tokens \
        --heldout-tokens demo_out/heldout "raster-only=runs/ablation_converged/raster_only/seed-0" \
        "annealed=runs/ablation_converged/annealed/seed-0" --guidance-scale 1.5

Prints a markdown table (exact copies, within 4 tokens, median nearest distance) and one JSON line.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from rar.data.batches import load_token_shards
from rar.inference import generate, prepare
from rar.model.weights import load_generator


def plain_tokens(folder: str) -> torch.Tensor:
    return torch.as_tensor(np.array(load_token_shards(folder).tokens[:, 0]), dtype=torch.long)  # (N, T)


def nearest_distance(queries: torch.Tensor, train: torch.Tensor, chunk: int = 100) -> torch.Tensor:
    """(Q,) the smallest number of differing tokens between each query (Q, T) and any train row (M, T)."""
    out = [(q[:, None, :] != train[None, :, :]).sum(-1).min(1).values  # (c, M) -> (c,)
           for q in queries.split(chunk)]
    return torch.cat(out)


def summary(d: torch.Tensor) -> dict:
    return {"exact_copies": float((d == 0).float().mean()), "within_4_tokens": float((d <= 4).float().mean()),
            "median_distance": float(d.float().median())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_FOLDER (its generator/ is loaded)")
    ap.add_argument("--train-tokens", required=True)
    ap.add_argument("--heldout-tokens", required=True)
    ap.add_argument("--guidance-scale", type=float, default=None, help="default: the preset's")
    ap.add_argument("--per-class", type=int, default=50)
    args = ap.parse_args()
    train = plain_tokens(args.train_tokens)
    rows = [{"run": "held-out digits (new, not generated)", **summary(nearest_distance(plain_tokens(args.heldout_tokens),
                                                                                      train))}]
    labels = torch.arange(10).repeat_interleave(args.per_class)  # (n,)
    for spec in args.runs:
        label, folder = spec.split("=", 1)
        backend = prepare(load_generator(f"{folder}/generator"))
        tokens = generate(backend, labels, seed=0, indices=range(len(labels)), guidance_scale=args.guidance_scale)
        rows.append({"run": label, **summary(nearest_distance(tokens, train))})
        print(rows[-1], flush=True)
    print(f"\nguidance {args.guidance_scale or 'preset'}; nearest of {len(train)} training digits by Hamming "
          f"distance over {train.shape[1]} tokens\n")
    print("| samples of | exact copies | within 4 tokens | median nearest distance |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['exact_copies']:.1%} | {r['within_4_tokens']:.1%} | {r['median_distance']:.0f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
