"""A compiled single-query attention kernel for fp32 decoding on CPU (`csrc/single_query_attention.c`).

torch's fused CPU kernel for `scaled_dot_product_attention` reads a decode step's KV cache at
~12-15 GB/s on the project's 2-core machine; this one streams it at the machine's bandwidth, which
takes RAR-B's attention at batch 8 (24 blocks, 128 cached positions) from 22.6 to 13.7 ms
(BENCHMARKS.md). It is built on first use, once per process, head size and instruction set, with
the system C compiler (~0.1 s) and OpenMP, on torch's own OpenMP runtime. The instruction-set
flags come from `rar.sampling.cpu.CPUCapability.compiler_flags` (the ISA torch itself dispatches
to), not from the build machine. The loader is kept rather than `torch.utils.cpp_extension`: one
C file with no torch headers compiles in ~0.1 s instead of ~30 s, and needs no C++ toolchain. Where that is impossible (no
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

_built: dict[tuple, "SingleQueryAttention | str"] = {}  # (head size, flags) -> kernel, or why there is none


class SingleQueryAttention:
    """softmax(q k^T / sqrt(Dh)) v for one query per (row, head): q (R, H, Dh) with a contiguous last
    dimension, k and v (R, H, L, Dh) with contiguous (L, Dh) planes, as slices of a `KVCache`
    layer are; returns (R, H * Dh). `starts` (R,) int64, if given, is each row's first cached position
    to attend to (0 <= start < L). Uses torch's intra-op threads (`torch.get_num_threads()`)."""

    def __init__(self, fn, head_dim: int, flags: tuple[str, ...] = ()):
        self._fn, self.head_dim, self.flags = fn, head_dim, tuple(flags)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 starts: torch.Tensor | None = None) -> torch.Tensor:
        R, H, L, Dh = k.shape
        ok = (q.dtype == k.dtype == v.dtype == torch.float32 and Dh == self.head_dim
              and q.device.type == k.device.type == v.device.type == "cpu"
              and q.shape == (R, H, Dh) and v.shape == k.shape and q.stride(-1) == 1
              and k.stride()[2:] == v.stride()[2:] == (Dh, 1) and 0 < L <= MAX_LENGTH)
        if not ok:
            raise ValueError(f"single_query_attention expects fp32 CPU q (R, H, {self.head_dim}) and cache slices "
                             f"(R, H, L<={MAX_LENGTH}, {self.head_dim}), got {tuple(q.shape)} and {tuple(k.shape)}.")
        if starts is not None:
            starts = starts.to(torch.int64).contiguous()
            if starts.shape != (R,) or starts.device.type != "cpu" or bool(((starts < 0) | (starts >= L)).any()):
                raise ValueError(f"starts must be (R,) = ({R},) int64 CPU first positions in [0, {L}).")
        out = torch.empty(R, H * Dh, dtype=torch.float32, device="cpu")  # not the default dtype/device
        strides = (ctypes.c_int64 * 6)(*q.stride()[:2], *k.stride()[:2], *v.stride()[:2])
        self._fn(q.data_ptr(), strides, k.data_ptr(), ctypes.byref(strides, 16), v.data_ptr(),
                 ctypes.byref(strides, 32), None if starts is None else starts.data_ptr(), out.data_ptr(),
                 R, H, L, Dh ** -0.5, torch.get_num_threads())
        return out


def _library_defining(lib: ctypes.CDLL, symbol: str) -> str | None:
    """The file mapped at the address `symbol` resolves to when looked up through `lib` (Linux)."""
    address = ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(a, 16) for a in fields[0].split("-"))
            if lo <= address < hi and len(fields) > 5:
                return fields[5]
    return None


def _torch_openmp() -> str | None:
    """The OpenMP runtime torch's CPU library runs on."""
    torch_cpu = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    return _library_defining(ctypes.CDLL(str(torch_cpu)), "omp_get_max_threads") if torch_cpu.exists() else None


def _flags(flags) -> tuple[str, ...]:
    from .cpu import CPUCapability

    return tuple(CPUCapability.detect().compiler_flags() if flags is None else flags)


def build(head_dim: int, flags=None) -> SingleQueryAttention:
    """Compile and load the kernel for `head_dim` with the instruction-set `flags` (default: this
    CPU's, `CPUCapability.compiler_flags`); RuntimeError saying why where it cannot be used."""
    flags = _flags(flags)
    if not sys.platform.startswith("linux"):
        raise RuntimeError(f"the compiled kernel is built on Linux only (this is {sys.platform})")
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        raise RuntimeError("torch is not built with OpenMP, whose thread pool the kernel shares")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    src = resources.files("rar.sampling").joinpath("csrc/single_query_attention.c")
    with tempfile.TemporaryDirectory() as tmp, resources.as_file(src) as path:
        lib = Path(tmp) / f"sqa{head_dim}.so"
        cmd = [cc, "-O3", *flags, "-fopenmp", "-fPIC", "-shared", f"-DHEAD_DIM={int(head_dim)}",
               str(path), "-o", str(lib)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: " + " | ".join(done.stderr.strip().splitlines()[-3:]))
        dll = ctypes.CDLL(str(lib))  # mapped now: the file itself may go with the directory
    ours, torchs = _library_defining(dll, "omp_get_max_threads"), _torch_openmp()
    if ours is None or ours != torchs:  # a second runtime's threads would fight torch's for the cores
        raise RuntimeError(f"the kernel's OpenMP runtime ({ours}) is not torch's ({torchs})")
    fn = dll.single_query_attention
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 3 + [ctypes.c_float, ctypes.c_int]
    return SingleQueryAttention(fn, head_dim, flags)


def load(head_dim: int, flags=None) -> SingleQueryAttention | None:
    """The kernel for `head_dim` and `flags` (default: this CPU's), built on the first call of the
    process; None where it cannot be."""
    key = (head_dim, _flags(flags))
    if key not in _built:
        try:
            _built[key] = build(head_dim, flags)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            _built[key] = str(e)
    kernel = _built[key]
    return kernel if isinstance(kernel, SingleQueryAttention) else None


def unavailable_reason(head_dim: int, flags=None) -> str | None:
    """Why `load(head_dim, flags)` gave None (None if it gave a kernel or was not called)."""
    kernel = _built.get((head_dim, _flags(flags)))
    return kernel if isinstance(kernel, str) else None
