"""Small image utilities shared by the project: ADM-style center crop, ten-crop, uint8 conversion,
image grids and PSNR. Only numpy, torch and Pillow are needed (no torchvision)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from ..core.files import require_path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def center_crop_adm(pil_image: Image.Image, size: int) -> Image.Image:
    """ADM / upstream preprocessing: box-halve while the short side is >= 2*size, bicubic-resize
    the short side to `size`, then take the central size x size crop.

    The repeated box filter avoids the aliasing a single big bicubic downscale would cause.
    """
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}.")
    while min(*pil_image.size) >= 2 * size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = size / min(*pil_image.size)
    # Python's round (half to even) as upstream does, so sizes match theirs exactly
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top: top + size, left: left + size])


def image_tensor(pil_image: Image.Image, size: int) -> torch.Tensor:
    """An RGB image as a tokenizer takes it: `center_crop_adm` to size x size, float (3, size, size) in [0, 1]."""
    arr = np.asarray(center_crop_adm(pil_image, size), dtype=np.float32) / 255.0  # (size, size, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def center_crop_mask(mask: Image.Image, size: int) -> Image.Image:
    """The crop `center_crop_adm` takes of an image of this size, for a mask: resized to the same
    final size with nearest-neighbour sampling (no halving blur, so a mask stays binary)."""
    w, h = mask.size
    while min(w, h) >= 2 * size:  # the sizes center_crop_adm's box-halvings go through
        w, h = w // 2, h // 2
    scale = size / min(w, h)
    arr = np.array(mask.resize((round(w * scale), round(h * scale)), resample=Image.NEAREST))
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top: top + size, left: left + size])


def ten_crop(image: np.ndarray, size: int) -> list[np.ndarray]:
    """torchvision-style TenCrop of an (H, W, C) array: the four corners and the center of the
    image, then the same five crops of its horizontal mirror (LlamaGen's augmentation)."""
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError(f"ten_crop needs an image of at least {size}x{size}, got {h}x{w}.")
    ct, cl = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), (ct, cl)]
    crops = []
    for img in (image, image[:, ::-1]):
        crops += [np.ascontiguousarray(img[t: t + size, l: l + size]) for t, l in corners]
    return crops


def to_uint8(images: Union[torch.Tensor, np.ndarray], rounding: bool = False) -> np.ndarray:
    """Float images (B, 3, H, W) in [0, 1] -> uint8 numpy (B, H, W, 3).

    Default: clamp, multiply by 255 and truncate, exactly what upstream RAR's `sample_fn` (and
    ADM's sampler) do before writing PNGs / the FID .npz, so samples are byte-comparable with
    theirs. `rounding=True` rounds to nearest instead (half a level less bias).
    """
    x = torch.as_tensor(images).detach().to("cpu", torch.float32)
    if x.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W) floats in [0, 1], got shape {tuple(x.shape)}.")
    x = x.clamp(0.0, 1.0) * 255.0  # (B, C, H, W)
    if rounding:
        x = x.round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()  # (B, H, W, C)


def _as_uint8_nhwc(images) -> np.ndarray:
    """Accept uint8 (N, H, W[, C]) arrays or float (N, C, H, W) tensors in [0, 1]."""
    if torch.is_tensor(images) or (isinstance(images, np.ndarray) and images.dtype != np.uint8):
        images = to_uint8(images)
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, H, W), (N, H, W, 1) or (N, H, W, 3), got shape {arr.shape}.")
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr


def make_grid(images, nrow: int = 8, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """uint8 images (N, H, W, 3) -> one uint8 (H', W', 3) grid with `nrow` images per row
    (torchvision's layout: `padding` pixels between images and around the border)."""
    arr = _as_uint8_nhwc(images)
    n, h, w, c = arr.shape
    if n == 0:
        raise ValueError("make_grid needs at least one image.")
    ncol = max(1, min(int(nrow), n))
    nrows = (n + ncol - 1) // ncol
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y: y + h, x: x + w] = arr[i]
    return grid


