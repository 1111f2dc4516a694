"""Evaluation during training (config section `eval`, off by default): every `eval.every` steps,
before that step's checkpoint, the held-out bits per token in the run's order and, for the
digits, the FD (the demo's classifier features, against the held-out digits) and class accuracy
of a few hundred samples. Records go to `eval.jsonl` (one per evaluation, truncated on resume
like metrics.jsonl), so that a convergence curve needs no special script (ABLATION.md).

Nothing here touches the training's random streams: the samples come from their own seeded
generators and the whole evaluation runs under `torch.random.fork_rng`, so a run with
evaluation logs exactly the losses of one without.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import torch

from ..core.files import require_path
from ..data.batches import load_token_shards
from ..data.mnist import load_mnist_digits
from ..inference.likelihood import log_likelihood
from ..inference.sampler import generate
from ..metrics.digits import DigitClassifier, decode_uint8, predict_digits, score, train_classifier
from ..tokenizer.vqgan import load_any_tokenizer

CLASSIFIER_FILE = "eval-classifier.pt"  # trained once per run, so that every evaluation uses the same one


def _forked_rng():
    """torch's CPU and CUDA generators as they were when the block is left (the classifier's
    training reseeds them; model constructors draw from them)."""
    return torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else [])


@contextlib.contextmanager
def _eval_mode(model):
    """`model` in eval mode (no dropout) inside the block, back in its own mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def heldout_bits_per_token(model, tokens: torch.Tensor, labels: torch.Tensor, order: str = "raster",
                           batch_size: int = 250) -> float:
    """Mean cross-entropy in bits per token of held-out tokens (N, T) with their labels (N,), every
    sequence in the scan order `order` (`rar.log_likelihood`), the model in eval mode (no dropout)."""
    with _eval_mode(model):
        nll = log_likelihood(model, tokens, labels, orders=order, batch_size=batch_size)  # (N,) nats per token
    return float(nll.mean()) / math.log(2)


def _heldout(path: str, config) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain view's tokens (N, T) and labels (N,) of `eval.heldout`, checked against the model."""
    require_path(path, "eval.heldout", "folder", "token shards written by rar tokenize")
    data = load_token_shards(path)
    tokens = torch.as_tensor(np.array(data.tokens[:, 0]), dtype=torch.long)  # (N, T): the plain view
    labels = torch.as_tensor(data.labels, dtype=torch.long)
    what = f"eval.heldout {path!r}"  # (empty shards are refused by load_token_shards)
    if tokens.shape[1] != config.num_tokens or data.codebook_size != config.codebook_size:
        raise ValueError(f"{what} holds {tokens.shape[1]} tokens per image of a codebook of {data.codebook_size}; "
                         f"the model expects {config.num_tokens} of {config.codebook_size} (the same tokenizer).")
    if int(labels.min()) < 0 or int(labels.max()) >= config.num_classes:
        raise ValueError(f"{what} has class ids {int(labels.min())}..{int(labels.max())}; the model has classes "
                         f"0..{config.num_classes - 1}.")
    return tokens, labels


class RunEvaluator:
    """The `eval` section of a run, ready to call: held-out tokens loaded once, the digit
    classifier trained once (or loaded from the run folder) and the reference features."""

    def __init__(self, cfg, out: Path, tokenizer: str | None, model_config):
        """Built before the first training step, so that what does not fit the model is refused
        then (naming the `eval.*` key), not at the first evaluation."""
        with _forked_rng():
            self._setup(cfg, out, tokenizer, model_config)

    def _setup(self, cfg, out: Path, tokenizer: str | None, model_config) -> None:
        self.cfg, self.order = cfg.eval, cfg.order
        self.tokens = self.labels = None
        if self.cfg.heldout:
            self.tokens, self.labels = _heldout(self.cfg.heldout, model_config)
        self.digits = None
        if self.cfg.samples:
            if model_config.num_classes != 10:
                raise ValueError(f"eval.samples scores samples with the digit classifier (10 classes), but this model "
                                 f"has {model_config.num_classes} classes; expected eval.samples=0 for other data.")
            if not tokenizer:
                raise ValueError("eval.samples needs the tokenizer that made the tokens (data.tokenizer) to decode "
                                 "the samples; set it or set eval.samples=0.")
            self.tokenizer = load_any_tokenizer(tokenizer).eval()
            self.digits = self._digit_reference(out / CLASSIFIER_FILE)

    def _digit_reference(self, path: Path) -> dict:
        """The classifier (trained on the demo's train split, saved beside the run) and the features
        of the held-out digits."""
        data = load_mnist_digits(seed=0, n_train=4500)
        clf = DigitClassifier()
        if path.is_file():
            clf.load_state_dict(torch.load(path, weights_only=True))
        else:
            clf = train_classifier(data["train_images"], data["train_labels"], epochs=4, progress=False)
            partial = path.with_name(path.name + ".partial")
            torch.save(clf.state_dict(), partial)
            partial.replace(path)  # atomic: a run killed while saving it leaves none, not a broken one
        _, held = predict_digits(clf.eval(), data["test_images"])
        return {"classifier": clf.eval(), "heldout_features": held}

    def __call__(self, model, step: int) -> dict:
        """The record of `step`: {"step", "heldout_bits_per_token"?, "sample_fd"?, "sample_class_accuracy"?}."""
        rec = {"step": step}
        with _forked_rng():
            if self.tokens is not None:
                rec["heldout_bits_per_token"] = heldout_bits_per_token(model, self.tokens, self.labels, self.order)
            if self.digits is not None:
                rec.update(self._sample_metrics(model))
        return rec

    def _sample_metrics(self, model) -> dict:
        n = self.cfg.samples
        labels = torch.arange(n) % 10  # the ten digits in turn
        order = None if self.order == "raster" else self.order
        with _eval_mode(model):
            tokens = torch.cat([generate(model, labels[i:i + 250], seed=self.cfg.seed, order=order,
                                         indices=range(i, min(i + 250, n))) for i in range(0, n, 250)])
        res = score(self.digits["classifier"], decode_uint8(self.tokenizer, tokens.cpu()), labels.numpy(),
                    self.digits["heldout_features"])
        return {"sample_fd": res["fd"], "sample_class_accuracy": res["accuracy"]}
