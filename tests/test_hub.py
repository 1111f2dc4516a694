"""Weights by name through a Hugging Face cache laid out as huggingface_hub lays it out, offline
(HF_HUB_OFFLINE=1): no download is ever attempted; save_pretrained / from_pretrained; class names."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rar
from rar import RAR, RARConfig
from rar.model.weights import to_official_state_dict
from rar.tokenizer.vqgan import VQGAN, VQGANConfig

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_file(cache: Path, repo: str, filename: str) -> Path:
    """Where huggingface_hub keeps `filename` of model repo `repo` (refs/main -> snapshots/<commit>)."""
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(COMMIT)
    path = base / "snapshots" / COMMIT / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf") / "hub"
    torch.manual_seed(0)
    gen = RAR(RARConfig(32, 1, 2, 64, num_tokens=256, codebook_size=32)).eval()  # 1000 classes, like RAR-B
    torch.save(to_official_state_dict(gen), _cache_file(cache, "yucornetto/RAR", "rar_b.bin"))
    vq = VQGAN(VQGANConfig(32, (1, 1, 1, 1, 1), 1, 8, 256, 32)).eval()  # f16: 16x16 tokens at 256 px, as the pair needs
    torch.save(vq.state_dict(), _cache_file(cache, "fun-research/TiTok", "maskgit-vqgan-imagenet-f16-256.bin"))
    return cache, gen, vq


def _offline_env(cache):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent)}


def test_names_resolve_from_the_cache_offline(hub_cache):
    cache, gen, vq = hub_cache
    from rar.apps.hub import from_pretrained
    model = from_pretrained("rar_b", cache_dir=cache, offline=True)
    assert isinstance(model, RAR) and model.config == gen.config
    torch.testing.assert_close(model.lm_head.weight, gen.lm_head.weight)
    tok = from_pretrained("maskgit-vqgan", cache_dir=cache, offline=True)
    assert isinstance(tok, VQGAN)
    with pytest.raises(FileNotFoundError, match="rar_l.bin of the Hugging Face repo yucornetto/RAR is not in the cache"):
        from_pretrained("rar_l", cache_dir=cache, offline=True)


def test_cli_takes_names_with_hf_hub_offline(hub_cache, tmp_path):
    cache, _, _ = hub_cache
    env = _offline_env(cache)
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "rar", "sample", "--generator", "rar_b", "--tokenizer", "maskgit-vqgan",
           "--classes", "golden retriever,volcano", "--num-per-class", "1", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert np.load(out / "labels.npy").tolist() == [207, 980]
    assert len(list((out / "images").glob("*.png"))) == 2
    cmd[cmd.index("rar_b")] = "rar_xl"
    missing = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "rar_xl.bin of the Hugging Face repo yucornetto/RAR" in missing.stderr
    assert missing.stderr.count("\n") == 1


def test_local_paths_win_and_never_touch_the_hub(tmp_path, monkeypatch):
    import rar.core.names as hub
    monkeypatch.setattr(hub, "_hub", lambda: (_ for _ in ()).throw(AssertionError("the hub was asked")))
    torch.manual_seed(0)
    model = RAR.from_preset("tiny", hidden_size=32, num_layers=1, num_heads=2, mlp_size=64).eval()
    folder = model.save_pretrained(tmp_path / "rar_b")  # a local folder that happens to carry a name
    monkeypatch.chdir(tmp_path)
    loaded = rar.from_pretrained("rar_b")
    assert isinstance(loaded, RAR) and loaded.config == model.config
    assert sorted(p.name for p in Path(folder).iterdir()) == ["config.json", "model.safetensors"]
    vq = VQGAN(VQGANConfig.preset("digits_f4_32")).eval()
    vq.save_pretrained(tmp_path / "tok")
    assert isinstance(rar.from_pretrained(tmp_path / "tok"), VQGAN)
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a known name"):
        rar.from_pretrained(tmp_path / "nothing")


def test_names_without_huggingface_hub_say_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"pip install 'rar\[hub\]'"):
        rar.from_pretrained("rar_b")


def test_imagenet_class_names_ship_with_the_package():
    from rar.apps.classes import imagenet_class_names, parse_classes
    names = imagenet_class_names()
    assert len(names) == 1000 and names[207] == "golden retriever" and names[0].startswith("tench")
    assert parse_classes("golden retriever,volcano,Tinca tinca,1", 1000, names) == [207, 980, 0, 1]
    with pytest.raises(ValueError, match="ambiguous"):
        parse_classes("crane", 1000, names)
