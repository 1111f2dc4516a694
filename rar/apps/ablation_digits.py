"""The digit evaluation of one ablation run (`rar ablate` with `evaluation: digits`): its
samples' class accuracy and FD in the demo classifier's features against the held-out digits
(not FID), its held-out NLL (bits per token) in the order it was trained to end in, the
top-half inpainting accuracy of kept-first decoding (what annealing costs in editability), and
the same sample scores for parallel decoding in random orders at a quarter of the passes
(`parallel_*`: T/4 passes, four tokens per pass on average; what permuted training buys)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..data.mnist import load_mnist_digits
from ..inference import generate, prepare
from ..inference.likelihood import log_likelihood
from ..metrics.digits import decode_uint8, predict_digits, score, train_digit_classifier
from ..model.weights import load_generator
from ..tokenizer.vqgan import load_any_tokenizer
from .editing_digits import encode_digits, evaluate_editing


def _shared(context: dict, tokenizer_path: str) -> dict:
    """The classifier, held-out digits and their tokens, made once per study."""
    if "classifier" not in context:
        data = load_mnist_digits(seed=0, n_train=4500)
        clf = train_digit_classifier(data, progress=False)
        context.update(data=data, classifier=clf, heldout_features=predict_digits(clf, data["test_images"])[1])
    if context.get("tokenizer_path") != tokenizer_path:
        if not tokenizer_path:
            raise ValueError("the digit evaluation needs data.tokenizer (the tokenizer of the token shards).")
        vq = load_any_tokenizer(tokenizer_path).eval()
        context.update(tokenizer_path=tokenizer_path, tokenizer=vq,
                       heldout_codes=encode_digits(vq, context["data"]["test_images"]))
    return context


def tokenizer_of(cfg) -> str | None:
    """The tokenizer of a run's token shards: data.tokenizer, else the one their manifest records
    ("" when it records none); None while the shards do not exist yet (training refuses that)."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    manifest = Path(cfg.data.path) / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text()).get("tokenizer_path") or ""
    except (ValueError, AttributeError):
        return None  # a damaged manifest: training names it


def evaluate_run(generator_dir, cfg, context: dict, per_class: int = 50) -> dict:

    ctx = _shared(context, tokenizer_of(cfg))
    data, clf, vq = ctx["data"], ctx["classifier"], ctx["tokenizer"]
    model = load_generator(generator_dir)
    backend = prepare(model)
    labels = torch.arange(10).repeat_interleave(per_class)
    sampled = _sample_scores(backend, vq, clf, labels, ctx["heldout_features"], order=cfg.order)
    quarter = _sample_scores(backend, vq, clf, labels, ctx["heldout_features"], order="random",
                             steps=max(1, model.config.num_tokens // 4))
    nll = log_likelihood(model, ctx["heldout_codes"], torch.as_tensor(data["test_labels"]), orders=cfg.order)
    edit = evaluate_editing(backend, vq, clf, data["test_images"], data["test_labels"], tasks=("top_half",),
                            methods=("kept_first",), conditions=("conditional",))["results"][0]
    return {"fd": sampled["fd"], "class_accuracy": sampled["accuracy"],
            "heldout_bits_per_token": float(nll.mean()) / math.log(2),
            "inpaint_top_half_accuracy": edit["accuracy"],
            "parallel_fd": quarter["fd"], "parallel_class_accuracy": quarter["accuracy"]}


def _sample_scores(backend, vq, clf, labels, heldout_features, **decoding) -> dict:
    """Score (FD, accuracy) of samples of `labels`, drawn in batches of 250 from seed 0 and each index."""
    n = len(labels)
    tokens = torch.cat([generate(backend, labels[s:s + 250], seed=0, indices=range(s, min(s + 250, n)), **decoding)
                        for s in range(0, n, 250)])  # (n, T)
    return score(clf, decode_uint8(vq, tokens), labels.numpy(), heldout_features)
