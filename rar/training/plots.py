"""What a training run draws: sample grids during and after training, and the loss curve."""
from __future__ import annotations

from pathlib import Path

import torch

from ..data.images import save_grid
from ..inference.sampler import generate
from ..tokenizer.vqgan import load_any_tokenizer
from .logs import read_metrics


def sample_grid(model, tokenizer_path, path: Path, classes: list[int], order: str = "raster",
                per_class: int = 4) -> Path | None:
    """A grid of samples of `classes` (default: the first ten), one row per class, decoded by the
    tokenizer at `tokenizer_path` (None or missing: no grid), generated in scan order `order`: the
    order the run's annealing ends in. Sampled on the model's device, its train/eval mode restored."""
    if not tokenizer_path or not Path(tokenizer_path).exists():
        return None
    device = next(model.parameters()).device
    classes = list(classes) or list(range(min(10, model.config.num_classes)))
    labels = torch.tensor(classes).repeat_interleave(per_class).to(device)
    was_training = model.training
    model.eval()
    tokens = generate(model, labels, seed=0, order=None if order == "raster" else order)
    model.train(was_training)
    tokenizer = load_any_tokenizer(tokenizer_path).to(device)
    with torch.inference_mode():
        images = tokenizer.decode(tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_grid(images, path, nrow=per_class)


def plot_loss(out: Path) -> Path | None:
    """loss.png: the training loss with the randomness schedule r drawn on a second axis."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return None
    recs = read_metrics(path)
    if not recs:
        return None
    import matplotlib  # lazy: matplotlib takes ~0.5 s to import and only plots need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    steps = [r["step"] for r in recs]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(steps, [r["loss"] for r in recs], color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["random_ratio"] for r in recs], color="tab:orange", linestyle="--", label="r")
    ax2.set_ylabel("random-order probability r", color="tab:orange")
    ax2.set_ylim(-0.05, 1.05)
    ax.set_title("RAR training loss and randomness annealing")
    fig.tight_layout()
    fig.savefig(out / "loss.png")
    plt.close(fig)
    return out / "loss.png"
