"""`rar app`: a web page (Gradio, optional extra `app`) to generate and edit images with a
generator + tokenizer pair, e.g. the official RAR-B by name or the digit models of `rar demo`.

Generate tab: class by name, number of images, guidance scale / power / temperature (the
preset's defaults shown), seed and a random-seed button, network passes (fewer than the tokens:
parallel decoding, several tokens per pass); the result as a grid and PNG files,
and the Python call that reproduces it. Edit tab: upload an image (or take a generated one),
brush the region to regenerate (or pick a preset region), a class or none, inpaint or outpaint,
kept-first any-order decoding and/or the raster baseline, network passes. One job runs at a time per process
(a queue); a bad input is a message in the page, not a traceback.
"""
from __future__ import annotations

import functools
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core.checks import check_pair
from ..core.devices import resolve_device
from ..core.seeds import resolve_seed
from ..data.images import center_crop_mask, image_tensor, make_grid, to_uint8
from ..decode.backend import prepare
from ..inference import SamplingSettings, generate
from ..inference.image_editing import inpaint, outpaint
from ..model.weights import load_generator
from ..tokenizer.vqgan import load_any_tokenizer
from .app_runner import DecodeRunner
from .classes import class_names_of

REGIONS = ("brush", "top half", "bottom half", "left half", "right half", "centre")
MAX_IMAGES = 16  # per request
# Under load: up to MAX_BATCH_REQUESTS waiting Generate requests are served together (the decode
# runner, app_runner), their images in network batches of at most MAX_BATCH_ROWS; at most QUEUE_SIZE
# requests wait, and past that a user is told the app is busy instead of waiting without end.
MAX_BATCH_REQUESTS = 8
MAX_BATCH_ROWS = 32
QUEUE_SIZE = 32


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


def load_models(generator=None, tokenizer=None, demo=None, device: str = "cpu") -> AppModels:
    """The pair to serve: `demo` (a `rar demo` output folder) or `generator` + `tokenizer`
    (names such as rar_b / maskgit-vqgan, or paths)."""
    if demo is not None:
        root = Path(demo)
        generator, tokenizer = root / "rar" / "generator", root / "tokenizer" / "tokenizer"
        if not (generator / "config.json").is_file():
            raise FileNotFoundError(f"{str(root)!r} holds no trained generator ({str(generator)!r}); run "
                                    f"`rar demo --out {root}` first.")
    if generator is None or tokenizer is None:
        raise ValueError("give --demo DEMO_OUT, or both --generator and --tokenizer.")
    dev = resolve_device(device)
    model = load_generator(generator).to(dev)
    vq = load_any_tokenizer(tokenizer).to(dev).eval()
    check_pair(model, vq, repr(str(generator)), repr(str(tokenizer)))
    names = class_names_of(generator, model.config.num_classes) or [f"class {i}" for i in range(model.config.num_classes)]
    return AppModels(prepare(model), vq, names, str(generator), str(tokenizer))


def _class_id(choice) -> int | None:
    if choice in (None, "", "none"):
        return None
    return int(str(choice).split(":", 1)[0])


def _save(images: torch.Tensor, prefix: str, nrow: int = 8) -> tuple[Image.Image, list[str]]:

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
    T = models.backend.config.num_tokens
    steps = None if steps is None or int(steps) >= T else int(steps)
    settings = SamplingSettings(float(guidance_scale), float(guidance_scale_pow), float(temperature),
                                steps=steps).resolve(models.backend.sampling)
    return GenerateRequest(c, num, resolve_seed(_whole(seed, "seed"), None), settings)


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


def edit_images(models: AppModels, value, region, choice, mode, side, amount, method, num, seed, steps=None):
    """(grid, PNG paths) for the Edit tab: one row per method when both are asked for."""
    steps = None if steps is None or int(steps) >= models.backend.config.num_tokens else int(steps)
    res = models.tokenizer.config.resolution
    label, num, seed = _class_id(choice), int(num), int(seed)
    methods = {"kept-first": [True], "raster baseline": [False], "both": [True, False]}[method]
    x = editor_image(value, res)
    mask = editor_mask(value, region, res) if mode == "inpaint" else None
    rows = []
    for kept_first in methods:
        if mode == "inpaint":
            out = inpaint(models.backend, models.tokenizer, x, mask, label, num=num, seed=seed, kept_first=kept_first,
                          progress=True,
                          settings=SamplingSettings(steps=steps))
        else:
            out = outpaint(models.backend, models.tokenizer, x, [(side, int(amount))], label, num=num, seed=seed,
                           kept_first=kept_first, progress=True, settings=SamplingSettings(steps=steps))
        rows.append(out["images"])
    return _save(torch.cat(rows), f"{mode}_seed{seed}", nrow=num)


def _guarded(fn):
    """A handler whose bad-input errors become a message in the page (gr.Error), not a traceback."""
    import gradio as gr  # lazy: gradio is the optional extra rar[app]

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError, FloatingPointError) as err:
            raise gr.Error(str(err)) from None
    return run


def _steps_slider(gr, models: AppModels, elem_id: str):
    T = models.backend.config.num_tokens
    return gr.Slider(1, T, value=T, step=1, elem_id=elem_id,
                     label=f"network passes ({T}: one per token; fewer: several tokens per pass)")


