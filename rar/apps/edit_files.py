"""`rar inpaint` and `rar outpaint`: image files -> edited images on disk, with a grid to look at
(original | masked | results). Every input is read and checked before anything is written."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core.checks import check_counts, check_pair
from ..core.devices import resolve_device
from ..core.files import check_not_empty, check_outputs, ensure_writable_dir, require_path
from ..data.images import center_crop_mask, image_tensor, load_rgb, make_grid, save_images, to_uint8
from ..decode.backend import prepare
from ..inference.editing import SCHEDULES
from ..inference.image_editing import check_canvas, inpaint, outpaint, parse_extend
from ..inference.sampler import SamplingSettings, check_plan
from ..model.weights import load_generator
from ..tokenizer.vqgan import load_any_tokenizer
from .classes import class_names_of, parse_classes, read_class_names


def read_image(path, resolution: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """An image file, center-cropped and resized to `resolution` as in training: (3, R, R) in
    [0, 1], and the file's (width, height)."""
    require_path(path, "image", "file", "an image file (PNG, JPEG, ...)")
    try:
        img = load_rgb(path)
    except Exception as err:  # PIL raises several types for a file that is not an image
        raise ValueError(f"image {str(path)!r} could not be read as an image ({err}).") from err
    return image_tensor(img, resolution), img.size


def read_mask(path, image_size: tuple[int, int], resolution: int) -> torch.Tensor:
    """A mask file of the image's size (white = regenerate) -> bool (R, R), cropped as the image."""
    require_path(path, "mask", "file", "an image of the image's size, white = regenerate")
    try:
        with Image.open(path) as m:
            mask = m.convert("L")
    except Exception as err:
        raise ValueError(f"mask {str(path)!r} could not be read as an image ({err}).") from err
    if mask.size != tuple(image_size):
        raise ValueError(f"mask {str(path)!r} is {mask.size[0]}x{mask.size[1]} but the image is "
                         f"{image_size[0]}x{image_size[1]}; the mask must have the image's size.")
    m = torch.from_numpy(np.asarray(center_crop_mask(mask, resolution)) > 127)
    if not m.any():
        raise ValueError(f"mask {str(path)!r} marks nothing to regenerate (white = regenerate).")
    return m


def parse_class(text: str | None, generator_path, num_classes: int, class_names=None) -> int | None:
    """--class: an id, a class name, or "none" / unset for no class (unconditional)."""
    if text is None or str(text).strip().lower() in ("none", ""):
        return None
    names = read_class_names(class_names, num_classes) if class_names else class_names_of(generator_path, num_classes)
    ids = parse_classes(str(text), num_classes, names, flag="--class")
    if len(ids) != 1:
        raise ValueError(f"--class takes one class for the whole edit, got {len(ids)} ({text!r}).")
    return ids[0]


def _load(generator, tokenizer, device, dtype):
    device = resolve_device(device)
    model = load_generator(generator).to(device=device, dtype=getattr(torch, dtype))
    vq = load_any_tokenizer(tokenizer).to(device).eval()
    check_pair(model, vq, repr(str(generator)), repr(str(tokenizer)))
    return model, vq


def _edit_options(model, settings: SamplingSettings | None, order, kept_first: bool, schedule_over: str) -> dict:
    """The editing options, checked before any file is written, as `inpaint`/`outpaint` keywords."""
    settings = settings or SamplingSettings()
    check_plan(model, settings, order)
    if schedule_over not in SCHEDULES:
        raise ValueError(f"schedule_over must be one of {SCHEDULES}, got {schedule_over!r}.")
    return dict(settings=settings, order=order, kept_first=kept_first, schedule_over=schedule_over)


def _recorded(options: dict) -> dict:
    """What edit.json records of the options: the ones set."""
    settings = {k: v for k, v in dataclasses.asdict(options["settings"]).items() if v is not None}
    return {"kept_first": options["kept_first"], **({"order": options["order"]} if options["order"] is not None else {}),
            **({"schedule_over": options["schedule_over"]} if options["schedule_over"] != "sequence" else {}),
            **settings}


