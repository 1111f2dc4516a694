"""Editing on the digits (issue #15): raster baseline against kept-first any-order decoding, with
and without the true label, and the two guidance schedules, on the held-out digits of `rar demo`.

    python benchmarks/editing_digits.py --demo demo_out [--json editing_digits.json]

Needs a finished demo folder (its tokenizer and generator). Trains the demo's digit classifier
(train split only) and prints a markdown table for BENCHMARKS.md with the host line.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, help="a folder written by rar demo")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--schedules", default="generated,sequence")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from pathlib import Path

    from rar.data.mnist import load_mnist_digits
    from rar.metrics.digits import train_digit_classifier
    from rar.apps.editing_digits import evaluate_editing, format_table
    from rar.model.weights import load_generator
    from rar.decode.cpu.capability import CPUCapability
    from rar.tokenizer.vqgan import load_any_tokenizer

    demo = Path(args.demo)
    data = load_mnist_digits(seed=0, n_train=4500)
    t0 = time.perf_counter()
    clf = train_digit_classifier(data, progress=False)
    generator = load_generator(demo / "rar" / "generator")
    tokenizer = load_any_tokenizer(demo / "tokenizer" / "tokenizer").eval()
    res = evaluate_editing(generator, tokenizer, clf, data["test_images"], data["test_labels"],
                           schedules=tuple(args.schedules.split(",")), seed=args.seed, progress=True)
    print(f"host: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"{CPUCapability.detect().describe()}; torch {torch.__version__}; total {time.perf_counter() - t0:.0f} s")
    print(format_table(res))
    secs = sum(r["seconds"] for r in res["results"])
    print(f"\nediting compute: {secs:.1f} s for {len(res['results'])} x {res['num']} completions")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
