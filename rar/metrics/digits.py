"""The demo's evaluation of digit samples. A small digit classifier gives the class accuracy of conditional
samples, and its 128-d penultimate features stand in for Inception's in a Fréchet distance.
That distance is reported as "FD in MNIST-classifier features", never as FID: the numbers are
not comparable with FID values computed with Inception on ImageNet.

It follows the feature-extractor protocol of `rar.metrics.fidelity`: called on uint8 (B, 3, H, W) images,
it returns {"pool": (B, 128), "logits": (B, 10)}.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.images import to_uint8
from ..data.mnist import load_mnist_digits
from .fidelity import feature_statistics, frechet_distance, read_npz_images


class DigitClassifier(nn.Module):
    cache_key = None  # features depend on the trained weights: never cache reference statistics

    def __init__(self, num_classes: int = 10, feature_dim: int = 128):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc = nn.Linear(128 * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, 32, 32) float in [0, 1] -> (B, feature_dim)."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 32, 16, 16)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 64, 8, 8)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # (B, 128, 4, 4)
        return F.relu(self.fc(x.flatten(1)))  # (B, feature_dim)

    def forward(self, images: torch.Tensor) -> dict:
        """uint8 (B, 3, H, W) or (B, H, W) images -> {"pool", "logits"} (the metrics protocol)."""
        x = images.float() / 255.0
        if x.ndim == 4:
            x = x.mean(dim=1, keepdim=True)  # grey digits stored as RGB
        else:
            x = x[:, None]
        feats = self.features(x)
        return {"pool": feats, "logits": self.head(feats)}


def _as_tensor(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(images))
    return x.permute(0, 3, 1, 2) if x.ndim == 4 and x.shape[-1] == 3 else x


def train_classifier(images: np.ndarray, labels: np.ndarray, epochs: int = 3, batch_size: int = 128,
                     lr: float = 2e-3, seed: int = 0, progress: bool = True) -> DigitClassifier:
    """Train on uint8 digits (N, H, W[, 3]) with labels (N,); small random shifts as augmentation."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    x, y = _as_tensor(images), torch.as_tensor(labels).long()
    steps = epochs * (-(-len(x) // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    bar = tqdm(total=steps, desc="digit classifier", unit="step", disable=not progress, leave=False)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), batch_size):
            idx = perm[s:s + batch_size]
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            batch = torch.roll(x[idx], shifts=(dx, dy), dims=(-2, -1))
            loss = F.cross_entropy(model(batch)["logits"], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    return model.eval()


@torch.inference_mode()
def predict_digits(model: DigitClassifier, images: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels (N,), features (N, 128)) of uint8 digits."""
    x = _as_tensor(images)
    preds, feats = [], []
    for s in range(0, len(x), batch_size):
        out = model(x[s:s + batch_size])
        preds.append(out["logits"].argmax(-1))
        feats.append(out["pool"].double())
    return torch.cat(preds).numpy(), torch.cat(feats).numpy()


def train_digit_classifier(data: dict, quick: bool = False, progress: bool = True) -> DigitClassifier:
    """The demo's classifier: trained on the train split only (2 epochs with `quick`, else 4)."""
    return train_classifier(data["train_images"], data["train_labels"], epochs=2 if quick else 4, progress=progress)


def evaluate_digit_samples(data: dict, samples: np.ndarray, sample_labels: np.ndarray, quick: bool, progress: bool,
                           classifier: DigitClassifier | None = None) -> dict:
    """Class accuracy and FD of conditional digit samples (the classifier trained here unless given)."""
    clf = classifier or train_digit_classifier(data, quick, progress)
    held_pred, held_feat = predict_digits(clf, data["test_images"])
    sample_pred, sample_feat = predict_digits(clf, samples)
    _, train_feat = predict_digits(clf, data["train_images"])

    def fd(a, b):
        return frechet_distance(*feature_statistics(a), *feature_statistics(b))

    return {
        "classifier_heldout_accuracy": float((held_pred == data["test_labels"]).mean()),
        "sample_class_accuracy": float((sample_pred == sample_labels).mean()),
        "fd_mnist_classifier_features": fd(sample_feat, held_feat),
        "fd_floor_heldout_vs_train": fd(held_feat, train_feat),
        "num_samples": int(len(samples)), "num_heldout": int(len(held_feat)),
    }


def evaluate_digits_npz(npz_path, quick: bool = False, progress: bool = True) -> dict:
    """The demo's evaluation of any ADM-layout npz of 32x32 digits with labels (`rar evaluate --digits`)."""
    read_npz_images(npz_path)  # layout check with a clear error
    with np.load(npz_path) as z:
        if "arr_1" not in z:
            raise ValueError(f"{npz_path} has no arr_1 labels; the digit evaluation needs the class of every sample.")
        images, labels = z["arr_0"], z["arr_1"]
    if images.shape[1:3] != (32, 32):
        raise ValueError(f"{npz_path} holds {images.shape[1]}x{images.shape[2]} images; the digit evaluation expects "
                         "32x32 (the demo's digits: 28x28 MNIST with a 2-pixel border).")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) or \
            (len(labels) and (labels.min() < 0 or labels.max() > 9)):
        raise ValueError(f"{npz_path}'s arr_1 must hold one digit class in 0..9 per image ({len(images)} integers), "
                         f"got shape {labels.shape}, dtype {labels.dtype}"
                         + (f", values {labels.min()}..{labels.max()}." if labels.size and
                            np.issubdtype(labels.dtype, np.number) else "."))
    return evaluate_digit_samples(load_mnist_digits(seed=0, n_train=4500), images, labels, quick, progress)


DECODE_CHUNK = 500  # images per tokenizer call


@torch.inference_mode()
def decode_uint8(tokenizer, tokens: torch.Tensor) -> np.ndarray:
    """tokens (N, T) -> uint8 images (N, H, W, 3), in chunks of `DECODE_CHUNK` images."""
    return np.concatenate([to_uint8(tokenizer.decode(tokens[s:s + DECODE_CHUNK]).float())
                           for s in range(0, len(tokens), DECODE_CHUNK)])


def score(classifier: DigitClassifier, images: np.ndarray, labels: np.ndarray, heldout_features: np.ndarray) -> dict:
    """Class accuracy and FD (in the classifier's features, against `heldout_features`) of digit images."""
    pred, feat = predict_digits(classifier, images)
    return {"accuracy": float((pred == labels).mean()),
            "fd": float(frechet_distance(*feature_statistics(feat), *feature_statistics(heldout_features)))}
