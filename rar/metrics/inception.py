"""The FID network: TensorFlow's InceptionV3 graph of 2015-12-05, re-expressed in plain PyTorch.

This is the network behind FID, IS, sFID and precision/recall in the ADM evaluator
(guided-diffusion `evaluations/evaluator.py`) and in torch-fidelity. It is *not* torchvision's
InceptionV3: the weights differ, three pooling branches differ (TF averages without the zero
padding, and the last block max-pools), and the input is resized with TF1's bilinear kernel.

Module and parameter names follow torch-fidelity's `FeatureExtractorInceptionV3`, so its released
weight file (converted from the TF graph) loads with strict key checking. Outputs, per image:

- `pool`: the 2048-d `pool_3` features (FID, precision/recall);
- `logits_unbiased`: `pool @ W.T` without the bias, 1008 classes: the softmax of these is what both
  ADM and torch-fidelity feed to the Inception Score;
- `spatial`: ADM's sFID features, the tensor `mixed_6/conv:0` (the ReLU output of the 1x1 branch of
  the 7th mixed block, torch-fidelity's `Mixed_6d.branch1x1`), first 7 channels, 17x17, flattened
  in TF's NHWC order: 17 * 17 * 7 = 2023 values.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.files import read_state_dict

WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + WEIGHTS_FILENAME
WEIGHTS_SHA256_PREFIX = "6726825d"
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7


def _tf1_taps(n_in: int, n_out: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source rows (low, high) and blend weights of TF1 ResizeBilinear (no align_corners, no half-pixel)."""
    scale = torch.tensor(float(n_in), dtype=torch.float32) / torch.tensor(float(n_out), dtype=torch.float32)
    pos = torch.arange(n_out, dtype=torch.float32) * scale  # (n_out,) float32, as TF computes it
    low = pos.floor().long()  # (n_out,)
    high = (low + 1).clamp(max=n_in - 1)  # (n_out,)
    frac = pos - low.to(torch.float32)  # (n_out,)
    return low.to(device), high.to(device), frac.to(device)


def resize_bilinear_tf1(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Bilinear resize of float (B, C, H, W) to (B, C, size, size) exactly as TF 1.x does it.

    TF1 samples output pixel i at source coordinate i * (in / out) (no half-pixel offset), so a
    downscale picks source pixels instead of averaging them; PyTorch's `interpolate` differs.
    The blend order (top row, bottom row, then vertical) is TF's, for float32-identical results.
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"resize_bilinear_tf1 expects a float (B, C, H, W) tensor, "
                         f"got {tuple(images.shape)} {images.dtype}.")
    y0, y1, ty = _tf1_taps(images.shape[2], size, images.device)
    x0, x1, tx = _tf1_taps(images.shape[3], size, images.device)
    top = images.index_select(2, y0)  # (B, C, size, W)
    bottom = images.index_select(2, y1)  # (B, C, size, W)
    top_left, top_right = top.index_select(3, x0), top.index_select(3, x1)  # (B, C, size, size) each
    bottom_left, bottom_right = bottom.index_select(3, x0), bottom.index_select(3, x1)
    tx = tx.to(images.dtype).view(1, 1, 1, size)
    ty = ty.to(images.dtype).view(1, 1, size, 1)
    upper = top_left + (top_right - top_left) * tx  # (B, C, size, size)
    lower = bottom_left + (bottom_right - bottom_left) * tx  # (B, C, size, size)
    return upper + (lower - upper) * ty


class ConvBN(nn.Module):
    """Convolution without bias, batch norm (TF's epsilon 1e-3), ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 SAME average pool that, like TF, averages only the pixels inside the image."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, c_in: int, pool_channels: int):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1 = ConvBN(c_in, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c_in, pool_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_tf(x))], 1)


class ReduceB(nn.Module):
    """35x35 -> 17x17 reduction."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class MixedC(nn.Module):
    """17x17 block with factorised 7x7 convolutions."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1 = ConvBN(c_in, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block output (B, 768, 17, 17) and its 1x1 branch (B, 192, 17, 17)."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_2(self.branch7x7dbl_1(x))
        d = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(d)))
        return torch.cat([b1, b7, d, self.branch_pool(_avg_pool_tf(x))], 1), b1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_parts(x)[0]


class ReduceD(nn.Module):
    """17x17 -> 8x8 reduction."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(c_in, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class MixedE(nn.Module):
    """8x8 block with split 1x3 / 3x1 branches; the TF graph max-pools in its last instance."""

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_tf(x)
        parts = [self.branch1x1(x), self.branch3x3_2a(s), self.branch3x3_2b(s),
                 self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)]
        return torch.cat(parts, 1)


