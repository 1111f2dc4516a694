"""Building rar's C kernels (`csrc/` of `rar.decode.cpu` and `rar.model`) at run time, on torch's own
OpenMP runtime.

Each kernel is one C file with no torch headers: the system C compiler builds it in ~0.1 s, once
per process and set of flags (`KernelBuilds`), instead of the ~30 s and C++ toolchain of `torch.utils.cpp_extension`.
The instruction-set flags come from `isa_flags` (the ISA torch itself dispatches to), passed in by
the caller, not from the build machine. The library must resolve OpenMP to the runtime
torch already loaded, so that its threads are torch's intra-op threads and no second pool fights
them for the cores. Where a kernel cannot be built (no compiler, not Linux, torch not built with
OpenMP), `build_library` raises RuntimeError saying why, and the callers fall back to torch.
"""
from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import torch


def address(t: torch.Tensor | None) -> int | None:
    """A kernel argument for an optional tensor: its data pointer, or None (NULL) for no tensor."""
    return None if t is None else t.data_ptr()


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


def isa_flags(isa: str | None = None, machine: str | None = None) -> list[str]:
    """Instruction-set flags for rar's compiled kernels: those of `isa`, by default the level torch
    dispatches to (`torch.backends.cpu.get_cpu_capability()`, which follows ATEN_CPU_CAPABILITY), so
    that a kernel never uses an instruction the CPU (or its emulation) lacks. Explicit -m flags
    rather than -march=x86-64-vN, which GCC < 11 does not know."""
    isa = torch.backends.cpu.get_cpu_capability() if isa is None else isa
    if (machine or platform.machine()).lower() not in ("x86_64", "amd64"):
        return []
    avx2 = ["-mavx2", "-mfma", "-mf16c"]
    return {"AVX512": [*avx2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"], "AVX2": avx2}.get(isa, [])


def build_library(source: str, flags, defines: dict[str, int] | None = None, *, package: str) -> ctypes.CDLL:
    """Compile `csrc/<source>` of `package` with `flags` and `-D` `defines`, load it, and check its
    OpenMP runtime; RuntimeError saying why where that is impossible."""
    if not sys.platform.startswith("linux"):
        raise RuntimeError(f"the compiled kernel is built on Linux only (this is {sys.platform})")
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        raise RuntimeError("torch is not built with OpenMP, whose thread pool the kernel shares")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    src = resources.files(package).joinpath(f"csrc/{source}")
    with tempfile.TemporaryDirectory() as tmp, resources.as_file(src) as path:
        lib = Path(tmp) / Path(source).with_suffix(".so").name
        cmd = [cc, "-O3", *flags, "-fopenmp", "-fPIC", "-shared",
               *(f"-D{k}={int(v)}" for k, v in (defines or {}).items()), str(path), "-o", str(lib)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: " + " | ".join(done.stderr.strip().splitlines()[-3:]))
        dll = ctypes.CDLL(str(lib))  # mapped now: the file itself may go with the directory
    ours, torchs = _library_defining(dll, "omp_get_max_threads"), _torch_openmp()
    if ours is None or ours != torchs:  # a second runtime's threads would fight torch's for the cores
        raise RuntimeError(f"the kernel's OpenMP runtime ({ours}) is not torch's ({torchs})")
    return dll


class KernelBuilds:
    """Kernels built so far, by key, or the reason one could not be (a str). A build takes ~0.1 s,
    so one instance, `PROCESS_BUILDS`, serves the whole process unless a caller passes its own
    (tests do, to build afresh)."""

    def __init__(self):
        self.kernels: dict = {}

    def get(self, key, make):
        """The kernel for `key`, made by `make()` on first use; None where it raised RuntimeError."""
        if key not in self.kernels:
            try:
                self.kernels[key] = make()
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                self.kernels[key] = str(e)
        kernel = self.kernels[key]
        return None if isinstance(kernel, str) else kernel

    def reason(self, key) -> str | None:
        """Why `get(key, ...)` gave None (None if it gave a kernel or was not called)."""
        kernel = self.kernels.get(key)
        return kernel if isinstance(kernel, str) else None


PROCESS_BUILDS = KernelBuilds()  # the process-wide cache that `rar.decode.prepare` uses by default


def load_kernel(source: str, package: str, argtypes: dict[str, list], defines: dict[str, int] | None = None,
                builds: KernelBuilds = PROCESS_BUILDS) -> ctypes.CDLL | None:
    """`csrc/<source>` of `package` built for the ISA torch dispatches to (`isa_flags`) with `-D`
    `defines`, once per process (`builds`), its functions' ctypes `argtypes` set; None where it
    cannot be built (`builds.reason` says why)."""
    flags = tuple(isa_flags())

    def make() -> ctypes.CDLL:
        lib = build_library(source, flags, defines, package=package)
        for name, types in argtypes.items():
            getattr(lib, name).argtypes = types
        return lib

    return builds.get((package, source, flags, tuple(sorted((defines or {}).items()))), make)
