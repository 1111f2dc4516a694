"""Training-step speed and peak memory of the preset's real training step, and with
--official-repo the official model and loss on the same weights and batches, in the same run.

    python benchmarks/train_speed.py --preset rar_b --batch-size 8 --steps 3 [--device cpu|cuda]
        [--precision fp32|bf16] [--official-repo /path/to/1d-tokenizer] [--threads 2]

The step: dropout and attention dropout of the preset (0.1), r = 1 (every sequence permuted),
label dropout 0.1, AdamW with weight decay on weight matrices only, grad-norm clipping at 1.0.
Each implementation runs in its own subprocess, so peak RSS (ru_maxrss) is its own; with
--rounds N they alternate N times and each one's fastest run counts (this machine's speed drifts). Before
training, both compute the loss of the first batch in eval mode (no dropout): the two must agree.
The last output line is one JSON object with tokens_per_s and peak_rss_mib of this package.

    python benchmarks/train_speed.py --config configs/demo_rar.yaml --steps 12 --rounds 3 [--before CHECKOUT]

With --config the step is exactly `rar train`'s for that config (`Trainer.train_step`: its
model, dropouts, recompute mode, optimizer and batch), on synthetic tokens of the data's shape;
with --before the same step of another checkout of rar (e.g. a git worktree of an earlier
commit) alternates with this one, and both print the same losses when the change is exact.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from sample_speed import official_model  # noqa: E402  (same official-code loader)


def batches(cfg, batch_size: int, steps: int):
    from rar.model.orders import drop_labels, sample_orders

    g = torch.Generator().manual_seed(0)
    for _ in range(steps + 1):
        tokens = torch.randint(0, cfg.codebook_size, (batch_size, cfg.num_tokens), generator=g)
        labels = drop_labels(torch.randint(0, cfg.num_classes, (batch_size,), generator=g), 0.1, cfg.null_label, g)
        yield tokens, labels, sample_orders(batch_size, cfg.num_tokens, 1.0, g)


def official_groups(model, weight_decay):
    """Upstream's grouping rule (utils/train_utils.py create_optimizer)."""
    skip = lambda n, p: p.ndim < 2 or any(s in n for s in ("ln", "bias", "embedding", "norm", "gamma", "embed"))
    return [{"params": [p for n, p in model.named_parameters() if skip(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in model.named_parameters() if not skip(n, p)], "weight_decay": weight_decay}]


def run_config(args) -> dict:
    """Time `Trainer.train_step` of `rar train` with args.config (synthetic data of the preset's shape)."""
    try:
        from rar.core.runconfig import load_config
    except ImportError:  # a checkout from before the layers (--before)
        from rar.runconfig import load_config
    from rar.training.config import TrainConfig
    from rar.training.loop import Trainer

    torch.set_num_threads(args.threads)
    cfg = load_config(TrainConfig, args.config, [f"out_dir={args.out_dir}", "data.synthetic=true", "progress=false",
                                                 "tensorboard=false", f"num_threads={args.threads}"])
    tr = Trainer(cfg)
    tr.wrap()
    times, losses = [], []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        rec = tr.train_step()
        times.append(time.perf_counter() - t0)
        losses.append(rec["loss"])
    sec = min(times[1:])  # the first step is warm-up
    tokens = cfg.batch_size * tr.raw.config.num_tokens
    return {"impl": args.impl, "tokens_per_s": tokens / sec, "seconds_per_step": sec,
            "median_seconds_per_step": sorted(times[1:])[len(times[1:]) // 2],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "eval_loss": losses[0],
            "losses": losses}


def run_one(args) -> dict:
    if args.config:
        return run_config(args)
    from rar import RAR, RARConfig
    from rar.training.loop import compute_loss, make_optimizer
    from rar.training.config import OptimSection

    torch.set_num_threads(args.threads)
    cfg = RARConfig.preset(args.preset)
    torch.manual_seed(0)
    ours = RAR(cfg)
    with torch.no_grad():  # adaLN-zero would make every block an identity; perturb like the fixtures
        g = torch.Generator().manual_seed(1)
        for p in ours.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    if args.impl == "official":
        model = official_model(args.official_repo, ours, args.device, torch.float32)
        del ours
        opt = torch.optim.AdamW(official_groups(model, 0.03), lr=4e-4, betas=(0.9, 0.96))  # upstream's

        def loss_fn(tokens, labels, orders):
            cond = labels + cfg.codebook_size + 1
            logits, targets = model.forward_fn(tokens, cond, return_labels=True, orders=orders)
            return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten())
    else:
        model = ours.to(args.device)
        opt = make_optimizer(model, OptimSection(lr=4e-4, beta1=0.9, beta2=0.96, weight_decay=0.03))

        def loss_fn(tokens, labels, orders):
            return compute_loss(model, tokens, labels, orders, recompute=args.checkpointing)
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    data = [tuple(t.to(args.device) for t in b) for b in batches(cfg, args.batch_size, args.steps)]
    model.eval()
    with torch.no_grad():
        eval_loss = loss_fn(*data[0]).item()
    model.train()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times, losses = [], []
    for tokens, labels, orders in data[1:]:
        sync()
        t0 = time.perf_counter()
        with autocast:
            loss = loss_fn(tokens, labels, orders)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    sec = sorted(times[1:] or times)[len(times[1:] or times) // 2]  # median, first step is warm-up
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    return {"impl": args.impl, "tokens_per_s": args.batch_size * cfg.num_tokens / sec, "seconds_per_step": sec,
            "peak_rss_mib": peak, "eval_loss": eval_loss, "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="rar_b")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpointing", default="selective", choices=["attention", "selective", "full"],
                    help="what rar's backward pass recomputes (train config key `checkpointing`)")
    ap.add_argument("--official-repo", default=None)
    ap.add_argument("--rounds", type=int, default=1, help="alternating runs of each implementation; the best counts")
    ap.add_argument("--config", default=None, help="time rar train's step for this config (synthetic tokens)")
    ap.add_argument("--before", default=None, metavar="CHECKOUT", help="with --config: also another checkout's rar")
    ap.add_argument("--out-dir", default="/tmp/rar-train-speed", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.impl:
        print(json.dumps(run_one(args)))
        return
    results, runs = {}, {"official": [], "before": [], "ours": []}
    for _ in range(args.rounds):  # alternate the implementations: slow drifts of the machine hit both
        for impl in (["official"] if args.official_repo else []) + (["before"] if args.before else []) + ["ours"]:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--impl", impl]
            env = {**os.environ, "PYTHONPATH": args.before} if impl == "before" else None
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            r = json.loads(out.strip().splitlines()[-1])
            runs[impl].append(r)
            if impl not in results or r["tokens_per_s"] > results[impl]["tokens_per_s"]:
                results[impl] = r
            what = args.config or f"{args.preset} batch {args.batch_size} {args.precision} {args.device}"
            print(f"{impl:9s} {what}: "
                  f"{r['tokens_per_s']:.1f} tokens/s, {r['seconds_per_step']:.3f} s/step"
                  + (f" (median {r['median_seconds_per_step']:.3f})" if "median_seconds_per_step" in r else "")
                  + f", peak {r['peak_rss_mib']:.0f} MiB, "
                  f"eval loss {r['eval_loss']:.6f}, train losses {[round(x, 4) for x in r['losses']]}", flush=True)
    summary = {k: v for k, v in results["ours"].items() if k != "losses"}
    if "before" in results:
        paired = [o["tokens_per_s"] / b["tokens_per_s"] for b, o in zip(runs["before"], runs["ours"])]
        summary.update(speedup_vs_before=summary["tokens_per_s"] / results["before"]["tokens_per_s"],
                       paired_speedups_vs_before=paired,
                       max_loss_diff_vs_before=max(abs(a - b) for a, b in zip(results["before"]["losses"],
                                                                               results["ours"]["losses"])))
        print(f"this checkout vs {args.before}: {summary['speedup_vs_before']:.3f}x tokens/s best vs best; per round "
              + ", ".join(f"{x:.3f}x" for x in paired) + f"; largest loss difference {summary['max_loss_diff_vs_before']:.2e}")
    for line in open("/proc/cpuinfo") if sys.platform.startswith("linux") else []:
        if line.startswith("model name"):
            from rar.decode.cpu.capability import CPUCapability  # this checkout's
            print(f"host: {line.split(':', 1)[1].strip()}, {CPUCapability.detect().describe()}, {args.threads} threads")
            break
    if "official" in results:
        off = results["official"]
        summary.update(speedup_vs_official=summary["tokens_per_s"] / off["tokens_per_s"],
                       memory_vs_official=summary["peak_rss_mib"] / off["peak_rss_mib"],
                       eval_loss_abs_diff=abs(summary["eval_loss"] - off["eval_loss"]))
        print(f"vs official: {summary['speedup_vs_official']:.2f}x tokens/s, {summary['memory_vs_official']:.2f}x "
              f"peak memory, eval-loss difference {summary['eval_loss_abs_diff']:.2e}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
