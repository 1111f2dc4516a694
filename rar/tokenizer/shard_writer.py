"""Pretokenization: images -> memory-mappable token shards (layout in `rar.data.shards`) that
training reads without parsing.

Global shard s covers source images [s*shard_size, (s+1)*shard_size); rank r of W does the shards
with s % W == r, batching restarts at every shard, so a shard's bytes do not depend on how many
ranks made it. Every file is written to a temporary name and `os.replace`d, so a killed run never
leaves a half-written shard that a re-run would take as finished.

Views: view 0 is the center crop; with `flip` view 1 is its horizontal mirror (upstream RAR stores
both and training picks one at random). With `ten_crop` (LlamaGen's augmentation, upstream's
`--ten_crop`) the image is center-cropped to int(1.1 * resolution) and the 10 views are the four
corner crops and the center crop, then the same five crops of the mirrored image; `flip` is then
implied.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..core.devices import check_memory
from ..core.files import check_not_inside_inputs, ensure_writable_dir
from ..data.images import center_crop_adm, list_image_folder, load_rgb, ten_crop
from ..data.mnist import load_mnist_digits
from ..data.shards import FORMAT, TEN_CROP_VIEWS
from .vqgan import VQGAN, load_any_tokenizer, state_dict_sha256


class _Source:
    """Random access to the images of a dataset: folder files or an in-memory uint8 array."""

    def __init__(self, n: int, labels: np.ndarray, class_names: list[str], describe: dict,
                 load: Callable[[int], Image.Image], name: Callable[[int], str]):
        self.n, self.labels, self.class_names, self.describe = n, labels, class_names, describe
        self.load, self.name = load, name


def _folder_source(root) -> _Source:
    paths, labels, classes = list_image_folder(root)
    return _Source(len(paths), labels, classes, {"kind": "folder", "root": str(root), "images": len(paths)},
                   lambda i: load_rgb(paths[i]), lambda i: str(paths[i]))


def _array_source(images: np.ndarray, labels, class_names: Optional[Sequence[str]], name: str) -> _Source:
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[-1] not in (1, 3)):
        raise ValueError(f"images must be a uint8 array (N, H, W) or (N, H, W, 3), got {arr.dtype} {arr.shape}.")
    labels = np.asarray(labels, np.int64)
    if labels.shape != (len(arr),):
        raise ValueError(f"labels must have shape ({len(arr)},) to match the images, got {labels.shape}.")
    if class_names is None:
        class_names = [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]

    def load(i: int) -> Image.Image:
        img = arr[i] if arr.ndim == 3 or arr.shape[-1] == 3 else arr[i, ..., 0]
        return Image.fromarray(img).convert("RGB")

    return _Source(len(arr), labels, list(class_names), {"kind": "array", "name": name, "images": len(arr)},
                   load, lambda i: f"{name}[{i}]")


@dataclass
class TokenizeReport:
    out_dir: str
    rank: int
    world_size: int
    shards_written: list[int] = field(default_factory=list)
    shards_skipped: list[int] = field(default_factory=list)
    images: int = 0  # images tokenized by this call
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of unreadable images
    seconds: float = 0.0
    manifest: str = "waiting"  # "written", "unchanged" (already up to date) or "waiting" (other ranks)

    @property
    def did_work(self) -> bool:
        return bool(self.shards_written)

    def summary(self) -> str:
        if not self.did_work:
            head = (f"rank {self.rank}/{self.world_size}: nothing to do, all {len(self.shards_skipped)} shard(s) "
                    f"of this rank in {self.out_dir} were already finished")
        else:
            rate = self.images / max(self.seconds, 1e-9)
            head = (f"rank {self.rank}/{self.world_size}: wrote {len(self.shards_written)} shard(s), "
                    f"{self.images} images in {self.seconds:.1f} s ({rate:.1f} images/s), skipped "
                    f"{len(self.shards_skipped)} finished shard(s), {len(self.failed)} unreadable image(s)")
        tail = {"written": "; manifest.json written", "unchanged": "; manifest.json already up to date",
                "waiting": "; manifest.json waits for the other ranks' shards"}[self.manifest]
        failed = "".join(f"\n  skipped unreadable image {p}: {why}" for p, why in self.failed)
        return head + tail + failed


def _shard_name(kind: str, s: int, total: int, ext: str) -> str:
    return f"{kind}-{s:05d}-of-{total:05d}.{ext}"


def _save_atomic(path: Path, write: Callable) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _views(img: Image.Image, resolution: int, flip: bool, use_ten_crop: bool) -> np.ndarray:
    """One PIL image -> uint8 (V, R, R, 3) views, preprocessed as upstream."""
    if use_ten_crop:
        big = np.asarray(center_crop_adm(img, int(resolution * 1.1)))  # LlamaGen: crop 1.1x, then ten-crop
        return np.stack(ten_crop(big, resolution))
    arr = np.asarray(center_crop_adm(img, resolution))  # (R, R, 3)
    return np.stack([arr, arr[:, ::-1]]) if flip else arr[None]


def _settings(model: VQGAN, source: _Source, resolution: int, flip: bool, use_ten_crop: bool,
              shard_size: int) -> dict:
    """Everything that determines the shard bytes; a re-run must match it to reuse shards."""
    f = model.config.downsample_factor
    if resolution % f:
        raise ValueError(f"resolution {resolution} is not divisible by the tokenizer's downsampling factor {f}.")
    views = TEN_CROP_VIEWS if use_ten_crop else (["center", "flip"] if flip else ["center"])
    k = model.config.codebook_size
    return {
        "format": FORMAT, "version": 1,
        "tokenizer": {"description": model.config.describe(), "config": model.config.to_dict(),
                      "sha256": state_dict_sha256(model)},
        "codebook_size": k, "dtype": "uint16" if k <= 65536 else "uint32",
        "resolution": resolution, "grid": [resolution // f, resolution // f],
        "tokens_per_image": (resolution // f) ** 2, "views_per_image": len(views), "view_names": views,
        "preprocessing": ("center_crop_adm to int(1.1*resolution), then ten-crop" if use_ten_crop
                          else "center_crop_adm" + (" + horizontal flip view" if flip else "")),
        "shard_size": shard_size, "num_shards": max(1, -(-source.n // shard_size)),
        "source_images": source.n, "class_names": source.class_names, "num_classes": len(source.class_names),
    }


def _fingerprint(settings: dict) -> str:

    return hashlib.sha256(_json_bytes(settings)).hexdigest()


def _shard_done(out: Path, s: int, total: int, fp: str) -> bool:
    meta_file = out / _shard_name("shard", s, total, "json")
    if not meta_file.is_file():
        return False
    meta = json.loads(meta_file.read_text())
    if meta.get("settings_sha256") != fp:
        raise ValueError(f"{str(meta_file)!r} was made with different settings (tokenizer, resolution, views or "
                         "dataset); tokenize into a new output folder or delete this one.")
    return all((out / meta[k]).is_file() for k in ("tokens", "labels"))


_WRITER_FILE = re.compile(r"(tokens|labels|shard)-\d{5}-of-\d{5}\.(npy|json)(\.tmp)?|manifest\.json(\.tmp)?"
                          r"|\.rar-write-test-\d+")  # (the writability probe of a run killed at that instant)


def _check_shard_folder(out: Path, source: _Source) -> None:
    """The output folder is new, empty, or token shards this writer started (its shard records
    decide what is reused): never a folder of other files or of shards from elsewhere (a manifest
    without the writer's records), nor a folder inside the images."""
    if "root" in source.describe:
        check_not_inside_inputs(out, [source.describe["root"]])
    if not out.is_dir():
        return
    names = [p.name for p in out.iterdir()]
    other = [n for n in names if not _WRITER_FILE.fullmatch(n)]
    if other or ("manifest.json" in names and not any(n.startswith("shard-") for n in names)):
        raise ValueError(f"--out {str(out)!r} already holds {'files such as ' + repr(sorted(other)[0]) if other else 'token shards'} "
                         "that this tokenization did not start; expected a new or empty folder.")


def _encode_shard(model, source: _Source, s: int, opts: dict, pool, bar) -> tuple[np.ndarray, np.ndarray, list]:
    start, stop = s * opts["shard_size"], min((s + 1) * opts["shard_size"], source.n)
    tokens, labels, failed = [], [], []

    def prepare(i: int):
        try:
            return _views(source.load(i), opts["resolution"], opts["flip"], opts["ten_crop"]), None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            return None, f"{type(err).__name__}: {err}"

    batches = [list(range(b0, min(b0 + opts["batch_size"], stop))) for b0 in range(start, stop, opts["batch_size"])]
    submit = (lambda idx: [pool.submit(prepare, i) for i in idx]) if pool is not None else None
    pending = submit(batches[0]) if submit and batches else None
    for k, idx in enumerate(batches):
        # decode the next batch in the worker threads while this one is encoded
        results = [f.result() for f in pending] if submit else [prepare(i) for i in idx]
        if submit and k + 1 < len(batches):
            pending = submit(batches[k + 1])
        ok = [i for i, (v, _) in zip(idx, results) if v is not None]
        failed += [(source.name(i), why) for i, (v, why) in zip(idx, results) if v is None]
        if ok:
            views = np.stack([v for v, _ in results if v is not None])  # (b, V, R, R, 3) uint8
            x = torch.from_numpy(views).to(opts["device"]).flatten(0, 1).permute(0, 3, 1, 2).float() / 255.0
            codes = model.encode(x).view(len(ok), views.shape[1], -1)  # (b, V, T)
            tokens.append(codes.cpu().numpy().astype(opts["dtype"]))
            labels.append(source.labels[ok])
        bar.update(len(idx))
    t = np.concatenate(tokens) if tokens else np.zeros((0, opts["views"], opts["tokens_per_image"]), opts["dtype"])
    return t, (np.concatenate(labels) if labels else np.zeros(0, np.int64)).astype(np.int64), failed


def _write_shard(out: Path, s: int, total: int, fp: str, tokens, labels, failed) -> None:
    names = {k: _shard_name(k, s, total, "npy") for k in ("tokens", "labels")}
    _save_atomic(out / names["tokens"], lambda f: np.save(f, tokens))
    _save_atomic(out / names["labels"], lambda f: np.save(f, labels))
    meta = {"settings_sha256": fp, "shard": s, "count": int(len(tokens)), "failed": [list(x) for x in failed], **names}
    _save_atomic(out / _shard_name("shard", s, total, "json"), lambda f: f.write(_json_bytes(meta)))


def _try_write_manifest(out: Path, settings: dict, fp: str, info: dict) -> str:
    """Write manifest.json when all shards are done; any rank may do it (same bytes, atomic)."""
    total, metas = settings["num_shards"], []
    for s in range(total):
        f = out / _shard_name("shard", s, total, "json")
        if not f.is_file():
            return "waiting"
        metas.append(json.loads(f.read_text()))
    if any(m.get("settings_sha256") != fp for m in metas):
        return "waiting"
    failed = [x for m in metas for x in m["failed"]]
    manifest = {**settings, **info, "settings_sha256": fp, "num_images": sum(m["count"] for m in metas),
                "num_failed": len(failed), "failed": failed,
                "shards": [{"tokens": m["tokens"], "labels": m["labels"], "count": m["count"]} for m in metas]}
    data = _json_bytes(manifest)
    path = out / "manifest.json"
    if path.is_file() and path.read_bytes() == data:
        return "unchanged"
    _save_atomic(path, lambda f: f.write(data))
    return "written"


@dataclass(frozen=True)
class TokenizeOptions:
    """How images become shards. `resolution` None: the tokenizer's; `flip` None: the dataset's
    default (a mirrored view for photos, none for the digits); `rank` of `world_size` processes
    does its share of the shards; `num_workers` threads read and crop images."""
    resolution: Optional[int] = None
    flip: Optional[bool] = True
    ten_crop: bool = False
    batch_size: int = 64
    shard_size: int = 10_000
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    num_workers: int = 4
    progress: bool = True
    verbose: bool = True

    def __post_init__(self) -> None:
        if not (0 <= self.rank < self.world_size):
            raise ValueError(f"rank must satisfy 0 <= rank < world_size, got rank={self.rank}, "
                             f"world_size={self.world_size}.")
        if self.resolution is not None and self.resolution <= 0:
            raise ValueError(f"resolution (--resolution) must be a positive number of pixels, got {self.resolution}.")
        if self.num_workers < 0:
            raise ValueError(f"num_workers (--num-workers) must be 0 (decode in this thread) or more, got "
                             f"{self.num_workers}.")
        if self.batch_size <= 0 or self.shard_size <= 0:
            raise ValueError(f"batch_size and shard_size must be positive, got {self.batch_size} and {self.shard_size}.")


def encode_bytes(channels: int, resolution: int) -> int:
    """A lower bound of the memory one image takes while the VQGAN encodes it: three feature maps of
    `channels` at full resolution live at once in its first residual blocks (measured: about five,
    161 MiB per 256 px image with 128 channels), so a batch refused by this bound cannot fit."""
    return 3 * channels * resolution * resolution * 4


def _tokenize(tokenizer, source: _Source, out_dir, o: TokenizeOptions) -> TokenizeReport:
    resolution, flip, ten_crop_, batch_size, shard_size = o.resolution, o.flip, o.ten_crop, o.batch_size, o.shard_size
    rank, world_size, device, num_workers, progress = o.rank, o.world_size, o.device, o.num_workers, o.progress
    # recorded so training can find the tokenizer that decodes these tokens (None: an in-memory model)
    tok_path = None if isinstance(tokenizer, VQGAN) else str(Path(tokenizer).resolve())
    model = (tokenizer if isinstance(tokenizer, VQGAN) else load_any_tokenizer(tokenizer)).to(device).eval()
    resolution = resolution or model.config.resolution
    settings = _settings(model, source, resolution, flip, ten_crop_, shard_size)
    images = batch_size * settings["views_per_image"]
    check_memory(images * encode_bytes(model.config.hidden_channels, resolution), device,
                 f"encoding batch_size {batch_size} x {settings['views_per_image']} view(s) at {resolution} px",
                 "lower --batch-size")
    fp, total, out = _fingerprint(settings), settings["num_shards"], Path(out_dir)
    _check_shard_folder(out, source)
    ensure_writable_dir(out, "token shard folder")
    report = TokenizeReport(str(out), rank, world_size)
    mine = [s for s in range(total) if s % world_size == rank]
    todo = [s for s in mine if not _shard_done(out, s, total, fp)]
    report.shards_skipped = [s for s in mine if s not in todo]
    opts = {"resolution": resolution, "flip": flip, "ten_crop": ten_crop_, "batch_size": batch_size,
            "shard_size": shard_size, "device": device, "dtype": np.dtype(settings["dtype"]),
            "views": settings["views_per_image"], "tokens_per_image": settings["tokens_per_image"]}
    n_todo = sum(min((s + 1) * shard_size, source.n) - s * shard_size for s in todo)
    t0 = time.time()
    with ThreadPoolExecutor(num_workers) if num_workers > 0 else nullcontext() as pool, \
            tqdm(total=n_todo, desc=f"tokenize rank {rank}", unit="img", disable=not progress or not todo) as bar:
        for s in todo:
            tokens, labels, failed = _encode_shard(model, source, s, opts, pool, bar)
            if len(tokens) == 0 and failed:  # nothing readable: an error, not an empty shard
                raise ValueError(f"none of the {len(failed)} images of shard {s} could be read (first: {failed[0][0]}: "
                                 f"{failed[0][1]}); expected image files that PIL can open.")
            _write_shard(out, s, total, fp, tokens, labels, failed)
            report.shards_written.append(s)
            report.images += len(tokens)
            report.failed += failed
    report.seconds = time.time() - t0
    info = {"tokenizer_path": tok_path, "source": source.describe}
    report.manifest = _try_write_manifest(out, settings, fp, info)
    if o.verbose:
        tqdm.write(report.summary())
    return report


def tokenize_folder(tokenizer, root, out_dir, *, options: TokenizeOptions | None = None,
                    resolution: Optional[int] = None, flip: bool = True, ten_crop: bool = False, batch_size: int = 64,
                    shard_size: int = 10_000, rank: int = 0, world_size: int = 1, device: str = "cpu",
                    num_workers: int = 4, progress: bool = True, verbose: bool = True) -> TokenizeReport:
    """Tokenize an ImageNet-layout folder (root/CLASS/IMAGE) into token shards in `out_dir`.

    `tokenizer` is a VQGAN or a path for `load_any_tokenizer`. The options come as a
    `TokenizeOptions` or, when `options` is None, as the keywords of the same names. Run it once
    per rank (rank, world_size) to split the work; finished shards are skipped on a re-run and
    unreadable images are skipped and listed in the report and manifest.
    """
    options = options or TokenizeOptions(resolution, flip, ten_crop, batch_size, shard_size, rank, world_size, device,
                                         num_workers, progress, verbose)
    return _tokenize(tokenizer, _folder_source(root), out_dir, dataclasses.replace(options, flip=options.flip is not False))


def tokenize_dataset(tokenizer, images: np.ndarray, labels, out_dir, *, class_names: Optional[Sequence[str]] = None,
                     name: str = "array", options: TokenizeOptions | None = None, resolution: Optional[int] = None,
                     flip: bool = True, ten_crop: bool = False, batch_size: int = 64, shard_size: int = 10_000,
                     rank: int = 0, world_size: int = 1, device: str = "cpu", num_workers: int = 0,
                     progress: bool = True, verbose: bool = True) -> TokenizeReport:
    """Tokenize an in-memory uint8 dataset (N, H, W) or (N, H, W, 3) with labels (N,); grayscale is
    replicated to RGB. Same output and options as `tokenize_folder`."""
    options = options or TokenizeOptions(resolution, flip, ten_crop, batch_size, shard_size, rank, world_size, device,
                                         num_workers, progress, verbose)
    return _tokenize(tokenizer, _array_source(images, labels, class_names, name), out_dir,
                     dataclasses.replace(options, flip=options.flip is not False))


def tokenize_digits(tokenizer, out_dir, *, seed: int = 0, n_train: int = 4500,
                    options: TokenizeOptions | None = None, split: str = "train") -> TokenizeReport:
    """The demo's train split of MNIST digits, or its held-out split with `split="test"` (no flip
    view unless `options.flip` is True: digits are not mirror-symmetric)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    options = dataclasses.replace(options or TokenizeOptions(num_workers=0), flip=options is not None and options.flip is True)
    data = load_mnist_digits(seed=seed, n_train=n_train)
    suffix = "" if split == "train" else ",split=test"
    return tokenize_dataset(tokenizer, data[f"{split}_images"], data[f"{split}_labels"], out_dir,
                            class_names=data["class_names"],
                            name=f"mnist_digits(seed={seed},n_train={n_train}{suffix})", options=options)


def tokenize(tokenizer, out_dir, options: TokenizeOptions, *, data: Optional[str] = None,
             dataset: Optional[str] = None, split: str = "train") -> TokenizeReport:
    """`rar tokenize`: exactly one of `data` (an image folder) or `dataset='digits'` (its `split`)."""
    if (data is None) == (dataset is None):
        raise ValueError("pass exactly one of data (an image folder) or dataset ('digits').")
    if dataset is not None:
        if dataset != "digits":
            raise ValueError(f"dataset must be 'digits', got {dataset!r}.")
        return tokenize_digits(tokenizer, out_dir, options=options, split=split)
    if split != "train":
        raise ValueError("split applies to dataset='digits' only; an image folder is tokenized whole.")
    return tokenize_folder(tokenizer, data, out_dir, options=options)
