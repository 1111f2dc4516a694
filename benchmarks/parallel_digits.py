"""Quality of parallel decoding on the digits (issue #26): FD (the demo's classifier features,
against the held-out digits) and class accuracy of conditional samples versus the number of
network passes S, per model and order family, over seeds.

    python benchmarks/parallel_digits.py --tokenizer demo_out/tokenizer/tokenizer \\
        --model demo=demo_out/rar/generator --model r025=runs/r025/generator \\
        [--orders raster,random,wavefront] [--fractions 1,2,4,8] [--seeds 0,1] [--per-class 100] \\
        [--schedule cosine|arccos|linear|constant] [--json out.json] [--plot docs/parallel_digits.png]

S runs over T / f for each f of --fractions (T = the model's tokens). The reference is the
first model's sequential raster decoding (S = T, order raster); every row gives its FD ratio to
that reference's mean. Prints a markdown table for BENCHMARKS.md with the host line.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def run(args) -> list[dict]:
    from rar.data.mnist import load_mnist_digits
    from rar.inference import generate, prepare
    from rar.metrics.digits import decode_uint8, predict_digits, score, train_digit_classifier
    from rar.model.weights import load_generator
    from rar.tokenizer.vqgan import load_any_tokenizer

    data = load_mnist_digits(seed=0, n_train=4500)
    clf = train_digit_classifier(data, progress=False)
    _, held = predict_digits(clf, data["test_images"])
    tokenizer = load_any_tokenizer(args.tokenizer).eval()
    labels = torch.arange(10).repeat_interleave(args.per_class)
    rows = []
    for spec in args.model:
        name, path = spec.split("=", 1)
        backend = prepare(load_generator(path))
        T = backend.config.num_tokens
        for order in args.orders.split(","):
            for f in (int(x) for x in args.fractions.split(",")):
                for seed in (int(s) for s in args.seeds.split(",")):
                    t0 = time.perf_counter()
                    tokens = torch.cat([generate(backend, labels[i:i + 500], seed=seed, steps=T // f,
                                                 order=None if order == "raster" else order, schedule=args.schedule,
                                                 indices=range(i, min(i + 500, len(labels))))
                                        for i in range(0, len(labels), 500)])
                    res = score(clf, decode_uint8(tokenizer, tokens), labels.numpy(), held)
                    schedule = args.schedule or ("wavefront" if order == "wavefront" else "cosine")
                    rows.append({"model": name, "order": order, "steps": T // f, "tokens": T, "seed": seed,
                                 "schedule": schedule, **res,
                                 "seconds": time.perf_counter() - t0})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    ref = [r["fd"] for r in rows if r["model"] == rows[0]["model"] and r["order"] == "raster"
           and r["steps"] == r["tokens"]]
    ref_fd = statistics.mean(ref) if ref else float("nan")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["order"], r["steps"]), []).append(r)

    def ms(xs):
        return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"

    lines = ["| model | order | passes S | FD | FD / sequential raster | class accuracy % |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (model, order, steps), rs in groups.items():
        fds = [r["fd"] for r in rs]
        lines.append(f"| {model} | {order} | {steps} (T/{rs[0]['tokens'] // steps}) | {ms(fds)} | "
                     f"{statistics.mean(fds) / ref_fd:.2f}x | {ms([100 * r['accuracy'] for r in rs])} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    models = list(dict.fromkeys(r["model"] for r in rows))
    orders = list(dict.fromkeys(r["order"] for r in rows))
    styles = dict(zip(orders, ["-", "--", ":", "-."]))
    colors = dict(zip(models, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for model in models:
        for order in orders:
            mine = [r for r in rows if (r["model"], r["order"]) == (model, order)]
            pts = sorted({r["steps"] for r in mine})
            fd = [statistics.mean(r["fd"] for r in mine if r["steps"] == s) for s in pts]
            ax.plot(pts, fd, styles[order], marker="o", color=colors[model], label=f"{model}, {order}")
    ref = [r["fd"] for r in rows if r["model"] == models[0] and r["order"] == "raster" and r["steps"] == r["tokens"]]
    if ref:
        ax.axhline(1.25 * statistics.mean(ref), color="grey", lw=0.8, label=f"1.25x {models[0]} sequential raster")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel(f"network passes S (T = {rows[0]['tokens']} tokens; colour: model, line: order)")
    ax.set_ylabel("FD of 1,000 samples (lower is better)")
    ax.set_title("Parallel decoding on the digits: quality against passes (mean of 2 seeds)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--model", action="append", required=True, help="name=generator folder (repeatable)")
    ap.add_argument("--orders", default="raster,random,wavefront")
    ap.add_argument("--fractions", default="1,2,4,8")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--schedule", default=None, help="group sizes (default: cosine; the wavefront's own for it)")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--from-json", default=None, help="only print the table (and plot) of an earlier --json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.from_json:
        rows = json.loads(open(args.from_json).read())
    else:
        rows = run(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
    print(table(rows))
    print(f"host: {platform.machine()} {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
          f"{args.threads} threads; {sum(r['seconds'] for r in rows):.0f} s of sampling")


if __name__ == "__main__":
    main()
