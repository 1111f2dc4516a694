"""MaskGIT-VQGAN image tokenizer, numerically identical to the official one used by RAR.

The official tokenizer (`maskgit-vqgan-imagenet-f16-256.bin`) maps a 256x256 image in [0, 1]
to a 16x16 grid of codes from a 1024-entry codebook. Module and parameter names here follow
the official state dict, so its keys load unchanged. Quirks reproduced on purpose:

* input and output are in [0, 1] (not [-1, 1]); `decode` clamps to [0, 1];
* a ResnetBlock that changes its channel count adds `nin_shortcut(h)` of its *own output* h
  (an out->out 1x1 conv) instead of projecting its input, and drops the input;
* only the encoder's 1x1 `conv_out`, the decoder's `conv_in`, `upsample_conv` and `conv_out`
  carry biases;
* GroupNorm(32, eps=1e-6), SiLU, no attention; 2x2 average-pool down, nearest x2 + 3x3 conv up;
* every conv has stride 1, so TF "same" padding equals symmetric padding k // 2;
* the quantizer has no pre/post conv and no l2 normalisation.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..core.files import dataclass_from_dict, load_strict, read_folder, read_state_dict, save_folder, shape_of
from ..core.names import resolve, upload_folder

OFFICIAL_FILENAME = "maskgit-vqgan-imagenet-f16-256.bin"
OFFICIAL_HUB_REPO = "fun-research/TiTok"
_ARCH_FIELDS = ("hidden_channels", "channel_mult", "num_res_blocks", "z_channels", "codebook_size", "num_channels")


@dataclass(frozen=True)
class VQGANConfig:
    hidden_channels: int = 128
    channel_mult: tuple = (1, 1, 2, 2, 4)  # one entry per resolution level
    num_res_blocks: int = 2
    z_channels: int = 256  # latent width == codebook vector width (no pre-quant conv)
    resolution: int = 256  # nominal image side; not stored in the weights
    codebook_size: int = 1024
    num_channels: int = 3
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        for name in ("hidden_channels", "num_res_blocks", "z_channels", "resolution", "codebook_size", "num_channels"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"VQGANConfig.{name} must be positive, got {getattr(self, name)}.")
        if not (0 <= float(self.dropout) < 1):
            raise ValueError(f"VQGANConfig.dropout (model.dropout) must be in [0, 1), got {self.dropout}.")
        if not self.channel_mult or min(self.channel_mult) <= 0:
            raise ValueError(f"VQGANConfig.channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}.")
        for m in self.channel_mult:
            if (self.hidden_channels * m) % 32:
                raise ValueError(f"VQGANConfig: hidden_channels*channel_mult = {self.hidden_channels * m} is not a "
                                 "multiple of 32, which GroupNorm(32 groups) needs.")
        if self.resolution % self.downsample_factor:
            raise ValueError(f"VQGANConfig.resolution {self.resolution} is not divisible by the downsampling "
                             f"factor {self.downsample_factor}.")

    @property
    def num_resolutions(self) -> int:
        return len(self.channel_mult)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.resolution // self.downsample_factor

    @property
    def num_tokens(self) -> int:
        return self.grid_size ** 2

    @classmethod
    def preset(cls, name: str, **overrides) -> "VQGANConfig":
        if name not in VQGAN_PRESETS:
            raise ValueError(f"unknown VQGAN preset {name!r}; expected one of {', '.join(VQGAN_PRESETS)}.")
        return dataclasses.replace(VQGAN_PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "VQGANConfig":
        return dataclass_from_dict(cls, dict(d))

    def describe(self) -> str:
        return (f"MaskGIT-VQGAN f{self.downsample_factor} {self.resolution}px -> {self.grid_size}x{self.grid_size} "
                f"tokens, codebook {self.codebook_size}x{self.z_channels}, hidden {self.hidden_channels}, "
                f"mult {list(self.channel_mult)}, {self.num_res_blocks} res blocks")


VQGAN_PRESETS: dict[str, VQGANConfig] = {
    # The official ImageNet tokenizer used by RAR (54.5M parameters).
    "maskgit_f16_256": VQGANConfig(),
    # 32x32 digits -> 8x8 tokens; small enough to train in a few CPU minutes (the test fixture's shape too).
    "digits_f4_32": VQGANConfig(32, (1, 1, 2), 1, 16, 32, 64),
    # 64x64 images (e.g. downsampled ImageNet / CIFAR-like data) -> 8x8 tokens.
    "small_f8_64": VQGANConfig(64, (1, 1, 2, 2), 1, 64, 64, 512),
}


def _conv(cin: int, cout: int, k: int, bias: bool) -> nn.Conv2d:
    # stride-1 TF "same" padding is symmetric k // 2 for odd k
    return nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), _conv(cin, cout, 3, bias=False)
        self.norm2, self.conv2 = _norm(cout), _conv(cout, cout, 3, bias=False)
        self.dropout = nn.Dropout(dropout)
        # Official quirk: the shortcut maps out->out and is applied to the block output.
        self.nin_shortcut = _conv(cout, cout, 1, bias=False) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, cout, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, cout, H, W)
        if self.nin_shortcut is not None:
            return h + self.nin_shortcut(h)  # the input x is discarded (official behaviour)
        return h + x


def _blocks(cin: int, cout: int, n: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, dropout) for i in range(n)])


class _Level(nn.Module):
    """One resolution level: `block` res blocks, then an optional resampling step."""

    def __init__(self, cin: int, cout: int, n: int, dropout: float, up: bool):
        super().__init__()
        self.block = _blocks(cin, cout, n, dropout)
        self.upsample_conv = _conv(cout, cout, 3, bias=True) if up else None


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        hid, mult = cfg.hidden_channels, cfg.channel_mult
        self.conv_in = _conv(cfg.num_channels, hid, 3, bias=False)
        ins = (1,) + mult[:-1]
        self.down = nn.ModuleList(
            [_Level(hid * ins[i], hid * mult[i], cfg.num_res_blocks, cfg.dropout, up=False) for i in range(len(mult))])
        top = hid * mult[-1]
        self.mid = _blocks(top, top, cfg.num_res_blocks, cfg.dropout)
        self.norm_out = _norm(top)
        self.conv_out = _conv(top, cfg.z_channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, hid, H, W)
        for i, level in enumerate(self.down):
            for blk in level.block:
                h = blk(h)
            if i < len(self.down) - 1:
                h = F.avg_pool2d(h, kernel_size=2, stride=2)  # (B, C, H/2, W/2)
        for blk in self.mid:
            h = blk(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, z, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        hid, mult, n = cfg.hidden_channels, cfg.channel_mult, len(cfg.channel_mult)
        top = hid * mult[-1]
        self.conv_in = _conv(cfg.z_channels, top, 3, bias=True)
        self.mid = _blocks(top, top, cfg.num_res_blocks, cfg.dropout)
        # `up[i]` is level i (up.0 = full resolution); the forward pass runs from the top level down.
        self.up = nn.ModuleList([
            _Level(hid * (mult[i + 1] if i < n - 1 else mult[-1]), hid * mult[i], cfg.num_res_blocks, cfg.dropout,
                   up=i != 0)
            for i in range(n)])
        self.norm_out = _norm(hid * mult[0])
        self.conv_out = _conv(hid * mult[0], cfg.num_channels, 3, bias=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # (B, top, h, w)
        for blk in self.mid:
            h = blk(h)
        for level in reversed(self.up):
            for blk in level.block:
                h = blk(h)
            if level.upsample_conv is not None:
                h = level.upsample_conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # (B, C, 2h, 2w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W), not clamped


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)
        # same init range as the official quantizer, so freshly built models behave alike
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def distances(self, flat: torch.Tensor) -> torch.Tensor:
        """Squared distances (N, K) as |z|^2 + |e|^2 - 2 z.e, the official formula and op order."""
        emb_t = self.embedding.weight.t()  # (D, K)
        base = flat.pow(2.0).sum(1, keepdim=True) + emb_t.pow(2.0).sum(0, keepdim=True)  # (N, K)
        return torch.addmm(base, flat, emb_t, alpha=-2.0)  # (N, K)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, D, h, w) -> codes (B, h*w) int64 row-major, quantized (B, D, h, w)."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
        codes = self.distances(flat).argmin(dim=1)  # (B*h*w,), ties -> first index
        quantized = self.embedding(codes).view(b, h, w, d).permute(0, 3, 1, 2)  # (B, D, h, w)
        return codes.view(b, h * w), quantized


class VQGAN(nn.Module):
    def __init__(self, config: Optional[VQGANConfig] = None):
        super().__init__()
        self.config = config or VQGANConfig()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quantize = VectorQuantizer(self.config.codebook_size, self.config.z_channels)

    def _check_images(self, images: torch.Tensor) -> None:
        c, f = self.config.num_channels, self.config.downsample_factor
        if images.dim() != 4 or images.shape[1] != c or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"images must be a (B, {c}, H, W) float tensor in [0, 1] with H and W divisible by "
                             f"{f}, got shape {tuple(images.shape)}.")

    def encode_continuous(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> encoder output (B, z, H/f, W/f) before quantization."""
        self._check_images(images)
        return self.encoder(images)

    def save_pretrained(self, directory) -> Path:
        """config.json + model.safetensors in `directory` (`rar.from_pretrained` loads it)."""
        return save_tokenizer(self, directory)

    def push_to_hub(self, repo_id: str, *, private: bool = False, token=None) -> str:
        """Upload as config.json + model.safetensors; `rar.from_pretrained("hf://" + repo_id)` loads it."""
        return upload_folder(self.save_pretrained, repo_id, private=private, token=token)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> codes (B, h*w) int64, row-major over the latent grid."""
        return self.quantize(self.encode_continuous(images))[0]

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, T) with T a square, or (B, h, w) -> codebook vectors (B, z, h, w)."""
        if codes.dim() == 2:
            side = math.isqrt(codes.shape[1])
            if side * side != codes.shape[1]:
                raise ValueError(f"codes of shape {tuple(codes.shape)} do not form a square grid; pass (B, h, w).")
            codes = codes.view(codes.shape[0], side, side)
        if codes.dim() != 3:
            raise ValueError(f"codes must be (B, T) or (B, h, w) integers, got shape {tuple(codes.shape)}.")
        k = self.config.codebook_size
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
            raise ValueError(f"codes must lie in [0, {k}), got values in [{int(codes.min())}, {int(codes.max())}].")
        return self.quantize.embedding(codes.long()).permute(0, 3, 1, 2)  # (B, z, h, w)

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """latent (B, z, h, w) -> unclamped images (B, 3, h*f, w*f)."""
        return self.decoder(z)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes -> images (B, 3, H, W) clamped to [0, 1], as the official `decode_tokens`."""
        return self.decode_latent(self.lookup(codes)).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- loading / saving


def infer_config(state: Mapping[str, torch.Tensor], resolution: int = 256) -> VQGANConfig:
    """Read the architecture off the tensor shapes of an official-layout state dict."""
    def shape(key: str) -> tuple:
        if key not in state:
            raise ValueError(f"cannot infer the tokenizer configuration: key {key!r} is missing from the checkpoint.")
        if not torch.is_tensor(state[key]):
            raise ValueError(f"checkpoint key {key!r} is {shape_of(state[key])}.")
        return tuple(state[key].shape)

    hidden, channels = shape("encoder.conv_in.weight")[:2]
    levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down.")})
    if levels != list(range(len(levels))) or not levels:
        raise ValueError(f"cannot infer the tokenizer configuration: encoder.down levels {levels} are not 0..n-1.")
    blocks = {int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block.")}
    mult = []
    for i in levels:
        out = shape(f"encoder.down.{i}.block.0.conv1.weight")[0]
        if out % hidden:
            raise ValueError(f"encoder.down.{i}.block.0.conv1.weight has {out} output channels, not a multiple of "
                             f"hidden {hidden}.")
        mult.append(out // hidden)
    z = shape("encoder.conv_out.weight")[0]
    k, dim = shape("quantize.embedding.weight")
    if dim != z:
        raise ValueError(f"quantize.embedding.weight has width {dim} but encoder.conv_out.weight gives z={z}.")
    return VQGANConfig(int(hidden), tuple(mult), len(blocks), int(z), resolution, int(k), int(channels))


FORMAT_NAME = "rar-vqgan"


def load_official_tokenizer(path_or_state_dict, config: Optional[VQGANConfig] = None) -> VQGAN:
    """Load official MaskGIT-VQGAN weights (a path or a state dict) into an eval-mode, frozen VQGAN.

    Without `config` the architecture is inferred from the tensor shapes; the resolution is not
    stored in the weights and defaults to 256. With `config`, every key is checked against it.
    """
    what = "tokenizer checkpoint" if isinstance(path_or_state_dict, Mapping) else \
        f"tokenizer checkpoint {str(path_or_state_dict)!r}"
    hint = (f": expected the official MaskGIT-VQGAN weights file {OFFICIAL_FILENAME}, which can be downloaded "
            f"when online from the Hugging Face Hub repo {OFFICIAL_HUB_REPO} "
            f"(https://huggingface.co/{OFFICIAL_HUB_REPO}); it is never downloaded automatically")
    state = read_state_dict(path_or_state_dict, "tokenizer checkpoint", hint)
    model = VQGAN(config or infer_config(state))
    load_strict(model, state, what)
    model.eval().requires_grad_(False)  # frozen like the official wrapper
    return model


def save_tokenizer(model: VQGAN, directory: Union[str, os.PathLike]) -> Path:
    """Write `model.safetensors` + `config.json` (the project format) atomically into `directory`."""
    return save_folder(model, directory, {"format": FORMAT_NAME, "version": 1, "config": model.config.to_dict()})


def load_tokenizer(path: Union[str, os.PathLike]) -> VQGAN:
    """Load a tokenizer saved by `save_tokenizer`: its directory, the .safetensors inside it, or
    the out_dir of a `train_tokenizer` run (which holds it under `tokenizer/`)."""
    p = Path(path)
    if p.is_dir() and not (p / "model.safetensors").exists() and (p / "tokenizer" / "model.safetensors").exists():
        p = p / "tokenizer"  # the out_dir of a train_tokenizer run
    meta, state, folder = read_folder(p, FORMAT_NAME, "tokenizer")
    model = VQGAN(VQGANConfig.from_dict(meta["config"]))
    load_strict(model, state, f"checkpoint {str(folder / 'model.safetensors')!r}")
    return model.eval()


def load_any_tokenizer(path: Union[str, os.PathLike]) -> VQGAN:
    """A directory or .safetensors file -> project format; .bin / .pt / .pth -> official weights; the
    name "maskgit-vqgan" (or "hf://user/repo") -> resolved through the Hugging Face cache (`rar.core.names`)."""
    p = resolve(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer {str(p)!r} does not exist; expected the official {OFFICIAL_FILENAME}, "
                                "a folder written by rar train-tokenizer, or the name maskgit-vqgan.")
    if p.is_dir() or p.suffix == ".safetensors":
        return load_tokenizer(p)
    if p.suffix in (".bin", ".pt", ".pth"):
        return load_official_tokenizer(p)
    raise ValueError(f"tokenizer path {str(p)!r} is neither a directory, a .safetensors file, nor an official "
                     ".bin/.pt checkpoint.")


def state_dict_sha256(model: nn.Module) -> str:
    """Fingerprint of the weights, so token shards can record exactly which tokenizer made them."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
