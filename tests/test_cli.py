"""The `rar` command end to end on tiny models: sample, errors, info."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rar.apps.cli import main

from conftest import save_tiny_pair

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    save_tiny_pair(d / "gen", d / "tok", [f"digit_{i}" for i in range(10)])
    return d


def test_sample_writes_grid_images_and_tokens(tiny_files, tmp_path, capsys):
    out = tmp_path / "s"
    rc = main(["sample", "--generator", str(tiny_files / "gen"), "--tokenizer", str(tiny_files / "tok"),
               "--classes", "1,digit_7", "--num-per-class", "3", "--seed", "4", "--batch-size", "4",
               "--guidance-scale", "2.0", "--out", str(out)])
    assert rc == 0
    tokens = np.load(out / "tokens.npy")
    assert tokens.shape == (6, 64) and tokens.max() < 64
    assert np.load(out / "labels.npy").tolist() == [1, 1, 1, 7, 7, 7]
    assert len(list((out / "images").glob("*.png"))) == 6
    grid = Image.open(out / "grid.png")
    assert grid.size == (3 * 34 + 2, 2 * 34 + 2)  # 3 per row, one row per class, 2 px padding
    # same seed, different batch size: same tokens
    main(["sample", "--generator", str(tiny_files / "gen"), "--classes", "1,7", "--num-per-class", "3",
          "--seed", "4", "--batch-size", "1", "--guidance-scale", "2.0", "--out", str(tmp_path / "t")])
    assert np.array_equal(np.load(tmp_path / "t" / "tokens.npy"), tokens)


@pytest.mark.parametrize("args,message", [
    (["--classes", "10"], "class id 10 is outside [0, 10)"),
    (["--classes", "zebra"], "class 'zebra' is neither a class id nor a known class name"),
    (["--preset", "rar_b"], "does not match the given config"),
])
def test_sample_errors_are_one_clear_line(tiny_files, tmp_path, capsys, args, message):
    rc = main(["sample", "--generator", str(tiny_files / "gen"), "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1


def test_missing_generator_file_is_named(tmp_path, capsys):
    rc = main(["sample", "--generator", str(tmp_path / "rar_b.bin"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "rar_b.bin" in err and "does not exist" in err


def test_info_lists_presets_with_official_parameter_counts():
    out = subprocess.run([sys.executable, "-m", "rar", "info"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "260,923,648" in out and "1,498,520,704" in out and "g=6.9 p=1.5 T=1.02" in out


def test_class_names_file_with_synonyms(tiny_files, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(["tench, Tinca tinca", "goldfish"] + [f"c{i}" for i in range(2, 10)]) + "\n")
    rc = main(["sample", "--generator", str(tiny_files / "gen"), "--class-names", str(names), "--classes",
               "Tinca tinca,goldfish,c9", "--num-per-class", "1", "--out", str(tmp_path / "o")])
    assert rc == 0 and np.load(tmp_path / "o" / "labels.npy").tolist() == [0, 1, 9]


def test_evaluate_argument_errors(tmp_path, capsys):
    npz = tmp_path / "s.npz"
    np.savez(npz, arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    assert main(["evaluate", str(npz), "--digits"]) == 2
    assert "has no arr_1 labels" in capsys.readouterr().err
    assert main(["evaluate", str(npz)]) == 2
    assert "--ref is required" in capsys.readouterr().err
