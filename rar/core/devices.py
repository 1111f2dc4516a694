"""Device names as users give them."""
from __future__ import annotations

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
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device {name!r} is not a device torch knows (expected auto, cpu, cuda or cuda:N).") from err


def rank_and_world_size(environ) -> tuple[int, int]:
    """(rank, world_size) from a torchrun / accelerate environment mapping the caller passes in
    (the CLI passes os.environ; library code never reads the environment itself)."""
    try:
        return int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1))
    except ValueError as err:
        raise ValueError(f"RANK / WORLD_SIZE must be integers, got {environ.get('RANK')!r} / "
                         f"{environ.get('WORLD_SIZE')!r}.") from err
