"""The decode step's attention over the KV cache, RAR-B's shapes, variants timed in one process.

    python benchmarks/attention_speed.py [--rows 16 2] [--rounds 6] [--threads 2]

Each variant runs every block's attention of one decode step (24 distinct caches of 16 heads x 257
slots x 48, so that nothing stays in cache) at the cached lengths 2, 18, ..., 242, interleaved
with the others round after round, and prints its mean time per step:
  - `torch`: `scaled_dot_product_attention` after a strided copy of the step's key and value;
  - `copy, no prefetch`: rar's kernel compiled with its prefetches removed, after the copy (the
    kernel before the prefetches);
  - `copy`: rar's kernel after the copy (the step before the fused write);
  - `fused`: rar's kernel writing the step's key and value itself (`new=`), as the decode step does.
Every variant's output is checked equal to `fused`'s (torch's within 1e-5). The host line (CPU,
DRAM read bandwidth, matmul peak) is printed beside the ratios.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sample_speed import host_line  # noqa: E402


def kernels(head_dim: int):
    """rar's kernel as shipped, and the same source with every prefetch removed."""
    from rar.core import toolchain
    from rar.decode.cpu import attention_kernel
    from rar.decode.cpu.capability import CPUCapability

    flags = CPUCapability.detect().compiler_flags()
    shipped = attention_kernel.build(head_dim, flags)
    src = Path(attention_kernel.__file__).parent / "csrc" / "single_query_attention.c"
    stripped = re.sub(r"__builtin_prefetch\(", "(void)(", src.read_text())
    root = Path(toolchain.tempfile.mkdtemp())
    (root / "csrc").mkdir()
    (root / "csrc" / src.name).write_text(stripped)
    original = toolchain.resources.files
    toolchain.resources.files = lambda _package: root  # the same build command, on the stripped copy
    try:
        plain = attention_kernel.build(head_dim, flags)
    finally:
        toolchain.resources.files = original
    return shipped, plain


def variants(rows: int, layers: int = 24, heads: int = 16, slots: int = 257, head_dim: int = 48):
    from rar.decode.backend import single_query_attention

    g = torch.Generator().manual_seed(0)
    caches = [(torch.randn(rows, heads, slots, head_dim, generator=g),
               torch.randn(rows, heads, slots, head_dim, generator=g)) for _ in range(layers)]
    qk = torch.randn(rows, 2, heads, head_dim, generator=g)  # q and k as the step has them: strided views
    q, k_new, v_new = qk[:, 0], qk[:, 1], torch.randn(rows, 3, heads, head_dim, generator=g)[:, 2]
    shipped, plain = kernels(head_dim)

    def after_copy(attend):
        def step(length):
            outs = []
            for k, v in caches:
                k[:, :, length - 1], v[:, :, length - 1] = k_new, v_new
                outs.append(attend(q, k[:, :, :length], v[:, :, :length]))
            return outs
        return step

    def fused(length):
        return [shipped(q, k[:, :, :length], v[:, :, :length], new=(k_new, v_new)) for k, v in caches]

    return {"torch": after_copy(single_query_attention), "copy, no prefetch": after_copy(plain),
            "copy": after_copy(shipped), "fused": fused}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 2], help="decode rows (2 x batch with guidance)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    line, _ = host_line(args.threads, torch.float32)
    torch.set_num_threads(args.threads)
    lengths = range(2, 258, 16)
    for rows in args.rows:
        runs = variants(rows)
        spent = dict.fromkeys(runs, 0.0)
        for _ in range(args.rounds):
            for length in lengths:
                ref = None
                for name, run in reversed(runs.items()):  # `fused` first: the reference of the others
                    t0 = time.perf_counter()
                    out = run(length)
                    spent[name] += time.perf_counter() - t0
                    ref = out if ref is None else ref
                    tol = 1e-5 if name == "torch" else 0.0
                    assert all(torch.allclose(a, b, rtol=0, atol=tol) for a, b in zip(out, ref)), name
        n = args.rounds * len(lengths)
        for name, s in spent.items():
            ratio = "" if name == "fused" else f"; fused is {s / spent['fused']:.2f}x faster"
            print(f"{rows} rows, {name}: {s / n * 1e3:.2f} ms per step (24 blocks){ratio}")
    print(line)


if __name__ == "__main__":
    main()
