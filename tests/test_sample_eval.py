"""ADM-format evaluation sampling: byte-identical whatever the sharding and interruptions."""
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from rar import RAR
from rar.model.weights import save_generator
from rar.apps.sample_npz import assemble_npz, sample_eval
from rar.tokenizer.vqgan import VQGAN, VQGANConfig, load_any_tokenizer, save_tokenizer

ROOT = Path(__file__).resolve().parents[1]
KW = dict(num_classes=3, num_per_class=4, seed=5, batch_size=3, chunk_size=2, progress=False)


def make_models(tmp_path):
    torch.manual_seed(0)
    gen = RAR.from_preset("tiny", hidden_size=32, num_layers=2, num_heads=2, mlp_size=64).eval()
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_generator(gen, tmp_path / "gen")
    save_tokenizer(VQGAN(VQGANConfig.preset("digits_f4_32")).eval(), tmp_path / "tok")
    return gen, load_any_tokenizer(tmp_path / "tok")


def test_sharded_killed_and_resumed_equals_one_process(tmp_path):
    gen, tok = make_models(tmp_path)
    one = tmp_path / "one.npz"
    res = sample_eval(gen, tok, one, **KW)
    assert res["chunks_done"] == 6
    assemble_npz(one, 12, 2)
    with np.load(one) as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (12, 32, 32, 3)
        assert z["arr_1"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert not Path(f"{one}.chunks").exists()

    two = tmp_path / "two.npz"
    rank1 = f"""
        import os, signal, torch
        from rar.model.weights import load_generator
        from rar.apps.sample_npz import sample_eval
        from rar.tokenizer.vqgan import load_any_tokenizer
        def die(chunk):
            if DO_DIE:
                os.kill(os.getpid(), signal.SIGKILL)
        sample_eval(load_generator('{tmp_path / "gen"}'), load_any_tokenizer('{tmp_path / "tok"}'), '{two}',
                    rank=1, world_size=2, on_chunk=die, **{KW!r})
    """
    run = lambda code: subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                                      text=True, timeout=300)
    killed = run(rank1.replace("DO_DIE", "True"))
    assert killed.returncode == -9
    assert sorted(p.name for p in Path(f"{two}.chunks").iterdir()) == ["chunk-000001.npz"]
    res0 = sample_eval(gen, tok, two, rank=0, world_size=2, **KW)
    assert res0["chunks_done"] == 3
    again = run(rank1.replace("DO_DIE", "False"))
    assert again.returncode == 0, again.stderr
    assemble_npz(two, 12, 2)
    assert two.read_bytes() == one.read_bytes()


def test_cli_writes_the_same_file_and_skips_when_done(tmp_path):
    gen, tok = make_models(tmp_path)
    ref = tmp_path / "ref.npz"
    sample_eval(gen, tok, ref, **KW)
    assemble_npz(ref, 12, 2)
    out = tmp_path / "cli.npz"
    cmd = [sys.executable, "-m", "rar", "sample-eval", "--generator", str(tmp_path / "gen"), "--tokenizer",
           str(tmp_path / "tok"), "--out", str(out), "--num-classes", "3", "--num-per-class", "4", "--seed", "5",
           "--batch-size", "4", "--chunk-size", "2"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert out.read_bytes() == ref.read_bytes()  # batch size 4 vs 3: same samples
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "this run sampled 0 images" in second.stdout


def test_refinement_is_recorded_and_a_different_setting_is_refused(tmp_path):
    import pytest

    from rar.apps.sample_npz import read_settings
    from rar.inference.refinement import RefineSettings

    gen, tok = make_models(tmp_path)
    kw = {**KW, "num_classes": 1, "num_per_class": 2}
    plain, refined = tmp_path / "plain.npz", tmp_path / "refined.npz"
    sample_eval(gen, tok, plain, **kw)
    sample_eval(gen, tok, refined, refine=RefineSettings(1, 0.25, "random"), **kw)
    chunk = sorted(Path(f"{refined}.chunks").glob("chunk-*.npz"))[0]
    assert read_settings(chunk)["refine"] == {"rounds": 1, "fraction": 0.25, "select": "random", "groups": 2}
    assert "refine" not in read_settings(sorted(Path(f"{plain}.chunks").glob("chunk-*.npz"))[0])
    with np.load(chunk) as a, np.load(sorted(Path(f"{plain}.chunks").glob("chunk-*.npz"))[0]) as b:
        assert not np.array_equal(a["arr_0"], b["arr_0"])
    with pytest.raises(ValueError, match="refine"):
        sample_eval(gen, tok, refined, refine=RefineSettings(2, 0.25, "random"), **kw)
