"""Generator weight files: the official checkpoints (`rar_{b,l,xl,xxl}.bin`) and the project's
folder format (`model.safetensors` + `config.json`, written by `rar train`).

Official state dicts hold oversized position tables (`pos_embed` and `target_aware_pos_embed`
with T + 1024 rows, `timesteps_embeddings` with T + 100 rows). The model uses rows [0, T+2),
[2, T+2) and [0, T+1) of them respectively, and only those are kept.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..core.files import check_state_dict, dataclass_from_dict, load_strict, read_folder, read_state_dict, save_folder
from ..core.names import resolve
from .config import (ARCHITECTURE_FIELDS, FORMAT_NAME, Preset, RARConfig, Regularization, SamplingDefaults,
                     generator_meta, preset_for, split_flat_config)
from .transformer import PREFIX, RAR

OFFICIAL_POS_EXTRA = 1024  # extra rows of pos_embed / target_aware_pos_embed upstream
OFFICIAL_TIMESTEP_EXTRA = 100  # extra rows of timesteps_embeddings upstream


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
    return sum(math.prod(shape) for shape in official_shapes(cfg).values())


def infer_official_config(sd: dict[str, torch.Tensor]) -> RARConfig:
    """The architecture from tensor shapes (heads from the qk-norm width)."""
    need = ["cls_token", "pos_embed", "embeddings.weight", "lm_head.weight", "blocks.0.mlp.fc1.weight",
            "blocks.0.attn.q_norm.weight"]
    for key in need:
        if key not in sd or not torch.is_tensor(sd[key]):
            raise ValueError(f"state dict has no tensor {key!r}; it is not an official RAR generator checkpoint.")
    d = sd["cls_token"].shape[-1]
    V = sd["lm_head.weight"].shape[0]
    layers = 0
    while f"blocks.{layers}.norm1.weight" in sd:
        layers += 1
    return RARConfig(
        hidden_size=d, num_layers=layers, num_heads=d // sd["blocks.0.attn.q_norm.weight"].shape[0],
        mlp_size=sd["blocks.0.mlp.fc1.weight"].shape[0], codebook_size=V,
        num_tokens=sd["pos_embed"].shape[1] - OFFICIAL_POS_EXTRA,
        num_classes=sd["embeddings.weight"].shape[0] - V - 2,
    )


def check_sizes(config: RARConfig, found: RARConfig, what: str) -> None:
    """An explicit config must agree with the checkpoint on every size."""
    for name in ARCHITECTURE_FIELDS:
        if getattr(config, name) != getattr(found, name):
            raise ValueError(f"{what} does not match the given config: {name} is {getattr(found, name)} "
                             f"in the checkpoint and {getattr(config, name)} in the config.")


def load_official_generator(path_or_state_dict, config: RARConfig | None = None,
                            sampling: SamplingDefaults | None = None) -> RAR:
    """Load an official RAR checkpoint (path or state dict) into `rar.RAR`, strictly. The sampling
    defaults are the preset's with the same architecture unless given."""
    what = "official generator checkpoint"
    sd = read_state_dict(path_or_state_dict, what, hint="; expected an official file such as rar_b.bin "
                         "(HuggingFace hub repo yucornetto/RAR) or a folder written by rar train")
    inferred = infer_official_config(sd)
    if config is not None:
        check_sizes(config, inferred, what)
    config = inferred
    check_state_dict(sd, official_shapes(config), what)
    T = config.num_tokens
    sd["pos_embed"] = sd["pos_embed"][:, :T + PREFIX]
    sd["target_aware_pos_embed"] = sd["target_aware_pos_embed"][:, PREFIX:T + PREFIX]
    sd["timesteps_embeddings"] = sd["timesteps_embeddings"][:, :T + 1]
    with torch.device("meta"):
        model = RAR(config, sampling=sampling)
    load_strict(model, {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, what, assign=True)
    return model.eval()


def save_generator(model: RAR, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Save to a folder: model.safetensors + config.json (architecture, dropouts, sampling defaults,
    and `extra` such as class names), each written to a temporary name and renamed."""
    return save_folder(model, path, generator_meta(model.config, model.regularization, model.sampling, extra))


def _folder_configs(meta: dict, what: str) -> Preset:
    """The three config parts of a saved folder, in the current or the version-1 (flat) layout."""
    try:
        if meta.get("version", 1) == 1:
            config, reg, samp = split_flat_config(meta["config"])
            return Preset(config, samp or SamplingDefaults(), reg or Regularization())
        config = RARConfig.from_dict(meta["config"])
        fallback = preset_for(config) or Preset(config)
        return Preset(config,
                      dataclass_from_dict(SamplingDefaults, meta["sampling"]) if "sampling" in meta else fallback.sampling,
                      dataclass_from_dict(Regularization, meta["regularization"]) if "regularization" in meta
                      else fallback.regularization)
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{what}: config.json is not a generator config ({type(err).__name__}: {err}).") from None


def load_generator(path: str | os.PathLike, config: RARConfig | None = None, map_location="cpu") -> RAR:
    """Load any generator: a folder of the project's format, or an official `.bin`/`.pt` file, or
    a name ("rar_b" ... "rar_xxl", "hf://user/repo") resolved through the Hugging Face cache
    (`rar.core.names`; an existing local path always wins)."""
    path = resolve(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return load_official_generator(path, config)
    if not path.exists():
        raise FileNotFoundError(f"generator {str(path)!r} does not exist; expected an official file such as "
                                "rar_b.bin (HuggingFace hub repo yucornetto/RAR), a folder written by rar train, "
                                "or a name: rar_b, rar_l, rar_xl, rar_xxl.")
    what = f"generator {str(path)!r}"
    meta, sd, _ = read_folder(path, FORMAT_NAME, "generator", map_location)
    saved = _folder_configs(meta, what)
    if config is not None:
        check_sizes(config, saved.config, what)
    with torch.device("meta"):
        model = RAR(saved.config, saved.regularization, saved.sampling)
    load_strict(model, sd, what, assign=True)
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
