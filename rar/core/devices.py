"""Device names as users give them."""
from __future__ import annotations

import ctypes
import sys

import torch


def resolve_device(name: str | None = "auto") -> torch.device:
    """"auto" (or None) is this process's current GPU when there is one, else the CPU; "cuda" is the
    current GPU (torchrun's LOCAL_RANK, set by the CLI); anything else must be a device torch knows."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but torch sees no CUDA GPU; use device=cpu.")
        return torch.device("cuda", torch.cuda.current_device())
    expected = "expected auto, cpu, cuda or cuda:N"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {name!r} is not a device torch knows ({expected}).") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r} was asked for, but torch sees {count} CUDA GPU(s) ({expected}).")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r} was asked for, but this torch build or machine has no MPS; use cpu.")
        return device
    if device.type != "cpu":
        raise ValueError(f"device {name!r} cannot run rar ({expected}, or mps on a Mac).")
    return device


def rank_and_world_size(environ) -> tuple[int, int]:
    """(rank, world_size) from a torchrun / accelerate environment mapping the caller passes in
    (the CLI passes os.environ; library code never reads the environment itself)."""
    try:
        return int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1))
    except ValueError as err:
        raise ValueError(f"RANK / WORLD_SIZE must be integers, got {environ.get('RANK')!r} / "
                         f"{environ.get('WORLD_SIZE')!r}.") from err


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of giving it back to the kernel. By default a
    block over 128 KiB is mmap'ed and unmapped again, and free memory at the top of the heap is
    trimmed, so every training step faults in fresh zeroed pages for its activations (thousands of
    page faults per step of a small model; BENCHMARKS.md). Process-wide; RSS then stays at the peak
    (which a training process reaches every step anyway). Returns False where it does not apply."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30) or mallopt(M_MMAP_THRESHOLD, 32 << 20)) \
        and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`: the free memory of a GPU, MemAvailable of a
    Linux host, None where unknown (no check is made then)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(needed: int, device, what: str, hint: str) -> None:
    """Before a large allocation: a ValueError of one sentence when `needed` bytes exceed what the
    device has free (Linux would otherwise overcommit and kill the process later)."""
    free = available_memory(torch.device(device) if device is not None else torch.device("cpu"))
    if free is not None and needed > free:
        raise ValueError(f"{what} needs about {needed / 2**30:.1f} GiB of memory, but {free / 2**30:.1f} GiB is free on "
                         f"{device or 'cpu'}; {hint}.")
