"""Weight files, shared by the generator and the tokenizer.

- Official checkpoints (`rar_b.bin`, `maskgit-vqgan-imagenet-f16-256.bin`) are torch state dicts,
  read with `weights_only=True` so that a downloaded file can never run code.
- The project's own format is a folder holding `model.safetensors` and `config.json`; both are
  written under temporary names and renamed, so a crash never leaves a half-written folder.
- Loading is strict: every key and shape is checked, and the message names the first mismatch.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file


def require_path(path, what: str, kind: str, expected: str = "") -> Path:
    """`path` as a Path when it is a `kind` ("file" or "folder"); else FileNotFoundError for a missing
    path, ValueError for the other kind, each naming `what` and ending with `expected`."""
    p = Path(path)
    tail = f"; expected {expected}" if expected else ""
    if not p.exists():
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist{tail}.")
    if kind == "file" and p.is_dir():
        raise ValueError(f"{what} {str(p)!r} is a folder, not a file{tail}.")
    if kind == "folder" and not p.is_dir():
        raise ValueError(f"{what} {str(p)!r} is a file, not a folder{tail}.")
    return p


def read_state_dict(path_or_state_dict, what: str, hint: str = "") -> dict[str, torch.Tensor]:
    """A state dict from an official file (or a dict), unwrapped from {"state_dict": ...} or
    {"model": ...} and without DDP's "module." prefixes. `hint` ends the missing-file message."""
    if isinstance(path_or_state_dict, Mapping):
        sd = dict(path_or_state_dict)
    else:
        path = Path(path_or_state_dict)
        if path.is_dir():
            raise ValueError(f"{what} {str(path)!r} is a folder, not a file{hint}.")
        if not path.is_file():
            raise FileNotFoundError(f"{what} {str(path)!r} does not exist{hint}.")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - empty, truncated, not a torch file, or unsafe pickle
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{what} {str(path)!r} is not a readable torch checkpoint ({first}).") from None
        if not isinstance(sd, Mapping):
            raise ValueError(f"{what} {str(path)!r} holds a {type(sd).__name__}, not a state dict.")
    for wrapper in ("state_dict", "model"):
        if wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = dict(sd[wrapper])
    return {str(k).removeprefix("module."): v for k, v in sd.items()}


def dataclass_from_dict(cls, d: Mapping):
    """A config dataclass from a dict saved beside weights; an unknown key is an error naming it."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; expected a subset of {sorted(known)}.")
    return cls(**d)


def shape_of(value) -> list | str:
    return list(value.shape) if torch.is_tensor(value) else f"a {type(value).__name__}, not a tensor"


def check_state_dict(sd: Mapping, expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Strict key and shape check; the message names the first offending key and both shapes."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing:
        raise ValueError(f"{what}: missing key {missing[0]!r} (expected shape {list(expected[missing[0]])})"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else "") + ".")
    if unexpected:
        raise ValueError(f"{what}: unexpected key {unexpected[0]!r} with shape {shape_of(sd[unexpected[0]])}"
                         + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "") + ".")
    for k, shape in expected.items():
        if not torch.is_tensor(sd[k]) or tuple(sd[k].shape) != tuple(shape):
            raise ValueError(f"{what}: key {k!r} has shape {shape_of(sd[k])}, expected {list(shape)}.")


def load_strict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str, assign: bool = False) -> None:
    """Check `sd` against the model's own keys and shapes, then load it."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_dict(sd, expected, what)
    for k in expected:  # NaN / inf weights (a diverged run, a damaged file) would make noise, not images
        t = sd[k]
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what}: key {k!r} holds NaN or infinite values; expected finite weights (the file "
                             "comes from a diverged run or is damaged).")
    model.load_state_dict({k: sd[k] for k in expected}, strict=True, assign=assign)


def check_not_empty(path, what: str) -> None:
    """'' would silently mean the current folder (Path('') is '.')."""
    if path is None or (isinstance(path, str) and not path.strip()):
        raise ValueError(f"{what} is an empty path; expected a folder or file name.")


