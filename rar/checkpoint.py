"""Loading the official generator checkpoints (`rar_{b,l,xl,xxl}.bin`) and the project's own format.

Official state dicts hold oversized position tables (`pos_embed` and `target_aware_pos_embed`
with T + 1024 rows, `timesteps_embeddings` with T + 100 rows). The model uses rows [0, T+2),
[2, T+2) and [0, T+1) of them respectively, and only those are kept.

The project's own format is a folder (or a `.safetensors` file with a sibling JSON) holding
`model.safetensors` and `config.json`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import PRESETS, RARConfig
from .model import PREFIX, RAR

OFFICIAL_POS_EXTRA = 1024  # extra rows of pos_embed / target_aware_pos_embed upstream
OFFICIAL_TIMESTEP_EXTRA = 100  # extra rows of timesteps_embeddings upstream
FORMAT_NAME = "rar-generator"


def official_shapes(cfg: RARConfig) -> dict[str, tuple[int, ...]]:
    """Every key of an official checkpoint for `cfg` with its shape, in state-dict order."""
    d, T, V, C, m = cfg.hidden_size, cfg.num_tokens, cfg.codebook_size, cfg.num_classes, cfg.mlp_size
    shapes = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, T + OFFICIAL_POS_EXTRA, d),
        "target_aware_pos_embed": (1, T + OFFICIAL_POS_EXTRA, d),
        "timesteps_embeddings": (1, T + OFFICIAL_TIMESTEP_EXTRA, d),
    }
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        shapes.update({
            p + "norm1.weight": (d,), p + "norm1.bias": (d,),
            p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
            p + "attn.q_norm.weight": (cfg.head_dim,), p + "attn.q_norm.bias": (cfg.head_dim,),
            p + "attn.k_norm.weight": (cfg.head_dim,), p + "attn.k_norm.bias": (cfg.head_dim,),
            p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
            p + "norm2.weight": (d,), p + "norm2.bias": (d,),
            p + "mlp.fc1.weight": (m, d), p + "mlp.fc1.bias": (m,),
            p + "mlp.fc2.weight": (d, m), p + "mlp.fc2.bias": (d,),
            p + "adaLN_modulation.1.weight": (6 * d, d), p + "adaLN_modulation.1.bias": (6 * d,),
        })
    shapes.update({
        "embeddings.weight": (V + 1 + C + 1, d),
        "adaln_before_head.adaLN_modulation.1.weight": (2 * d, d),
        "adaln_before_head.adaLN_modulation.1.bias": (2 * d,),
        "lm_head.weight": (V, d), "lm_head.bias": (V,),
    })
    return shapes


def official_parameter_count(cfg: RARConfig) -> int:
    """Parameters of the official layout (oversized tables included): 260,923,648 for rar_b."""
    total = 0
    for shape in official_shapes(cfg).values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def _read_state_dict(path_or_state_dict) -> dict[str, torch.Tensor]:
    if isinstance(path_or_state_dict, dict):
        sd = path_or_state_dict
    else:
        path = Path(path_or_state_dict)
        if not path.is_file():
            raise FileNotFoundError(
                f"generator checkpoint {str(path)!r} does not exist; expected an official file such as "
                f"rar_b.bin (HuggingFace hub repo yucornetto/RAR) or a folder saved by rar.save_generator.")
        # weights_only: never unpickle arbitrary code from a downloaded file.
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):  # tolerate {"model": sd}-style wrappers
        if wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    return {k.removeprefix("module."): v for k, v in sd.items()}


def infer_official_config(sd: dict[str, torch.Tensor]) -> RARConfig:
    """Sizes from tensor shapes (heads from the qk-norm width); sampling settings from the preset
    whose sizes match, else the rar_b defaults."""
    need = ["cls_token", "pos_embed", "embeddings.weight", "lm_head.weight", "blocks.0.mlp.fc1.weight",
            "blocks.0.attn.q_norm.weight"]
    for key in need:
        if key not in sd:
            raise ValueError(f"state dict has no key {key!r}; it is not an official RAR generator checkpoint.")
    d = sd["cls_token"].shape[-1]
    V = sd["lm_head.weight"].shape[0]
    layers = 0
    while f"blocks.{layers}.norm1.weight" in sd:
        layers += 1
    sizes = dict(
        hidden_size=d, num_layers=layers, num_heads=d // sd["blocks.0.attn.q_norm.weight"].shape[0],
        mlp_size=sd["blocks.0.mlp.fc1.weight"].shape[0], codebook_size=V,
        num_tokens=sd["pos_embed"].shape[1] - OFFICIAL_POS_EXTRA,
        num_classes=sd["embeddings.weight"].shape[0] - V - 2,
    )
    for preset in PRESETS.values():
        if all(getattr(preset, k) == v for k, v in sizes.items()):
            return preset.replace(**sizes)
    return RARConfig(**sizes)


def _shape_of(value) -> list | str:
    return list(value.shape) if hasattr(value, "shape") else f"a {type(value).__name__}, not a tensor"


def check_state_dict(sd: dict, expected: dict[str, tuple[int, ...]], what: str) -> None:
    """Strict key and shape check; the message names the first offending key and both shapes."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing:
        raise ValueError(f"{what}: missing key {missing[0]!r} (expected shape {list(expected[missing[0]])})"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else "") + ".")
    if unexpected:
        raise ValueError(f"{what}: unexpected key {unexpected[0]!r} with shape {_shape_of(sd[unexpected[0]])}"
                         + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "") + ".")
    for k, shape in expected.items():
        if not torch.is_tensor(sd[k]) or tuple(sd[k].shape) != tuple(shape):
            raise ValueError(f"{what}: key {k!r} has shape {_shape_of(sd[k])}, expected {list(shape)}.")


