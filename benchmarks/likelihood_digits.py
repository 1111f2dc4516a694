"""Any-order likelihood, generative classification and refinement on the digits (issue #16),
with the generator and tokenizer of a finished `rar demo` folder.

    python benchmarks/likelihood_digits.py --demo demo_out [--json out.json] [--skip-refine]

1. Held-out bits per token (500 digits, true labels) in raster order and in random orders
   (mixture and mean over K orders).
2. Generative classification accuracy of the 500 held-out digits from log p(x | c) (uniform
   prior): raster order, and K = 1, 4, 16 random orders; beside the demo's discriminative
   digit classifier (trained on the train split only).
3. Refinement of the demo's 1,000 samples (100 per class, seed 0, the generator's guidance):
   0, 1, 2, 4 rounds at fraction 0.1 and 0.25, `likelihood` against `random` selection, scored by
   the digit classifier (class accuracy) and the FD in its features against the held-out digits.
Compute time is printed beside every figure, with the host line.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def timed(fn, *a, **k):
    t0 = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True)
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-refine", action="store_true")
    ap.add_argument("--skip-classify", action="store_true")
    ap.add_argument("--skip-bits", action="store_true")
    ap.add_argument("--refine-guidance", type=float, default=None,
                    help="guidance scale of the resampled tokens (default: the generator's, as in sampling)")
    args = ap.parse_args()
    from rar.data.mnist import load_mnist_digits
    from rar.metrics.digits import predict_digits as digit_classify, train_digit_classifier
    from rar.apps.editing_digits import encode_digits
    from rar.metrics.digits import decode_uint8, score
    from rar.inference.likelihood import classify, log_likelihood
    from rar.model.weights import load_generator
    from rar.inference import generate, prepare
    from rar.decode.cpu.capability import CPUCapability
    from rar.inference.refinement import RefineSettings, iter_refine
    from rar.tokenizer.vqgan import load_any_tokenizer

    demo = Path(args.demo)
    data = load_mnist_digits(seed=0, n_train=4500)
    model = load_generator(demo / "rar" / "generator").eval()
    tokenizer = load_any_tokenizer(demo / "tokenizer" / "tokenizer").eval()
    clf = train_digit_classifier(data, progress=False)
    print(f"host: {CPUCapability.detect().describe()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    res = {}
    codes = encode_digits(tokenizer, data["test_images"])  # (500, T)
    labels = torch.as_tensor(data["test_labels"]).long()
    res["discriminative_accuracy"] = float((digit_classify(clf, data["test_images"])[0] == data["test_labels"]).mean())
    bits = {}
    for name, kw in [] if args.skip_bits else [("raster", {}), ("random_k1", dict(orders="random", num_orders=1)),
                     ("random_k16_mixture", dict(orders="random", num_orders=16)),
                     ("random_k16_mean", dict(orders="random", num_orders=16, reduction="mean"))]:
        nll, sec = timed(log_likelihood, model, codes, labels, **kw)
        bits[name] = {"bits_per_token": float(nll.mean()) / math.log(2), "seconds": round(sec, 2)}
        print(f"held-out {name}: {bits[name]['bits_per_token']:.4f} bits/token ({sec:.1f} s)")
    res["heldout_bits"] = bits
    if not args.skip_classify:
        acc = {}
        for name, kw in [("raster", {}), ("random_k1", dict(orders="random", num_orders=1)),
                         ("random_k4", dict(orders="random", num_orders=4)),
                         ("random_k16", dict(orders="random", num_orders=16))]:
            post, sec = timed(classify, model, codes, **kw)
            acc[name] = {"accuracy": float((post.argmax(1) == labels).float().mean()), "seconds": round(sec, 1)}
            print(f"generative classification {name}: {100 * acc[name]['accuracy']:.1f}% ({sec:.1f} s); "
                  f"discriminative {100 * res['discriminative_accuracy']:.1f}%")
        res["generative_classification"] = acc
    if not args.skip_refine:
        backend = prepare(model)
        _, held_feat = digit_classify(clf, data["test_images"])
        sample_labels = torch.arange(1000) // 100
        samples, sec0 = timed(lambda: torch.cat([generate(backend, sample_labels[s:s + 250], seed=0,
                                                          indices=range(s, s + 250)) for s in range(0, 1000, 250)]))

        def evaluate(tokens):
            return score(clf, decode_uint8(tokenizer, tokens), sample_labels.numpy(), held_feat)
        rows = [{"rounds": 0, "fraction": 0.0, "select": "-", **evaluate(samples), "seconds": round(sec0, 1)}]
        print(f"samples: {rows[0]}")
        for fraction in (0.1, 0.25):
            for select in ("likelihood", "random"):
                settings = RefineSettings(4, fraction, select)
                done, spent, t0 = [], 0.0, time.perf_counter()
                for s in range(0, 1000, 250):  # each batch's rounds in turn; the rounds of all batches recorded
                    done.append(list(iter_refine(backend, samples[s:s + 250], sample_labels[s:s + 250], settings,
                                                 seed=0, indices=range(s, s + 250),
                                                 guidance_scale=args.refine_guidance)))
                spent = time.perf_counter() - t0
                for r in (1, 2, 4):
                    tokens = torch.cat([d[r - 1] for d in done])
                    row = {"rounds": r, "fraction": fraction, "select": select, **evaluate(tokens),
                           "seconds": round(spent * r / 4, 1)}
                    rows.append(row)
                    print(row)
        res["refinement"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