def build_app(models: AppModels, queue_size: int = QUEUE_SIZE):
    """The Gradio Blocks of the two tabs (not launched), with the named API endpoints `generate`
    and `edit` (README: calling them with gradio_client)."""
    import gradio as gr  # lazy: gradio is the optional extra rar[app]

    d = models.backend.sampling
    with gr.Blocks(title="RAR: generate and edit") as app:
        gr.Markdown(f"## RAR: randomized autoregressive generation\n`{models.generator_ref}` with "
                    f"`{models.tokenizer_ref}`; {models.backend.description}")
        last = gr.State([])  # paths of the last generated images
        with gr.Tab("Generate"):
            with gr.Row():
                cls = gr.Dropdown(models.choices, value=models.choices[0], label="class (type to search)",
                                  filterable=True, elem_id="gen-class")
                num = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="number of images", elem_id="gen-num")
            with gr.Row():
                g = gr.Number(d.guidance_scale, label="guidance scale (preset default)", elem_id="gen-guidance")
                p = gr.Number(d.guidance_scale_pow, label="guidance power", elem_id="gen-pow")
                t = gr.Number(d.temperature, label="temperature", elem_id="gen-temperature")
                seed = gr.Number(0, precision=0, label="seed", elem_id="gen-seed")
                dice = gr.Button("random seed", elem_id="gen-random-seed")
            steps = _steps_slider(gr, models, "gen-steps")
            go = gr.Button("Generate", variant="primary", elem_id="gen-run")
            grid = gr.Image(label="result", type="pil", elem_id="gen-grid", height=280)
            files = gr.File(label="PNG files", file_count="multiple", elem_id="gen-files")
            code = gr.Code(label="the Python call that reproduces this", language="python", elem_id="gen-code")
        with gr.Tab("Edit"):
            with gr.Row():
                editor = gr.ImageEditor(label="image: upload, then brush the region to regenerate", type="numpy",
                                        sources=("upload", "clipboard"), elem_id="edit-image")
                with gr.Column():
                    take = gr.Button("take the first generated image", elem_id="edit-take")
                    region = gr.Radio(list(REGIONS), value="brush", label="region to regenerate", elem_id="edit-region")
                    ecls = gr.Dropdown(["none", *models.choices], value="none", label="class (none: unconditional)",
                                       filterable=True, elem_id="edit-class")
                    mode = gr.Radio(["inpaint", "outpaint"], value="inpaint", label="task", elem_id="edit-mode")
                    side = gr.Dropdown(["right", "left", "up", "down"], value="right", label="outpaint side")
                    amount = gr.Slider(1, 2 * models.backend.config.grid_size, value=models.backend.config.grid_size // 4,
                                       step=1, label="outpaint by (token rows or columns)")
                    method = gr.Radio(["kept-first", "raster baseline", "both"], value="kept-first",
                                      label="decoding (both: kept-first row, then the raster baseline row)",
                                      elem_id="edit-method")
                    enum = gr.Slider(1, 8, value=4, step=1, label="number of results")
                    eseed = gr.Number(0, precision=0, label="seed")
                    esteps = _steps_slider(gr, models, "edit-steps")
            erun = gr.Button("Edit", variant="primary", elem_id="edit-run")
            egrid = gr.Image(label="results", type="pil", elem_id="edit-grid", height=280)
            efiles = gr.File(label="PNG files", file_count="multiple")

        many = functools.partial(generate_results, models)  # one object: the runner batches jobs of equal ones

        def run_generate(*inputs):  # every torch op on the runner's thread (see app_runner)
            return RUNNER.generate(many, parse_request(models, *inputs))

        # the named endpoint /generate: up to MAX_BATCH_REQUESTS requests wait in the runner at once
        # and are decoded together (app_runner), each still getting exactly the images of a lone request
        go.click(_guarded(run_generate), [cls, num, g, p, t, seed, steps], [grid, files, code], api_name="generate",
                 concurrency_limit=MAX_BATCH_REQUESTS).then(_paths, files, last, queue=False,
                                                                       api_visibility="private")
        dice.click(lambda: random.randrange(2**31), None, seed, api_visibility="private")
        take.click(_guarded(_first), last, editor, api_visibility="private")

        def run_edit(v, r, c, m, sdd, a, meth, n, sd, st, progress=gr.Progress(track_tqdm=True)):
            return RUNNER.call(edit_images, models, v, r, c, m, sdd, a, meth, n, sd, st)
        inputs = [editor, region, ecls, mode, side, amount, method, enum, eseed, esteps]
        erun.click(_guarded(run_edit), inputs, [egrid, efiles], api_name="edit")  # one edit at a time
    # one job at a time, at most `queue_size` waiting: past it Gradio answers "the queue is full" at once
    return app.queue(default_concurrency_limit=1, max_size=queue_size)


def _paths(files) -> list[str]:
    """The Generate result's PNG paths (the File component's value), kept for "take the first image"."""
    return [f if isinstance(f, str) else getattr(f, "path", getattr(f, "name", str(f))) for f in files or []]


def _first(paths: list[str]):
    if not paths:
        raise ValueError("generate an image first (Generate tab).")
    return paths[0]


RUNNER = DecodeRunner(MAX_BATCH_REQUESTS)


def serve(models: AppModels, port: int | None = None, host: str = "127.0.0.1", share: bool = False,
          queue_size: int = QUEUE_SIZE) -> None:
    """Build and launch the app; decoding runs on this (the main) thread until interrupted."""
    app = build_app(models, queue_size)
    app.launch(prevent_thread_lock=True, server_name=host, server_port=port, share=share, max_file_size="20mb",
               show_error=True, ssr_mode=False)
    RUNNER.run(app.close)
