"""`rar demo --quick` end to end on the real MNIST digits, then a re-run that reuses every stage."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_quick_demo_outputs_and_reuse(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "rar", "demo", "--quick", "--out", str(out)]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    for name in ("samples.png", "samples.npz", "loss.png", "reconstructions.png", "metrics.json"):
        assert (out / name).is_file(), name
    with np.load(out / "samples.npz") as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (1000, 32, 32, 3)
    assert np.bincount(labels).tolist() == [100] * 10
    assert Image.open(out / "samples.png").size == (10 * 34 + 2, 10 * 34 + 2)  # 10 x 10, one row per digit
    m = json.loads((out / "metrics.json").read_text())
    assert m["classifier_heldout_accuracy"] > 0.9
    assert m["sample_class_accuracy"] > 0.6  # quick mode is less accurate; the full run is in BENCHMARKS.md
    assert m["fd_mnist_classifier_features"] > m["fd_floor_heldout_vs_train"] > 0
    assert "FD in MNIST-classifier features (not FID)" in first.stdout
    par = m["parallel"]  # the same samples decoded in T/4 network passes
    assert par["steps"] == 16 and par["order"] == "random" and par["sample_class_accuracy"] > 0.5
    assert par["fd_ratio_to_sequential"] == pytest.approx(par["fd_mnist_classifier_features"]
                                                          / m["fd_mnist_classifier_features"])
    assert "parallel decoding (16 network passes" in first.stdout
    # editing: 10 digits x (original, masked, raster baseline, kept-first, class-edited)
    assert Image.open(out / "editing.png").size == (10 * 34 + 2, 5 * 34 + 2)
    e = m["editing"]
    assert e["num_digits"] == 100 and len(e["tasks"]) == 6 * 2 * 2
    assert all(0 <= v["accuracy"] <= 1 and v["fd"] > 0 for v in e["tasks"].values())
    assert e["reference"]["reconstruction_accuracy"] > 0.8
    assert e["tasks"]["outpaint_right/kept_first/conditional"]["accuracy"] > 0.5  # three quarters of the digit known
    assert "editing (100 held-out digits" in first.stdout

    finished = [out / "tokenizer" / "tokenizer" / "model.safetensors", *(out / "rar" / "checkpoints").iterdir(),
                out / "tokens" / "manifest.json", out / "rar" / "metrics.jsonl"]
    stamps = [p.stat().st_mtime_ns for p in finished]
    npz_bytes = (out / "samples.npz").read_bytes()
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert [p.stat().st_mtime_ns for p in finished] == stamps  # tokenizer, tokens and RAR reused, not redone
    assert (out / "samples.npz").read_bytes() == npz_bytes


def test_demo_interrupted_before_its_first_checkpoint_reruns(tmp_path, monkeypatch, capsys):
    """Ctrl-C early in the demo's RAR stage leaves a metrics log and no checkpoint: the re-run (which
    takes no start_over) trains from step 0 and keeps the old log aside, instead of an error."""
    import json as _json

    import torch

    from rar.apps import demo
    from rar.tokenizer.vqgan import VQGAN, VQGANConfig, save_tokenizer

    out = tmp_path / "demo"
    save_tokenizer(VQGAN(VQGANConfig.preset("digits_f4_32")).eval(), out / "tokenizer" / "tokenizer")
    tokens = out / "tokens"
    tokens.mkdir(parents=True)
    np.save(tokens / "tokens-00000-of-00001.npy", (np.arange(64 * 64).reshape(64, 1, 64) % 64).astype(np.uint16))
    np.save(tokens / "labels-00000-of-00001.npy", np.arange(64) % 10)
    (tokens / "manifest.json").write_text(_json.dumps({
        "format": "rar-token-shards", "codebook_size": 64, "grid": [8, 8], "tokens_per_image": 64,
        "views_per_image": 1, "num_images": 64, "num_classes": 10, "class_names": [str(i) for i in range(10)],
        "shards": [{"tokens": "tokens-00000-of-00001.npy", "labels": "labels-00000-of-00001.npy", "count": 64}]}))
    monkeypatch.setattr(demo, "QUICK_RAR", ["max_steps=4", "save_every=2", "batch_size=8", "sample_every=0"])
    (out / "rar").mkdir()
    (out / "rar" / "metrics.jsonl").write_text('{"step": 1, "loss": 4.2}\n')  # logged, then Ctrl-C: no checkpoint
    summary = demo.train_generator_stage(out, quick=True, progress=False)
    assert summary["steps"] == 4 and torch.isfinite(torch.tensor(summary["final_loss"]))
    assert [_json.loads(x)["step"] for x in (out / "rar" / "metrics.jsonl").read_text().splitlines()] == [4]  # log_every 20: the last step
    assert (out / "rar" / "metrics-before-start-over.jsonl").read_text() == '{"step": 1, "loss": 4.2}\n'
