"""`rar app`: a web page (Gradio, optional extra `app`) to generate and edit images with a
generator + tokenizer pair, e.g. the official RAR-B by name or the digit models of `rar demo`.

Generate tab: class by name, number of images, guidance scale / power / temperature (the
preset's defaults shown), seed and a random-seed button, network passes (fewer than the tokens:
parallel decoding, several tokens per pass); the result as a grid and PNG files,
and the Python call that reproduces it. Edit tab: upload an image (or take a generated one),
brush the region to regenerate (or pick a preset region), a class or none, inpaint or outpaint,
kept-first any-order decoding and/or the raster baseline, network passes. Requests wait in a
bounded queue and are decoded on one thread, those arriving together as one batch (`app_runner`,
`app_requests`); a bad input is a message in the page, not a traceback.
"""
from __future__ import annotations

import functools
import random
from pathlib import Path

from ..core.checks import check_pair
from ..core.devices import resolve_device
from ..decode.backend import prepare
from ..model.weights import load_generator
from ..tokenizer.vqgan import load_any_tokenizer
from .app_requests import (MAX_EDITS, MAX_IMAGES, REGIONS, AppModels, edit_results, generate_results, parse_edit,
                           parse_request)
from .app_runner import DecodeRunner
from .classes import class_names_of

# Under load: up to MAX_BATCH_REQUESTS waiting Generate requests (and as many Edit requests) are
# served together by the decode runner (app_runner, app_requests); at most QUEUE_SIZE requests
# wait, and past that a user is told the app is busy instead of waiting without end.
MAX_BATCH_REQUESTS = 8
QUEUE_SIZE = 32


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
                    enum = gr.Slider(1, MAX_EDITS, value=4, step=1, label="number of results")
                    eseed = gr.Number(0, precision=0, label="seed")
                    esteps = _steps_slider(gr, models, "edit-steps")
            erun = gr.Button("Edit", variant="primary", elem_id="edit-run")
            egrid = gr.Image(label="results", type="pil", elem_id="edit-grid", height=280)
            efiles = gr.File(label="PNG files", file_count="multiple")

        # one object each: the runner batches the jobs of equal functions
        many, many_edits = functools.partial(generate_results, models), functools.partial(edit_results, models)

        def run_generate(*inputs):  # every torch op on the runner's thread (see app_runner)
            return RUNNER.batch(many, parse_request(models, *inputs))

        # the named endpoints /generate and /edit: up to MAX_BATCH_REQUESTS requests of each wait in the
        # runner at once and are decoded together, each still getting exactly the images of a lone request
        go.click(_guarded(run_generate), [cls, num, g, p, t, seed, steps], [grid, files, code], api_name="generate",
                 concurrency_limit=MAX_BATCH_REQUESTS).then(_paths, files, last, queue=False,
                                                                       api_visibility="private")
        dice.click(lambda: random.randrange(2**31), None, seed, api_visibility="private")
        take.click(_guarded(_first), last, editor, api_visibility="private")

        def run_edit(v, r, c, m, sdd, a, meth, n, sd, st, progress=gr.Progress(track_tqdm=True)):
            return RUNNER.batch(many_edits, parse_edit(models, v, r, c, m, sdd, a, meth, n, sd, st))
        inputs = [editor, region, ecls, mode, side, amount, method, enum, eseed, esteps]
        erun.click(_guarded(run_edit), inputs, [egrid, efiles], api_name="edit", concurrency_limit=MAX_BATCH_REQUESTS)
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
