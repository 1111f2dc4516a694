"""Sampling speed of `rar.generate` and, with --official-repo, of the official sampler on the same
weights in the same run.

    python benchmarks/sample_speed.py --preset rar_b --batch-size 8 [--device cpu|cuda]
        [--dtype float32|bfloat16] [--official-repo /path/to/1d-tokenizer] [--threads 2]
        [--steps 256 64 32] [--schedule cosine] [--order raster|random|wavefront]

`--steps` lists numbers of network passes for rar (parallel decoding below the number of
tokens; default one pass per token); each is measured in its own process and compared with the
official sampler (always one pass per token) of the same round.

Each measurement runs in its own subprocess so that peak memory (ru_maxrss) belongs to it alone;
with --rounds N the implementations alternate N times and each one's best run counts. rar prepares
its weights once per process, in the layout for the batch's row count
(`rar.prepare(model, rows=)`, as `rar sample` does once); that one-off time is printed
apart, as is what the backend runs (`--no-linear-kernel`: oneDNN instead of rar's few-rows
linear kernel; `--no-attention-kernel`: torch's attention instead of rar's compiled one).
Beside every ratio it prints the host: torch's CPU capability, the DRAM read bandwidth and the
matmul peak measured in the same run (hosts of one kind differ by 1.5-2x).
Weights are random (seeded) and perturbed so that every adaLN layer is active. With
--official-repo, both samplers decode greedily (top-k 1; upstream's multinomial draw replaced by
argmax, which costs the same) so that their tokens can be compared for identity. The last output
line is one JSON object with images_per_s, seconds_per_batch and peak_rss_mib of this package.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types

import torch


def build_model(preset: str, device: str, dtype: torch.dtype):
    from rar import RAR, RARConfig

    torch.manual_seed(0)
    with torch.device("meta"):
        model = RAR(RARConfig.preset(preset))
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # random weights, every adaLN active
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.to(device=device, dtype=dtype).eval()


def load_official_class(repo: str):
    """Import upstream modeling/rar.py with its two heavy imports stubbed: BaseModel is a plain
    nn.Module and timm's Mlp is an equivalent with the same submodule names."""
    import importlib.util

    class Mlp(torch.nn.Module):
        def __init__(self, in_features, hidden_features, act_layer=torch.nn.GELU, drop=0.0, **_):
            super().__init__()
            self.fc1, self.act = torch.nn.Linear(in_features, hidden_features), act_layer()
            self.drop1, self.norm = torch.nn.Dropout(drop), torch.nn.Identity()
            self.fc2, self.drop2 = torch.nn.Linear(hidden_features, in_features), torch.nn.Dropout(drop)

        def forward(self, x):
            return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))

    sys.modules["modeling"] = types.ModuleType("modeling")
    sys.modules["modeling.modules"] = types.SimpleNamespace(BaseModel=torch.nn.Module)
    sys.modules["timm"] = types.ModuleType("timm")
    sys.modules["timm.layers"] = types.SimpleNamespace(Mlp=Mlp)
    spec = importlib.util.spec_from_file_location("official_rar", f"{repo}/modeling/rar.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RAR


class _Cfg(dict):
    def __getattr__(self, k):
        return self[k]


def official_model(repo: str, ours, device, dtype):
    from rar.model.weights import to_official_state_dict

    c = ours.config
    gen = _Cfg(hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
               intermediate_size=c.mlp_size, image_seq_len=c.num_tokens, condition_num_classes=c.num_classes,
               dropout=ours.regularization.dropout, attn_drop=ours.regularization.attn_dropout)
    config = _Cfg(model=_Cfg(generator=gen, vq_model=_Cfg(codebook_size=c.codebook_size)))
    with torch.device("meta"):
        model = load_official_class(repo)(config)
    model = model.to_empty(device="cpu")
    model.attn_mask = torch.full((c.num_tokens + 1024,) * 2, float("-inf")).triu_(1)
    model.load_state_dict(to_official_state_dict(ours.float()), strict=True)
    return model.to(device=device, dtype=dtype).eval()


def run_one(args) -> dict:
    from rar import generate, prepare  # the public names: `--before` runs this with another checkout's rar

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    ours = build_model(args.preset, args.device, dtype)
    cfg, sampling = ours.config, ours.sampling
    labels = torch.arange(args.batch_size, device=args.device) * 7 % cfg.num_classes
    greedy = args.official_repo is not None
    setup_s, attention = 0.0, "upstream"
    if args.impl == "official":
        model = official_model(args.official_repo, ours, args.device, dtype)
        del ours
        torch.multinomial = lambda probs, num_samples: probs.argmax(-1, keepdim=True)  # greedy, same cost

        def sample():
            with torch.no_grad():
                return model.generate(labels, sampling.guidance_scale, sampling.temperature,
                                      sampling.guidance_scale_pow)
    else:
        t0 = time.perf_counter()
        rows = args.batch_size * (1 if sampling.guidance_scale in (0.0, 1.0) else 2)  # with the unconditional rows
        model = prepare(ours, rows=rows, attention_kernel=args.attention_kernel, compiled_linear=args.linear_kernel)  # once per process, like loading
        setup_s = time.perf_counter() - t0
        attention = model.description

        steps = int(args.impl.split("@")[1]) if args.impl.startswith("ours@") else None  # "ours@S": S passes

        def sample():
            return generate(model, labels, top_k=1 if greedy else None, seed=0,
                            **({} if steps is None else dict(steps=steps, schedule=args.schedule, order=args.order)))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times, tokens = [], None
    for _ in range(args.warmup + args.repeats):
        sync()
        t0 = time.perf_counter()
        tokens = sample()
        sync()
        times.append(time.perf_counter() - t0)
    sec = min(times[args.warmup:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    return {"impl": args.impl, "batch_size": args.batch_size, "seconds_per_batch": sec, "setup_s": setup_s,
            "images_per_s": args.batch_size / sec, "peak_rss_mib": peak, "backend": attention,
            "tokens": tokens.cpu().tolist()}


def flops_per_image(cfg, guided: bool = True) -> float:
    """Multiply-adds x 2 of one sampled image: every position through every block, adaLN included."""
    d, m, T, L = cfg.hidden_size, cfg.mlp_size, cfg.num_tokens, cfg.num_layers
    per_pos = L * (2 * (3 * d * d + d * d + 2 * d * m + 6 * d * d) + 2 * d * 2 * d) + 2 * d * cfg.codebook_size
    attn = sum(L * 4 * d * (p + 1) for p in range(T + 1))  # scores and weighted sum over the prefix
    return (per_pos * (T + 1) + attn) * (2 if guided else 1)


def matmul_peak(threads: int, dtype: torch.dtype = torch.float32, n: int = 2048, trials: int = 5) -> float:
    """FLOP/s of a large square matmul in `dtype`, the best of `trials` timings of 5 products (this
    machine's speed drifts; one timing once read 143 GFLOP/s against the usual ~185): the yardstick
    for "% of matmul peak"."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return 5 * 2 * n**3 / best


def dram_read_bandwidth(threads: int, mib: int = 512, trials: int = 5) -> float:
    """Bytes/s of a sum over a buffer 16x larger than any cache here (the best of `trials`): the
    yardstick for batch-1 decoding, which streams every weight once per step."""
    torch.set_num_threads(threads)
    x = torch.ones(mib * 2**20 // 4)
    x.sum()
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def host_line(threads: int, dtype: torch.dtype) -> tuple[str, dict]:
    """This host's CPU capability, DRAM read bandwidth and matmul peak, printed beside every ratio."""
    from rar.decode.cpu.capability import CPUCapability

    cap = CPUCapability.detect()
    peak, bw = matmul_peak(threads, dtype), dram_read_bandwidth(threads)
    info = {"cpu_capability": cap.isa, "cpu": cap.describe(), "dram_read_gb_s": bw / 1e9,
            "matmul_peak_gflops": peak / 1e9, "threads": threads}
    return (f"host: {cap.describe()}; DRAM read {bw / 1e9:.1f} GB/s; {str(dtype).removeprefix('torch.')} "
            f"matmul peak {peak / 1e9:.0f} GFLOP/s ({threads} threads)"), info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="rar_b")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="alternating runs of each implementation; the best counts")
    ap.add_argument("--attention-kernel", action=argparse.BooleanOptionalAction, default=True,
                    help="rar's compiled CPU attention kernel (fp32); --no-attention-kernel uses torch's")
    ap.add_argument("--linear-kernel", action=argparse.BooleanOptionalAction, default=True,
                    help="rar's compiled few-rows linear kernel (fp32); --no-linear-kernel keeps oneDNN")
    ap.add_argument("--official-repo", default=None, help="checkout of bytedance/1d-tokenizer to compare against")
    ap.add_argument("--before", default=None, metavar="CHECKOUT",
                    help="also run rar from this checkout (e.g. a git worktree of an earlier commit), alternating")
    ap.add_argument("--steps", type=int, nargs="+", default=None, help="network passes of rar's runs (parallel decoding)")
    ap.add_argument("--schedule", default=None, help="group sizes over the passes (rar.inference.parallel)")
    ap.add_argument("--order", default=None, help="generation order of the parallel runs, e.g. random or wavefront")
    ap.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.impl:  # child process
        print(json.dumps(run_one(args)))
        return
    from rar.model.config import get_preset

    cfg = get_preset(args.preset).config
    guided = get_preset(args.preset).sampling.guidance_scale not in (0, 1)
    ours = [f"ours@{s}" for s in args.steps] if args.steps else ["ours"]
    results, runs = {}, {"official": [], "before": [], **{k: [] for k in ours}}
    for _ in range(args.rounds):  # alternate the implementations: slow drifts of the machine hit both
        for impl in (["official"] if args.official_repo else []) + (["before"] if args.before else []) + ours:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--impl", impl]
            env = {**os.environ, "PYTHONPATH": args.before} if impl == "before" else None
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"  {impl}: {r['seconds_per_batch']:.2f} s/batch", flush=True)
            runs[impl].append(r["seconds_per_batch"])
            if impl not in results or r["seconds_per_batch"] < results[impl]["seconds_per_batch"]:
                results[impl] = r
    host, host_info = host_line(args.threads, getattr(torch, args.dtype)) if args.device == "cpu" else ("", {})
    peak = host_info.get("matmul_peak_gflops", float("nan")) * 1e9
    flops = flops_per_image(cfg, guided)
    for impl, r in results.items():
        frac = flops * r["images_per_s"] / peak
        print(f"{impl:9s} {args.preset} batch {args.batch_size} {args.dtype} {args.device}: "
              f"{r['seconds_per_batch']:.2f} s/batch, {r['images_per_s']:.3f} img/s, "
              f"peak {r['peak_rss_mib']:.0f} MiB, {frac:.1%} of matmul peak"
              + (f" (+{r['setup_s']:.2f} s once per process to prepare the weights)" if r.get("setup_s") else "")
              + f"; backend: {r['backend']}")
    for impl in ours[1:] if "official" not in results else ours:
        if impl.startswith("ours@"):
            base = "official" if "official" in results else ours[0]
            paired = [o / u for o, u in zip(runs[base], runs[impl])]
            print(f"{impl} vs {base}: {results[base]['seconds_per_batch'] / results[impl]['seconds_per_batch']:.2f}x "
                  "best vs best; per round: " + ", ".join(f"{x:.2f}x" for x in paired))
    if ours[0] != "ours":  # the summary below is about the first rar run
        results["ours"], runs["ours"] = results[ours[0]], runs[ours[0]]
    summary = {k: v for k, v in results["ours"].items() if k != "tokens"}
    summary.update(flops_per_image=flops, preset=args.preset, dtype=args.dtype, **host_info)
    if "official" in results:
        off = results["official"]
        summary["speedup_vs_official"] = off["seconds_per_batch"] / results["ours"]["seconds_per_batch"]
        summary["tokens_identical_to_official"] = off["tokens"] == results["ours"]["tokens"]
        # Each round's two runs are adjacent in time: their ratio is less exposed to the drift.
        summary["paired_speedups"] = [o / u for o, u in zip(runs["official"], runs["ours"])]
        print(f"speed-up vs official: {summary['speedup_vs_official']:.2f}x best vs best; per round: "
              + ", ".join(f"{x:.2f}x" for x in summary["paired_speedups"])
              + f" (median {statistics.median(summary['paired_speedups']):.2f}x); "
              f"greedy tokens identical: {summary['tokens_identical_to_official']}")
    if "before" in results:
        paired = [b / u for b, u in zip(runs["before"], runs["ours"])]
        summary["speedup_vs_before"] = results["before"]["seconds_per_batch"] / results["ours"]["seconds_per_batch"]
        summary["tokens_identical_to_before"] = results["before"]["tokens"] == results["ours"]["tokens"]
        print(f"this checkout vs {args.before}: {summary['speedup_vs_before']:.3f}x best vs best; per round: "
              + ", ".join(f"{x:.3f}x" for x in paired) + f"; tokens identical: {summary['tokens_identical_to_before']}")
    if host:
        print(host)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
