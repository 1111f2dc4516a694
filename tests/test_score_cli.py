"""`rar score` and `rar sample --refine-*` end to end on tiny models."""
import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save_tiny_pair
from rar.apps.cli import main
from rar.tokenizer.shard_writer import tokenize_dataset
from rar.inference.likelihood import classify, log_likelihood
from rar.model.weights import load_generator


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("score")
    save_tiny_pair(d / "gen", d / "tok", perturb=0.05)  # adaLN-zero would make every class equally likely
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        (d / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / "imgs" / f"c{i % 2}" / f"{i}.png")
    tokenize_dataset(str(d / "tok"), images, np.arange(6) % 2, d / "shards", flip=False, progress=False, verbose=False)
    return d


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_score_shards_matches_the_library(files, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    assert main(["score", "--generator", str(files / "gen"), "--data", str(files / "shards"), "--out", str(out),
                 "--orders", "random", "--num-orders", "3"]) == 0
    rows = _rows(out)
    assert len(rows) == 6 and [int(r["label"]) for r in rows] == [0, 1, 0, 1, 0, 1]
    from rar.data.shards import TokenShards
    shards = TokenShards(files / "shards")
    tokens = torch.from_numpy(np.stack([np.asarray(shards[i][0]).reshape(-1)[:64] for i in range(6)])).long()
    model = load_generator(files / "gen")
    nll = log_likelihood(model, tokens, torch.tensor(shards.labels), orders="random", num_orders=3, seed=0)
    assert [float(r["nll_bits_per_token"]) for r in rows] == pytest.approx((nll / math.log(2)).tolist(), abs=1e-4)
    post = classify(model, tokens, orders="random", num_orders=3, seed=0)
    assert [int(r["predicted_class"]) for r in rows] == post.argmax(1).tolist()
    assert float(rows[0]["label_probability"]) == pytest.approx(float(post[0, 0]), abs=1e-4)
    assert "6 images scored" in capsys.readouterr().out


def test_score_image_folder_and_errors(files, tmp_path, capsys):
    out = tmp_path / "s.csv"
    assert main(["score", "--generator", str(files / "gen"), "--tokenizer", str(files / "tok"),
                 "--data", str(files / "imgs"), "--out", str(out), "--no-classify"]) == 0
    rows = _rows(out)
    assert [r["image"] for r in rows] == ["c0/0.png", "c0/2.png", "c0/4.png", "c1/1.png", "c1/3.png", "c1/5.png"]
    assert "predicted_class" not in rows[0] and all(float(r["nll_bits_per_token"]) > 0 for r in rows)
    rc = main(["score", "--generator", str(files / "gen"), "--data", str(files / "imgs"), "--out", str(tmp_path / "x.csv")])
    assert rc == 2 and "pass --tokenizer" in capsys.readouterr().err
    rc = main(["score", "--generator", str(files / "gen"), "--data", str(files / "shards"), "--orders", "diagonal",
               "--out", str(tmp_path / "y.csv")])
    assert rc == 2 and "unknown order 'diagonal'" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "y.csv").exists()


def test_sample_with_refinement_is_reproducible_and_differs(files, tmp_path, capsys):
    base = ["sample", "--generator", str(files / "gen"), "--classes", "1,2", "--num-per-class", "3", "--seed", "2"]
    main([*base, "--out", str(tmp_path / "plain")])
    main([*base, "--refine-rounds", "2", "--refine-fraction", "0.25", "--out", str(tmp_path / "a"), "--batch-size", "6"])
    main([*base, "--refine-rounds", "2", "--refine-fraction", "0.25", "--out", str(tmp_path / "b"), "--batch-size", "2"])
    plain, a, b = (np.load(tmp_path / n / "tokens.npy") for n in ("plain", "a", "b"))
    assert np.array_equal(a, b) and not np.array_equal(a, plain)
    assert ((a != plain).sum(1) <= 2 * 16).all()  # at most 2 rounds x 16 of 64 tokens changed
    rc = main([*base, "--refine-rounds", "1", "--refine-fraction", "2", "--out", str(tmp_path / "c")])
    assert rc == 2 and "refine fraction must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