def ensure_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Create the folder `path` if needed and check that files can be written in it, so that long
    work never ends unable to save: ValueError naming `what` otherwise."""
    check_not_empty(path, what)
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what} {str(p)!r} is an existing file; expected a folder (or a path that does not exist).")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".rar-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{what} {str(p)!r} is not writable ({err.strerror or err}).") from None
    return p


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def check_outputs(paths, *, overwrite: bool = False, inputs=(), images: bool = False) -> None:
    """Before any work, for every file a command will write: not an existing folder, never one of
    its `inputs` (not even with `overwrite`), a known image suffix when `images`, and not an
    existing file unless `overwrite` (`--overwrite`): nothing a user owns is replaced unasked."""
    ins = [Path(i) for i in inputs if i is not None and Path(i).exists()]
    for path in map(Path, paths):
        if path.is_dir():
            raise ValueError(f"output {str(path)!r} is an existing folder; expected a file name there.")
        check_not_inside_inputs(path, ins)
        if images and path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"output {str(path)!r} has the suffix {path.suffix or '(none)'!r}; expected an image "
                             f"suffix ({', '.join(IMAGE_SUFFIXES)}).")
        if not path.exists():
            continue
        same = next((i for i in ins if os.path.samefile(i, path)), None)
        if same is not None:
            raise ValueError(f"output {str(path)!r} is the input {str(same)!r}; choose another output folder.")
        if not overwrite:
            raise ValueError(f"output {str(path)!r} already exists; pass --overwrite (overwrite=True) to replace it, "
                             "or choose another output.")


def check_not_inside_inputs(path, inputs) -> None:
    """An output never goes inside an input folder (an image set, a model folder): a new file there
    would change the user's data, even where it replaces nothing."""
    real = Path(os.path.realpath(path))
    for i in inputs:
        if i is not None and Path(i).is_dir() and real.is_relative_to(os.path.realpath(i)):
            raise ValueError(f"output {str(path)!r} is inside the input folder {str(i)!r}; choose an output outside it.")


def write_atomic(path: str | os.PathLike, write) -> Path:
    """Call write(temporary path), then rename it to `path`: a run that fails or is killed midway
    leaves the earlier file (e.g. a score CSV) as it was, never half of a new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_folder(model: torch.nn.Module, path: str | os.PathLike, meta: dict) -> Path:
    """Write `model.safetensors` and `config.json` (meta) into the folder `path`, atomically each."""
    out = ensure_writable_dir(path, "the folder to save into")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors.tmp"), metadata={"format": str(meta.get("format", ""))})
    os.replace(out / "model.safetensors.tmp", out / "model.safetensors")
    (out / "config.json.tmp").write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(out / "config.json.tmp", out / "config.json")
    return out


def read_folder(path: str | os.PathLike, fmt: str, what: str, map_location="cpu") -> tuple[dict, dict, Path]:
    """(meta, state dict, folder) of a folder written by `save_folder` with meta["format"] == fmt.
    `path` may also be the `.safetensors` file inside it."""
    p = Path(path)
    folder = p.parent if p.suffix == ".safetensors" else p
    for f in (folder / "model.safetensors", folder / "config.json"):
        if not f.is_file():
            raise FileNotFoundError(f"{what} {str(p)!r}: {str(f)!r} does not exist; expected a folder holding "
                                    "model.safetensors and config.json.")
    try:
        meta = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {str(p)!r}: config.json is not valid JSON ({err}).") from err
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{what} {str(p)!r}: config.json has format {found!r}, expected {fmt!r}.")
    try:
        state = load_file(str(folder / "model.safetensors"), device=str(map_location))
    except Exception as err:  # noqa: BLE001 - safetensors' own errors: truncated or not a safetensors file
        raise ValueError(f"{what} {str(p)!r}: model.safetensors is not readable ({err}).") from None
    return meta, state, folder