SIZE_FIELDS = ("hidden_size", "num_layers", "num_heads", "mlp_size", "num_tokens", "codebook_size", "num_classes")


def check_sizes(config: RARConfig, found: RARConfig, what: str) -> None:
    """An explicit config must agree with the checkpoint on every size."""
    for field in SIZE_FIELDS:
        if getattr(config, field) != getattr(found, field):
            raise ValueError(f"{what} does not match the given config: {field} is {getattr(found, field)} "
                             f"in the checkpoint and {getattr(config, field)} in the config.")


def load_official_generator(path_or_state_dict, config: RARConfig | None = None) -> RAR:
    """Load an official RAR checkpoint (path or state dict) into `rar.RAR`, strictly."""
    sd = _read_state_dict(path_or_state_dict)
    inferred = infer_official_config(sd)
    if config is None:
        config = inferred
    else:
        check_sizes(config, inferred, "official generator checkpoint")
    check_state_dict(sd, official_shapes(config), "official generator checkpoint")
    T = config.num_tokens
    sd = dict(sd)
    sd["pos_embed"] = sd["pos_embed"][:, :T + PREFIX]
    sd["target_aware_pos_embed"] = sd["target_aware_pos_embed"][:, PREFIX:T + PREFIX]
    sd["timesteps_embeddings"] = sd["timesteps_embeddings"][:, :T + 1]
    with torch.device("meta"):
        model = RAR(config)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()},
                          strict=True, assign=True)
    return model.eval()


def save_generator(model: RAR, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Save to a folder: model.safetensors + config.json (written to temporary names, then renamed)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / "model.safetensors.tmp"))
    os.replace(path / "model.safetensors.tmp", path / "model.safetensors")
    meta = {"format": FORMAT_NAME, "version": 1, "config": model.config.to_dict(), **(extra or {})}
    (path / "config.json.tmp").write_text(json.dumps(meta, indent=2))
    os.replace(path / "config.json.tmp", path / "config.json")
    return path


def load_generator(path: str | os.PathLike, config: RARConfig | None = None, map_location="cpu") -> RAR:
    """Load any generator: a folder of the project's format, or an official `.bin`/`.pt` file."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return load_official_generator(path, config)
    folder = path if path.is_dir() else path.parent
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"generator {str(path)!r} not found: expected an official .bin file or a folder "
                                f"with model.safetensors and config.json (written by rar train / rar.save_generator).")
    meta = json.loads((folder / "config.json").read_text())
    saved = RARConfig.from_dict(meta["config"])
    if config is not None:
        check_sizes(config, saved, f"generator {str(path)!r}")
    sd = load_file(str(folder / "model.safetensors"), device=str(map_location))
    with torch.device("meta"):
        model = RAR(saved)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_dict(sd, expected, f"generator {str(path)!r}")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def to_official_state_dict(model: RAR) -> dict[str, torch.Tensor]:
    """The model's weights in the official layout (position tables padded back with zero rows that
    the model never reads), e.g. to run the official code on the same weights."""
    cfg, sd = model.config, {k: v.detach().clone() for k, v in model.state_dict().items()}
    d, T = cfg.hidden_size, cfg.num_tokens

    def pad(t: torch.Tensor, before: int, total: int) -> torch.Tensor:
        out = t.new_zeros(1, total, d)
        out[:, before:before + t.shape[1]] = t
        return out

    sd["pos_embed"] = pad(sd["pos_embed"], 0, T + OFFICIAL_POS_EXTRA)
    sd["target_aware_pos_embed"] = pad(sd["target_aware_pos_embed"], PREFIX, T + OFFICIAL_POS_EXTRA)
    sd["timesteps_embeddings"] = pad(sd["timesteps_embeddings"], 0, T + OFFICIAL_TIMESTEP_EXTRA)
    return {k: sd[k] for k in official_shapes(cfg)}
