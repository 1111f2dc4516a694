"""`rar inpaint` / `rar outpaint` end to end on tiny models: output files and sizes, kept pixels,
reproducibility, and one clear error (nothing written) for each bad input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save_tiny_pair
from rar.apps.cli import main
from rar.data.images import center_crop_mask
from rar.inference.image_editing import feather, token_mask, window_plan


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("edit")
    save_tiny_pair(d / "gen", d / "tok", [f"digit_{i}" for i in range(10)])
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(d / "img.png")  # 40 wide, 48 high
    mask = np.zeros((48, 40), np.uint8)
    mask[:24] = 255  # the top half
    Image.fromarray(mask).save(d / "mask.png")
    Image.fromarray(mask[:40]).save(d / "small_mask.png")
    return d


def _common(files, out, *extra):
    return ["--generator", str(files / "gen"), "--tokenizer", str(files / "tok"), "--out", str(out),
            "--seed", "3", "--num", "3", *extra]


def test_inpaint_writes_results_grid_and_keeps_known_pixels(files, tmp_path, capsys):
    out = tmp_path / "inp"
    assert main(["inpaint", str(files / "img.png"), "--mask", str(files / "mask.png"), "--class", "digit_7",
                 *_common(files, out)]) == 0
    results = sorted(out.glob("result_*.png"))
    assert len(results) == 3 and all(Image.open(p).size == (32, 32) for p in results)
    assert Image.open(out / "grid.png").size == (5 * 34 + 2, 34 + 2)  # original | masked | 3 results
    meta = json.loads((out / "edit.json").read_text())
    assert meta["class"] == 7 and meta["regenerated_tokens"] == 32  # the top 4 of 8 token rows
    from rar.data.images import center_crop_adm, load_rgb
    original = np.asarray(center_crop_adm(load_rgb(files / "img.png"), 32)).astype(int)
    got = np.asarray(Image.open(results[0])).astype(int)
    crop_mask = np.asarray(center_crop_mask(Image.open(files / "mask.png").convert("L"), 32)) > 127
    far = np.zeros_like(crop_mask)
    far[24:] = True  # beyond the feather (2 px radius at 32 px: 1 px, ramp 2 px) below the mask
    assert crop_mask[:16].all() and not crop_mask[16:].any()
    assert np.abs(got[far] - original[far]).max() <= 1  # pasted back
    raw = np.asarray(Image.open(out / "raw" / results[0].name)).astype(int)
    assert np.abs(raw[far] - original[far]).max() > 1  # the decode alone differs there
    again = tmp_path / "again"
    main(["inpaint", str(files / "img.png"), "--mask", str(files / "mask.png"), "--class", "7",
          *_common(files, again)])
    assert np.array_equal(np.asarray(Image.open(again / results[0].name)), got)


@pytest.mark.parametrize("extend,size", [(["right:4"], (48, 32)), (["left:3", "down:2"], (44, 40)),
                                         (["up:9"], (32, 68))])
def test_outpaint_grows_the_canvas(files, tmp_path, extend, size):
    out = tmp_path / "out"
    flags = [x for e in extend for x in ("--extend", e)]
    assert main(["outpaint", str(files / "img.png"), *flags, "--class", "none", *_common(files, out)]) == 0
    results = sorted(out.glob("result_*.png"))
    assert len(results) == 3 and all(Image.open(p).size == size for p in results)
    assert Image.open(out / "grid.png").size == (4 * (size[0] + 2) + 2, size[1] + 4)


@pytest.mark.parametrize("cmd,args,message", [
    ("inpaint", ["--mask", "small_mask.png"], "is 40x40 but the image is 40x48"),
    ("inpaint", ["--mask", "nothing.png"], "does not exist"),
    ("inpaint", ["--mask", "mask.png", "--class", "12"], "class id 12 is outside [0, 10)"),
    ("inpaint", ["--mask", "mask.png", "--dilate", "-1"], "dilate must be a non-negative"),
    ("inpaint", ["--mask", "mask.png", "--num", "0"], "num must be a positive integer"),
    ("inpaint", ["--mask", "mask.png", "--temperature", "0"], "temperature must be positive"),
    ("inpaint", ["--mask", "mask.png", "--order", "sideways"], "unknown order 'sideways'"),
    ("outpaint", ["--extend", "right"], "must be SIDE:K"),
    ("outpaint", ["--extend", "north:2"], "must be SIDE:K"),
])
def test_bad_inputs_are_one_line_and_write_nothing(files, tmp_path, capsys, cmd, args, message):
    out = tmp_path / "never"
    args = [str(files / a) if a.endswith(".png") else a for a in args]
    rc = main([cmd, str(files / "img.png"), *_common(files, out), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_not_an_image_is_named(files, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    rc = main(["inpaint", str(bad), "--mask", str(files / "mask.png"), *_common(files, tmp_path / "o")])
    assert rc == 2 and "could not be read as an image" in capsys.readouterr().err


def test_token_mask_dilation_and_feather():
    m = torch.zeros(16, 16, dtype=torch.bool)
    m[5, 9] = True  # one pixel: its 4x4 token is masked
    t = token_mask(m, 4)
    assert t.sum() == 1 and t[1, 2]
    assert token_mask(m, 4, dilate=1).sum() == 9
    a = feather(m, 2)
    assert a[5, 9] == 1 and a[5, 14] == 0 and 0 < a[5, 12] < 1


def test_window_plan_covers_new_strips_with_context():
    assert window_plan(16, 36, "right", 20, 16) == [(0, 8), (0, 16), (0, 20)]
    assert window_plan(16, 36, "left", 20, 16) == [(0, 12), (0, 4), (0, 0)]
    assert window_plan(20, 20, "right", 4, 16) == [(0, 4), (4, 4)]


@pytest.mark.parametrize("steps", [None, 4])
def test_edits_of_several_requests_in_one_batch_equal_lone_edits(files, steps):
    """Several users' edits decoded as one batch (`rar app` under load): each request, with its
    own image, mask, class, count and seed, gets exactly the tokens and pixels of a lone call,
    for inpainting (kept-first and the raster baseline) and for outpainting."""
    from rar.inference import SamplingSettings
    from rar.inference.image_editing import EditJob, inpaint, inpaint_many, outpaint, outpaint_many
    from rar.model.weights import load_generator
    from rar.tokenizer.vqgan import load_any_tokenizer

    gen, vq = load_generator(files / "gen"), load_any_tokenizer(files / "tok").eval()
    res = vq.config.resolution
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, res, res, generator=g) for _ in range(3)]
    masks = [torch.zeros(res, res, dtype=torch.bool) for _ in range(3)]
    masks[0][: res // 2] = True
    masks[1][:, res // 4:] = True
    masks[2][res // 3:, : res // 2] = True
    jobs = [EditJob(images[0], masks[0], 3, 2, 5), EditJob(images[1], masks[1], None, 1, 6),
            EditJob(images[2], masks[2], 7, 3, 5)]
    settings = SamplingSettings(steps=steps)
    for kept_first in (True, False):
        together = inpaint_many(gen, vq, jobs, kept_first=kept_first, settings=settings)
        for job, got in zip(jobs, together):
            alone = inpaint(gen, vq, job.image, job.mask, job.label, num=job.num, seed=job.seed,
                            kept_first=kept_first, settings=settings)
            assert torch.equal(got["tokens"], alone["tokens"]) and torch.equal(got["images"], alone["images"])
    together = outpaint_many(gen, vq, jobs, "right:2,up:1", settings=settings)
    for job, got in zip(jobs, together):
        alone = outpaint(gen, vq, job.image, "right:2,up:1", job.label, num=job.num, seed=job.seed, settings=settings)
        assert torch.equal(got["tokens"], alone["tokens"]) and torch.equal(got["images"], alone["images"])
    assert not torch.equal(together[0]["tokens"][0], together[2]["tokens"][0])  # same seed, other image and class
    with pytest.raises(ValueError, match="jobs is empty"):
        inpaint_many(gen, vq, [])
    with pytest.raises(ValueError, match=r"mask must be \(32, 32\)"):
        inpaint_many(gen, vq, [jobs[0], EditJob(images[1], None, 1, 1, 0)])