def save_grid(images, path: Union[str, os.PathLike], nrow: int = 8, padding: int = 2) -> Path:
    """Write `make_grid(images, nrow, padding)` as a PNG (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(images, nrow, padding)).save(path)
    return path


def save_images(images, directory: Union[str, os.PathLike], names: Sequence[str]) -> list[Path]:
    """Write each image as `directory/name` (".png" appended when the name has no extension)."""
    arr = _as_uint8_nhwc(images)
    if len(names) != len(arr):
        raise ValueError(f"save_images got {len(arr)} images but {len(names)} names.")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for img, name in zip(arr, names):
        p = out / (name if Path(name).suffix else f"{name}.png")
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def psnr(reference, reconstruction) -> float:
    """Mean over images of 10*log10(1/MSE) for float images in [0, 1] (B, C, H, W).

    Per-image PSNR averaged (not PSNR of the pooled MSE), the usual convention for tokenizers;
    a perfect reconstruction is capped at 100 dB so the mean stays finite.
    """
    a = torch.as_tensor(reference, dtype=torch.float32)
    b = torch.as_tensor(reconstruction, dtype=torch.float32)
    if a.shape != b.shape:
        raise ValueError(f"psnr needs images of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    mse = (a - b).pow(2).flatten(1).mean(1)  # (B,)
    return float((10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp(max=100.0).mean())


def load_rgb(path: Union[str, os.PathLike]) -> Image.Image:
    """Open an image file fully (so a truncated file fails here, not later) as the RGB picture a
    viewer shows: EXIF orientation applied, 16-bit and 32-bit integer grey levels scaled to 8 bits
    (PIL's own conversion clips them, a different picture from the 8-bit twin), float images in
    [0, 1] or [0, 255] alike; palette, alpha, CMYK and the rest through PIL's conversion."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I") or img.mode == "F":
            img = Image.fromarray(_grey_to_8bit(np.asarray(img), img.mode), "L")
        return img.convert("RGB")


def _grey_to_8bit(a: np.ndarray, mode: str) -> np.ndarray:
    """uint8 grey levels of a PIL "I;16*", "I" or "F" image as (H, W) values."""
    a = a.astype(np.float64)
    if mode == "F":
        scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
    else:  # integer modes hold 16-bit data (PNG, TIFF): 65535 is white
        scale = 255.0 / 65535.0
    return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)


def list_image_folder(root: Union[str, os.PathLike]) -> tuple[list[Path], np.ndarray, list[str]]:
    """ImageNet layout: one subfolder per class (class index = position in sorted names);
    image files found recursively, sorted. Returns (paths, labels (N,) int64, class names)."""
    root = require_path(root, "image folder", "folder", "a folder with one subfolder of images per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"image folder {str(root)!r} has no class subfolders: expected root/CLASS/IMAGE files.")
    paths, labels = [], []
    for idx, name in enumerate(classes):
        found = _class_images(root / name)
        paths += found
        labels += [idx] * len(found)
    if not paths:
        raise ValueError(f"image folder {str(root)!r} has class folders but no image files ({', '.join(IMAGE_EXTENSIONS)}).")
    return paths, np.asarray(labels, np.int64), classes


def _class_images(folder: Path) -> list[Path]:
    """Image files under `folder`, sorted, following symlinked folders (datasets are often linked
    together) but never into a folder already walked (a link loop, or two links to one folder) and
    never listing one file twice (two links to it)."""
    seen_dirs, seen_files, out = set(), set(), []
    for dirpath, dirnames, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []  # walked already: its subfolders too
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) not in seen_dirs)
        for f in sorted(files):
            key = os.path.realpath(os.path.join(dirpath, f))
            if f.lower().endswith(IMAGE_EXTENSIONS) and key not in seen_files:
                seen_files.add(key)
                out.append(Path(dirpath) / f)
    return out


def load_folder_images(root, resolution: int, limit: Optional[int] = None,
                       spread: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Up to `limit` images of a class folder, ADM-center-cropped: uint8 (N, R, R, 3), labels, class
    names. `spread` picks them evenly over the sorted list (so every class shows) instead of the
    first ones. Unreadable files are skipped (for small datasets and reconstruction checks)."""
    paths, labels, classes = list_image_folder(root)
    order = np.arange(len(paths))
    if spread and limit is not None and limit < len(paths):
        order = np.unique(np.linspace(0, len(paths) - 1, num=limit).round().astype(np.int64))
    images, kept = [], []
    for i in order:
        if limit is not None and len(images) >= limit:
            break
        try:
            images.append(np.asarray(center_crop_adm(load_rgb(paths[i]), resolution)))
            kept.append(i)
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    if not images:
        raise ValueError(f"no readable images in {str(root)!r}.")
    return np.stack(images), labels[kept], classes
