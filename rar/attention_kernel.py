"""A compiled single-query attention kernel for fp32 decoding on CPU (`csrc/single_query_attention.c`).

torch's fused CPU kernel for `scaled_dot_product_attention` reads a decode step's KV cache at
~12-15 GB/s on the project's 2-core machine; this one streams it at the machine's bandwidth, which
takes RAR-B's attention at batch 8 from ~22 to ~15 ms a step at 128 cached positions
(BENCHMARKS.md). It is built on first use, once per process and head size, with the system C
compiler (~0.3 s) and OpenMP, sharing torch's OpenMP runtime. Where that is impossible (no
compiler, not Linux, torch not built with OpenMP) `load` returns None, says why in
`unavailable_reason`, and the sampler uses torch's kernel: same results up to fp32 rounding.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import torch

MAX_LENGTH = 16384  # cached positions per call: the kernel keeps one pair's scores on its thread's stack

_built: dict[int, "SingleQueryAttention | str"] = {}  # head size -> kernel, or why there is none


class SingleQueryAttention:
    """softmax(q k^T / sqrt(Dh)) v for one query per (row, head): q (R, H, Dh) with a contiguous last
    dimension, k and v (R, H, L, Dh) with contiguous (L, Dh) planes, as slices of a `KVCache`
    layer are; returns (R, H * Dh). Uses torch's intra-op threads (`torch.get_num_threads()`)."""

    def __init__(self, fn, head_dim: int):
        self._fn, self.head_dim = fn, head_dim

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        R, H, L, Dh = k.shape
        ok = (q.dtype == k.dtype == v.dtype == torch.float32 and q.device.type == "cpu" and Dh == self.head_dim
              and q.shape == (R, H, Dh) and v.shape == k.shape and q.stride(-1) == 1
              and k.stride()[2:] == v.stride()[2:] == (Dh, 1) and 0 < L <= MAX_LENGTH)
        if not ok:
            raise ValueError(f"single_query_attention expects fp32 CPU q (R, H, {self.head_dim}) and cache slices "
                             f"(R, H, L<={MAX_LENGTH}, {self.head_dim}), got {tuple(q.shape)} and {tuple(k.shape)}.")
        out = torch.empty(R, H * Dh)
        strides = (ctypes.c_int64 * 6)(*q.stride()[:2], *k.stride()[:2], *v.stride()[:2])
        self._fn(q.data_ptr(), strides, k.data_ptr(), ctypes.byref(strides, 16), v.data_ptr(),
                 ctypes.byref(strides, 32), out.data_ptr(), R, H, L, Dh ** -0.5, torch.get_num_threads())
        return out


def _openmp_libraries() -> set[str]:
    """Files of OpenMP runtimes mapped into this process (Linux)."""
    names = ("libgomp", "libomp", "libiomp")
    with open("/proc/self/maps") as maps:
        return {line.split()[-1] for line in maps if any(n in line for n in names)}


def build(head_dim: int) -> SingleQueryAttention:
    """Compile and load the kernel for `head_dim`; RuntimeError saying why where it cannot be used."""
    if not sys.platform.startswith("linux"):
        raise RuntimeError(f"the compiled kernel is built on Linux only (this is {sys.platform})")
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        raise RuntimeError("torch is not built with OpenMP, whose thread pool the kernel shares")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    before = _openmp_libraries()
    src = resources.files("rar").joinpath("csrc/single_query_attention.c")
    with tempfile.TemporaryDirectory() as tmp, resources.as_file(src) as path:
        lib = Path(tmp) / f"sqa{head_dim}.so"
        cmd = [cc, "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", f"-DHEAD_DIM={int(head_dim)}",
               str(path), "-o", str(lib)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")
        dll = ctypes.CDLL(str(lib))  # mapped now: the file itself may go with the directory
    if _openmp_libraries() != before:  # a second runtime would fight torch's threads for the cores
        raise RuntimeError(f"the kernel loaded a second OpenMP runtime ({sorted(_openmp_libraries() - before)})")
    fn = dll.single_query_attention
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 3 + [ctypes.c_float, ctypes.c_int]
    return SingleQueryAttention(fn, head_dim)


def load(head_dim: int) -> SingleQueryAttention | None:
    """The kernel for `head_dim`, built on the first call of the process; None where it cannot be."""
    if head_dim not in _built:
        try:
            _built[head_dim] = build(head_dim)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            _built[head_dim] = str(e)
    kernel = _built[head_dim]
    return kernel if isinstance(kernel, SingleQueryAttention) else None


def unavailable_reason(head_dim: int) -> str | None:
    """Why `load(head_dim)` gave None (None if it gave a kernel or was not called)."""
    kernel = _built.get(head_dim)
    return kernel if isinstance(kernel, str) else None
