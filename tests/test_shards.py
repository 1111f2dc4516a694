"""Token shards: determinism, resumability, corrupt files, multi-rank union, reader."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rar.data.images import center_crop_adm
from rar.data.images import list_image_folder
from rar.data.shards import TokenShards
from rar.core.devices import rank_and_world_size
from rar.tokenizer.shard_writer import tokenize_dataset, tokenize_folder
from rar.tokenizer.vqgan import VQGANConfig, load_official_tokenizer, save_tokenizer

@pytest.fixture(scope="module")
def tok(vqgan_reference):
    return load_official_tokenizer(vqgan_reference["state_dict"], VQGANConfig.preset("digits_f4_32"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for cls, n in (("cats", 3), ("dogs", 3)):
        (root / cls).mkdir()
        for i in range(n):
            arr = rng.integers(0, 256, (40 + 4 * i, 48, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    (root / "dogs" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")  # corrupt
    (root / "dogs" / "notes.txt").write_text("ignored: not an image extension")
    return root


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _run(tok, folder, out, **kw):
    return tokenize_folder(tok, folder, out, batch_size=2, shard_size=2, num_workers=2, progress=False,
                           verbose=False, **kw)


def test_folder_twice_identical_corrupt_reported_and_resumed(tok, folder, tmp_path):
    r1 = _run(tok, folder, tmp_path / "a")
    bad = str(folder / "dogs" / "1.png")
    assert r1.did_work and r1.manifest == "written"
    assert [p for p, _ in r1.failed] == [bad] and r1.images == 5
    assert bad in r1.summary()
    first = _files(tmp_path / "a")
    assert sorted(first) == sorted(
        [f"{k}-{s:05d}-of-00003.{e}" for s in range(3) for k, e in (("tokens", "npy"), ("labels", "npy"),
                                                                      ("shard", "json"))] + ["manifest.json"])
    r2 = _run(tok, folder, tmp_path / "a")  # re-run into the same folder: nothing to do
    assert not r2.did_work and r2.images == 0 and r2.shards_skipped == [0, 1, 2] and r2.manifest == "unchanged"
    assert "nothing to do" in r2.summary()
    assert _files(tmp_path / "a") == first
    _run(tok, folder, tmp_path / "b")  # from scratch elsewhere: byte-identical output
    assert _files(tmp_path / "b") == first
    manifest = json.loads(first["manifest.json"])
    assert manifest["num_images"] == 5 and manifest["num_failed"] == 1 and manifest["failed"][0][0] == bad
    assert manifest["class_names"] == ["cats", "dogs"] and manifest["views_per_image"] == 2
    assert manifest["grid"] == [8, 8] and manifest["tokens_per_image"] == 64 and manifest["codebook_size"] == 64


def test_two_ranks_union_equals_single_rank(tok, folder, tmp_path):
    _run(tok, folder, tmp_path / "one")
    r0 = _run(tok, folder, tmp_path / "two", rank=0, world_size=2)
    assert r0.shards_written == [0, 2] and r0.manifest == "waiting"
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        TokenShards(tmp_path / "two")
    r1 = _run(tok, folder, tmp_path / "two", rank=1, world_size=2)
    assert r1.shards_written == [1] and r1.manifest == "written"
    assert _files(tmp_path / "two") == _files(tmp_path / "one")


def test_reader_matches_direct_encoding(tok, folder, tmp_path):
    _run(tok, folder, tmp_path / "a")
    shards = TokenShards(tmp_path / "a")
    assert len(shards) == 5 and shards.views == 2 and shards.grid == (8, 8)
    assert shards.class_names == ["cats", "dogs"] and shards.labels.tolist() == [0, 0, 0, 1, 1]
    assert shards.tokens.shape == (5, 2, 64) and shards.tokens.dtype == np.uint16
    batch = shards.tokens[np.array([4, 0, 3])]  # fancy indexing across shards
    assert batch.shape == (3, 2, 64)
    paths, _, _ = list_image_folder(folder)
    good = [p for p in paths if p.name != "1.png" or p.parent.name != "dogs"]
    img = np.asarray(center_crop_adm(Image.open(good[4]).convert("RGB"), 32))
    x = torch.from_numpy(np.stack([img, img[:, ::-1].copy()])).permute(0, 3, 1, 2).float() / 255.0
    assert np.array_equal(batch[0], tok.encode(x).numpy())
    tokens, label = shards[3]
    assert tokens.shape == (2, 64) and label == 1


def test_array_dataset_and_settings_mismatch(tok, tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 32, 32), dtype=np.uint8)  # grayscale digits-like
    labels = np.array([0, 1, 2, 1, 0])
    rep = tokenize_dataset(tok, images, labels, tmp_path / "d", flip=False, shard_size=4, progress=False,
                           verbose=False)
    assert rep.images == 5 and not rep.failed
    shards = TokenShards(tmp_path / "d")
    assert shards.views == 1 and shards.class_names == ["0", "1", "2"]
    x = torch.from_numpy(np.repeat(images[:, None], 3, axis=1)).float() / 255.0
    assert np.array_equal(np.asarray(shards.tokens)[:, 0], tok.encode(x).numpy())
    with pytest.raises(ValueError, match="different settings"):
        tokenize_dataset(tok, images, labels, tmp_path / "d", flip=True, shard_size=4, progress=False, verbose=False)
    save_tokenizer(tok, tmp_path / "tok")  # by path: the manifest records where the tokenizer is
    tokenize_dataset(str(tmp_path / "tok"), images, labels, tmp_path / "p", flip=False, progress=False, verbose=False)
    assert TokenShards(tmp_path / "p").manifest["tokenizer_path"] == str((tmp_path / "tok").resolve())
    assert np.array_equal(np.asarray(TokenShards(tmp_path / "p").tokens), np.asarray(shards.tokens))
    with pytest.raises(ValueError, match="labels must have shape"):
        tokenize_dataset(tok, images, labels[:3], tmp_path / "e", progress=False, verbose=False)


def test_rank_env_helper():
    assert rank_and_world_size({"RANK": "3", "WORLD_SIZE": "8"}) == (3, 8)
    assert rank_and_world_size({}) == (0, 1)
    with pytest.raises(ValueError, match="rank must satisfy"):
        tokenize_dataset(None, np.zeros((1, 32, 32), np.uint8), [0], "unused", rank=2, world_size=2)


def test_ten_crop_views(tok, folder, tmp_path):
    from rar.data.images import ten_crop

    rep = _run(tok, folder, tmp_path / "t", ten_crop=True)
    shards = TokenShards(tmp_path / "t")
    assert rep.images == 5 and shards.views == 10 and shards.tokens.shape == (5, 10, 64)
    assert shards.manifest["view_names"][4] == "center" and shards.manifest["view_names"][9] == "flip_center"
    first = list_image_folder(folder)[0][0]
    big = np.asarray(center_crop_adm(Image.open(first).convert("RGB"), 35))  # int(1.1 * 32)
    x = torch.from_numpy(np.stack(ten_crop(big, 32))).permute(0, 3, 1, 2).float() / 255.0
    assert np.array_equal(shards.tokens[0], tok.encode(x).numpy())
