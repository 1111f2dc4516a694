"""What `rar app`'s handlers compute, without Gradio: each request parsed and checked (a
ValueError naming the input), and a list of waiting requests served together. Requests with equal
settings decode as one batch in which every row keeps its own (seed, index), so each user gets
exactly the tokens of a lone request; each request's images are then decoded by the tokenizer as
their own batch, so they are the lone request's pixel for pixel too (the tokenizer's convolutions
round alike only at equal batch sizes). The decode runner (`app_runner`) decides what waits
together; `app` builds the page.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core.seeds import resolve_seed
from ..data.images import center_crop_mask, image_tensor, make_grid, to_uint8
from ..inference import SamplingSettings, generate
from ..inference.image_editing import EditJob, inpaint_many, outpaint_many

REGIONS = ("brush", "top half", "bottom half", "left half", "right half", "centre")
METHODS = {"kept-first": (True,), "raster baseline": (False,), "both": (True, False)}
MAX_IMAGES = 16  # per Generate request
MAX_EDITS = 8  # results per Edit request
MAX_BATCH_ROWS = 32  # images per network batch when requests are served together


@dataclass
class AppModels:
    backend: object  # rar.decode.DecodeBackend
    tokenizer: object  # rar.VQGAN
    class_names: list[str]
    generator_ref: str  # how the Python snippet names the weights
    tokenizer_ref: str

    @property
    def choices(self) -> list[str]:
        return [f"{i}: {n}" for i, n in enumerate(self.class_names)]


def _class_id(choice) -> int | None:
    """The class id of a dropdown value ("7: name", or 7), None for none."""
    if choice in (None, "", "none"):
        return None
    head = str(choice).split(":", 1)[0].strip()
    if not head.lstrip("-").isdigit():
        raise ValueError(f"class must be a class id or \"ID: name\" from the list, got {choice!r}.")
    return int(head)


def _number(value, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}.") from None


def _save(images: torch.Tensor, prefix: str, nrow: int = 8) -> tuple[Image.Image, list[str]]:
    """(the grid shown in the page, PNG paths of the images in a fresh temporary folder)."""
    pics = to_uint8(images)
    folder = Path(tempfile.mkdtemp(prefix="rar-app-"))
    paths = []
    for i, p in enumerate(pics):
        paths.append(str(folder / f"{prefix}_{i:02d}.png"))
        Image.fromarray(p).save(paths[-1])
    grid = Image.fromarray(make_grid(pics, nrow=min(len(pics), nrow)))
    scale = max(1, 128 // pics.shape[1])  # small images (digits) shown enlarged; the PNG files stay as made
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST), paths


@dataclass(frozen=True)
class GenerateRequest:
    """One Generate request, checked: its images are rows (label, seed, index 0..num-1)."""
    label: int
    num: int
    seed: int
    settings: SamplingSettings  # resolved: hashable, so equal settings group into one batch


def parse_request(models: AppModels, choice, num, guidance_scale, guidance_scale_pow, temperature, seed,
                  steps=None) -> GenerateRequest:
    """The Generate tab's (or the `generate` endpoint's) inputs, each checked (ValueError naming it)."""
    c = _class_id(choice)
    if c is None:
        raise ValueError("choose a class to generate.")
    if not 0 <= c < models.backend.config.num_classes:
        raise ValueError(f"class {c} is outside 0..{models.backend.config.num_classes - 1}.")
    num = _whole(num, "number of images")
    if not isinstance(num, int) or not 1 <= num <= MAX_IMAGES:
        raise ValueError(f"number of images must be between 1 and {MAX_IMAGES}, got {num}.")
    settings = SamplingSettings(_number(guidance_scale, "guidance scale"), _number(guidance_scale_pow, "guidance power"),
                                _number(temperature, "temperature"),
                                steps=_passes(models, steps)).resolve(models.backend.sampling)
    return GenerateRequest(c, num, resolve_seed(_whole(seed, "seed"), None), settings)


def _passes(models: AppModels, steps) -> int | None:
    """Network passes: None (one per token) at or above the number of tokens."""
    if steps is None:
        return None
    steps = _whole(steps, "network passes")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"network passes must be a positive whole number, got {steps!r}.")
    return None if steps >= models.backend.config.num_tokens else steps


def _whole(value, name: str):
    """A whole number given as int, float or text (Gradio's Number sends floats) as an int; anything
    else is returned unchanged for the caller's own check to name."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {value!r}.") from None
    return int(f) if f.is_integer() else value


def generate_requests(models: AppModels, requests: list[GenerateRequest]) -> list[torch.Tensor]:
    """Images (num, 3, H, W) per request. Requests with equal settings decode together, in batches of
    at most MAX_BATCH_ROWS images; each row keeps its own (seed, index), so every request gets
    exactly the tokens it would get alone (`rar.generate` with one seed per sample), and its
    images are decoded as its own batch, so that they too are the lone request's, pixel for pixel."""
    out: list = [None] * len(requests)
    groups: dict = {}
    for k, r in enumerate(requests):
        groups.setdefault(r.settings, []).append(k)
    for settings, ks in groups.items():
        labels = torch.tensor([requests[k].label for k in ks for _ in range(requests[k].num)])  # (N,)
        seeds = [requests[k].seed for k in ks for _ in range(requests[k].num)]
        indices = [i for k in ks for i in range(requests[k].num)]
        tokens = torch.cat([generate(models.backend, labels[s:s + MAX_BATCH_ROWS], settings=settings,
                                     seed=seeds[s:s + MAX_BATCH_ROWS], indices=indices[s:s + MAX_BATCH_ROWS])
                            for s in range(0, len(labels), MAX_BATCH_ROWS)])  # (N, T)
        for k, part in zip(ks, tokens.split([requests[k].num for k in ks])):
            with torch.inference_mode():  # per request: the tokenizer's convolutions round alike only at equal batch
                out[k] = models.tokenizer.decode(part).float()
    return out


def _generate_result(models: AppModels, r: GenerateRequest, images: torch.Tensor):
    """(grid, PNG paths, the Python call that reproduces the request)."""
    grid, paths = _save(images, f"class{r.label}_seed{r.seed}")
    kw = dict(guidance_scale=r.settings.guidance_scale, guidance_scale_pow=r.settings.guidance_scale_pow,
              temperature=r.settings.temperature, seed=r.seed, **({"steps": r.settings.steps} if r.settings.steps else {}))
    code = (f"import rar, torch\n\nmodel = rar.from_pretrained({models.generator_ref!r})\n"
            f"tokenizer = rar.from_pretrained({models.tokenizer_ref!r})\n"
            f"tokens = rar.generate(model, torch.tensor({[r.label] * r.num}), "
            + ", ".join(f"{k}={v!r}" for k, v in kw.items()) + ")\n"
            "images = tokenizer.decode(tokens)  # (N, 3, H, W) in [0, 1]\n")
    return grid, paths, code


def generate_results(models: AppModels, requests: list[GenerateRequest]) -> list[tuple]:
    """(grid, PNG paths, Python call) of each request, decoded together (`generate_requests`)."""
    return [_generate_result(models, r, im) for r, im in zip(requests, generate_requests(models, requests))]


def generate_images(models: AppModels, choice, num, guidance_scale, guidance_scale_pow, temperature, seed,
                    steps=None):
    """(grid, PNG paths, the reproducing Python call) of one Generate request; `steps` below the
    number of tokens decodes in parallel (several tokens per network pass)."""
    r = parse_request(models, choice, num, guidance_scale, guidance_scale_pow, temperature, seed, steps)
    return _generate_result(models, r, generate_requests(models, [r])[0])


def region_mask(region: str, size: int) -> np.ndarray:
    """(size, size) bool of a preset region: True = regenerate."""
    m = np.zeros((size, size), bool)
    h, q = size // 2, size // 4
    if region == "top half":
        m[:h] = True
    elif region == "bottom half":
        m[h:] = True
    elif region == "left half":
        m[:, :h] = True
    elif region == "right half":
        m[:, h:] = True
    elif region == "centre":
        m[q:size - q, q:size - q] = True
    else:
        raise ValueError(f"region must be one of {', '.join(REGIONS)}, got {region!r}.")
    return m


def editor_image(value, resolution: int) -> torch.Tensor:
    """The editor's background, center-cropped to the tokenizer's resolution: (3, R, R) in [0, 1]."""
    background = None if value is None else value.get("background")
    if background is None:
        raise ValueError("upload an image first (PNG or JPEG), or take a generated one.")
    rgba = np.asarray(background)
    if rgba.ndim != 3 or rgba.shape[-1] not in (3, 4):
        raise ValueError(f"the uploaded image could not be read as RGB (array of shape {rgba.shape}).")
    return image_tensor(Image.fromarray(rgba[..., :3].astype(np.uint8)), resolution)


def editor_mask(value, region: str, resolution: int) -> torch.Tensor:
    """The region to regenerate, (R, R) bool: a preset region, or the pixels brushed over the
    editor's background, cropped as the image."""
    if region != "brush":
        return torch.from_numpy(region_mask(region, resolution))
    shape = np.asarray(value["background"]).shape[:2]
    strokes = np.zeros(shape, bool)
    for layer in value.get("layers") or []:
        a = np.asarray(layer)
        if a.ndim == 3 and a.shape[-1] == 4 and a.shape[:2] == shape:
            strokes |= a[..., 3] > 0
    if not strokes.any():
        raise ValueError("brush over the region to regenerate, or choose a preset region.")
    return torch.from_numpy(np.asarray(center_crop_mask(Image.fromarray(strokes.astype(np.uint8) * 255), resolution)) > 127)


@dataclass(frozen=True)
class EditSettings:
    """What Edit requests must share to decode as one batch (hashable)."""
    mode: str  # inpaint | outpaint
    methods: tuple  # kept_first values, one result row each
    steps: int | None
    extend: tuple = ()  # outpainting: ((side, k),)


@dataclass
class EditRequest:
    """One Edit request, checked: its image, mask, class, count and seed, and its settings."""
    job: EditJob
    settings: EditSettings


def parse_edit(models, value, region, choice, mode, side, amount, method, num, seed, steps=None) -> EditRequest:
    """The Edit tab's (or the `edit` endpoint's) inputs, each checked (ValueError naming it)."""
    if mode not in ("inpaint", "outpaint"):
        raise ValueError(f"task must be inpaint or outpaint, got {mode!r}.")
    if method not in METHODS:
        raise ValueError(f"decoding must be one of {', '.join(METHODS)}, got {method!r}.")
    num = _whole(num, "number of results")
    if not isinstance(num, int) or not 1 <= num <= MAX_EDITS:
        raise ValueError(f"number of results must be between 1 and {MAX_EDITS}, got {num}.")
    label = _class_id(choice)
    if label is not None and not 0 <= label < models.backend.config.num_classes:
        raise ValueError(f"class {label} is outside 0..{models.backend.config.num_classes - 1}.")
    res, steps = models.tokenizer.config.resolution, _passes(models, steps)
    extend = ()
    if mode == "outpaint":
        amount = _whole(amount, "outpaint amount")
        if side not in ("left", "right", "up", "down") or not isinstance(amount, int) or amount < 1:
            raise ValueError(f"outpaint needs a side (left, right, up, down) and a positive amount, got {side!r}, "
                             f"{amount!r}.")
        extend = ((side, amount),)
    x = editor_image(value, res)
    mask = editor_mask(value, region, res) if mode == "inpaint" else None
    job = EditJob(x, mask, label, num, resolve_seed(_whole(seed, "seed"), None))
    return EditRequest(job, EditSettings(mode, METHODS[method], steps, extend))


def edit_requests(models, requests: list[EditRequest]) -> list[torch.Tensor]:
    """Images (rows x num, 3, H, W) per request: one row of `num` results per decoding method.
    Requests with equal settings decode together (`rar.inference.image_editing.inpaint_many` /
    `outpaint_many`), each getting exactly the images of a lone request."""
    out: list = [[] for _ in requests]
    groups: dict = {}
    for k, r in enumerate(requests):
        groups.setdefault(r.settings, []).append(k)
    for s, ks in groups.items():
        for kept_first in s.methods:
            for part in _chunks(ks, [requests[k].job.num for k in ks], MAX_BATCH_ROWS):
                jobs = [requests[k].job for k in part]
                kw = dict(kept_first=kept_first, progress=True, settings=SamplingSettings(steps=s.steps))
                if s.mode == "inpaint":  # the page shows no reconstruction: one tokenizer decode fewer per request
                    results = inpaint_many(models.backend, models.tokenizer, jobs, reconstruction=False, **kw)
                else:
                    results = outpaint_many(models.backend, models.tokenizer, jobs, list(s.extend), **kw)
                for k, res in zip(part, results):
                    out[k].append(res["images"])
    return [torch.cat(rows) for rows in out]


def _chunks(keys: list, sizes: list[int], limit: int) -> list[list]:
    """`keys` in order, cut into runs whose sizes sum to at most `limit` (a larger one alone)."""
    runs, total = [[]], 0
    for k, n in zip(keys, sizes):
        if runs[-1] and total + n > limit:
            runs, total = runs + [[]], 0
        runs[-1].append(k)
        total += n
    return runs


def edit_results(models, requests: list[EditRequest]) -> list[tuple]:
    """(grid, PNG paths) of each Edit request, decoded together (`edit_requests`)."""
    return [_save(images, f"{r.settings.mode}_seed{r.job.seed}", nrow=r.job.num)
            for r, images in zip(requests, edit_requests(models, requests))]


def edit_images(models, value, region, choice, mode, side, amount, method, num, seed, steps=None):
    """(grid, PNG paths) of one Edit request: one row per method when both are asked for."""
    r = parse_edit(models, value, region, choice, mode, side, amount, method, num, seed, steps)
    return edit_results(models, [r])[0]