class InceptionV3Features(nn.Module):
    """TF-faithful InceptionV3 feature extractor; input uint8 (B, 3, H, W) in 0..255, any H, W.

    Satisfies the extractor protocol of `rar.metrics`: returns a dict of float32 tensors
    `pool` (B, 2048), `logits_unbiased` (B, 1008) and `spatial` (B, 2023).
    `matches_adm_statistics` says that the `mu`/`sigma`/`mu_s`/`sigma_s` stored in ADM reference
    batches were computed with this network, so `rar.metrics` may use them.
    """
    matches_adm_statistics = True

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = MixedA(192, 32)
        self.Mixed_5c = MixedA(256, 64)
        self.Mixed_5d = MixedA(288, 64)
        self.Mixed_6a = ReduceB(288)
        self.Mixed_6b = MixedC(768, 128)
        self.Mixed_6c = MixedC(768, 160)
        self.Mixed_6d = MixedC(768, 160)
        self.Mixed_6e = MixedC(768, 192)
        self.Mixed_7a = ReduceD(768)
        self.Mixed_7b = MixedE(1280, max_pool=False)
        self.Mixed_7c = MixedE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self.requires_grad_(False)
        self.eval()

    @property
    def cache_key(self) -> str:
        """Identifies the weights, so cached reference features are reused only with the same network."""
        digest = hashlib.sha256()
        for tensor in (self.Conv2d_1a_3x3.conv.weight, self.fc.weight, self.fc.bias):
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return "tf-inception-2015-12-05:" + digest.hexdigest()[:16]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"InceptionV3Features expects uint8 images of shape (B, 3, H, W), "
                             f"got {images.dtype} {tuple(images.shape)}.")
        x = resize_bilinear_tf1(images.to(self.fc.weight.dtype), INPUT_SIZE)  # (B, 3, 299, 299)
        x = (x - 128) / 128  # the graph's (x - 128) * 0.0078125, bit for bit
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (B, 768, 17, 17)
        x, branch = self.Mixed_6d.forward_parts(x)  # (B, 768, 17, 17), (B, 192, 17, 17)
        spatial = branch[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # (B, 17 * 17 * 7) NHWC order
        x = self.Mixed_7a(self.Mixed_6e(x))  # (B, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (B, 2048, 8, 8)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 2048)
        logits = pool @ self.fc.weight.T  # (B, 1008), no bias: what the Inception Score uses
        return {"pool": pool.float(), "logits_unbiased": logits.float(), "spatial": spatial.float()}


def _weights_file(weights_path, hub_dir, download: bool) -> Path:
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights file {path} does not exist; pass the path of "
                                    f"{WEIGHTS_FILENAME} (from {WEIGHTS_URL}).")
        return path
    folder = Path(hub_dir if hub_dir is not None else torch.hub.get_dir()) / "checkpoints"
    path = folder / WEIGHTS_FILENAME
    if path.is_file():
        return path
    missing = (f"The Inception weights {WEIGHTS_FILENAME} are not in {folder}: download them from "
               f"{WEIGHTS_URL} into that folder, pass their path, or allow the download.")
    if not download:
        raise FileNotFoundError(missing)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(WEIGHTS_URL, str(path), hash_prefix=WEIGHTS_SHA256_PREFIX, progress=True)
    except OSError as err:  # offline, DNS, HTTP errors (urllib's URLError is an OSError)
        raise FileNotFoundError(missing + f" (the download failed: {err})") from err
    return path


def load_weights(model: nn.Module, state: dict, source) -> None:
    """Strict load that names the offending key; BatchNorm's `num_batches_tracked` may be absent."""
    if not isinstance(state, dict):
        raise ValueError(f"{source} holds a {type(state).__name__}, expected a state dict of tensors.")
    expected = model.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} does not fit InceptionV3Features: missing keys {missing[:5]}, "
                         f"unexpected keys {unexpected[:5]} (first five of each shown).")
    for key, value in state.items():
        if not torch.is_tensor(value):
            raise ValueError(f"{source}: key {key} holds a {type(value).__name__}, expected a tensor.")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{source}: key {key} has shape {tuple(value.shape)}, "
                             f"expected {tuple(expected[key].shape)}.")
    full = {k: state.get(k, expected[k]) for k in expected}  # counters default to the model's own
    model.load_state_dict(full, strict=True)


def load_inception(weights_path=None, hub_dir=None, download: bool = False) -> InceptionV3Features:
    """The TF-faithful InceptionV3 with torch-fidelity's converted weights, in eval mode on the CPU.

    Looks for the weights at `weights_path`, else in `<hub_dir or torch.hub.get_dir()>/checkpoints/`
    under their released file name; downloads them there (SHA-256 prefix checked) only when
    `download` is true. Raises FileNotFoundError naming the file, its URL and the folder when absent.
    """
    path = _weights_file(weights_path, hub_dir, download)
    state = read_state_dict(path, "Inception weights")  # one sentence for an empty, truncated or pickled file
    model = InceptionV3Features()
    load_weights(model, state, f"Inception weights {str(path)!r}")
    return model.eval()