def _output_folder(out_dir, num: int, paste_back: bool, overwrite: bool, inputs) -> Path:
    """The output folder, made writable, after checking every file `_write` will put there."""
    names = [f"result_{i:02d}.png" for i in range(num)]
    names += [f"raw/{n}" for n in names] if paste_back else []
    check_not_empty(out_dir, "output folder")
    check_outputs([Path(out_dir) / n for n in [*names, "grid.png", "edit.json"]], overwrite=overwrite, inputs=inputs)
    return ensure_writable_dir(out_dir, "output folder")


def _write(out: Path, result: dict, first: list[torch.Tensor], settings: dict, seconds: float) -> str:
    pics = to_uint8(result["images"])
    paths = save_images(pics, out, [f"result_{i:02d}" for i in range(len(pics))])
    if settings.get("paste_back"):
        save_images(to_uint8(result["raw"]), out / "raw", [f"result_{i:02d}" for i in range(len(pics))])
    grid = np.concatenate([to_uint8(torch.stack(first)), pics])
    Image.fromarray(make_grid(grid, nrow=len(grid))).save(out / "grid.png")
    (out / "edit.json").write_text(json.dumps({**settings, "seconds": round(seconds, 2)}, indent=2) + "\n")
    return f"{len(paths)} results in {out} ({seconds:.1f} s); grid in {out / 'grid.png'}"


def inpaint_files(image, mask, out_dir, *, generator, tokenizer, label=None, class_names=None, num: int = 4,
                  dilate: int = 0, paste_back: bool = True, seed: int = 0, device: str = "cpu",
                  dtype: str = "float32", settings: SamplingSettings | None = None, order=None,
                  kept_first: bool = True, schedule_over: str = "sequence", overwrite: bool = False) -> str:
    """`rar inpaint`: writes result_NN.png, raw/ (the decodes before pasting back), grid.png
    (original | masked | results) and edit.json. Returns a summary line."""
    check_counts(num=num)
    if dilate < 0:
        raise ValueError(f"dilate must be a non-negative number of tokens, got {dilate}.")
    model, vq = _load(generator, tokenizer, device, dtype)
    res = vq.config.resolution
    img, size = read_image(image, res)
    m = read_mask(mask, size, res)
    c = parse_class(label, generator, model.config.num_classes, class_names)
    options = _edit_options(model, settings, order, kept_first, schedule_over)
    out = _output_folder(out_dir, num, paste_back, overwrite, [image, mask])
    t0 = time.perf_counter()
    r = inpaint(prepare(model), vq, img, m, c, num=num, dilate=dilate, paste=paste_back, seed=seed,
                reconstruction=False, **options)  # the grid shows the original, not its reconstruction
    settings = {"command": "inpaint", "image": str(image), "mask": str(mask), "class": c, "num": num,
                "dilate": dilate, "paste_back": paste_back, "seed": seed, "regenerated_tokens": int((~r["keep"]).sum()),
                **_recorded(options)}
    return _write(out, r, [img, r["masked"]], settings, time.perf_counter() - t0)


def outpaint_files(image, extend, out_dir, *, generator, tokenizer, label=None, class_names=None, num: int = 4,
                   paste_back: bool = True, seed: int = 0, device: str = "cpu", dtype: str = "float32",
                   settings: SamplingSettings | None = None, order=None, kept_first: bool = True,
                   schedule_over: str = "sequence", overwrite: bool = False) -> str:
    """`rar outpaint`: writes result_NN.png (the grown canvas), raw/, grid.png (original on the
    grown canvas | results) and edit.json. Returns a summary line."""
    check_counts(num=num)
    sides = parse_extend(extend)
    model, vq = _load(generator, tokenizer, device, dtype)
    check_canvas(sides, model.config.grid_size)
    img, _ = read_image(image, vq.config.resolution)
    c = parse_class(label, generator, model.config.num_classes, class_names)
    options = _edit_options(model, settings, order, kept_first, schedule_over)
    out = _output_folder(out_dir, num, paste_back, overwrite, [image])
    t0 = time.perf_counter()
    r = outpaint(prepare(model), vq, img, sides, c, num=num, paste=paste_back, seed=seed, **options)
    h, w = r["images"].shape[-2:]
    settings = {"command": "outpaint", "image": str(image), "extend": [f"{s}:{k}" for s, k in sides], "class": c,
                "num": num, "paste_back": paste_back, "seed": seed, "size": [h, w],
                **_recorded(options)}
    return _write(out, r, [r["canvas"]], settings, time.perf_counter() - t0)
