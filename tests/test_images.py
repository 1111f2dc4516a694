import numpy as np
import pytest
import torch
from PIL import Image

from rar.data.images import center_crop_adm, make_grid, psnr, save_grid, save_images, ten_crop, to_uint8


def test_center_crop_adm_sizes_and_centering():
    # 600x400 (W x H): box-halved twice to 150x100, bicubic to 96x64, center crop 64x64
    arr = np.zeros((400, 600, 3), np.uint8)
    arr[:, :300] = (255, 0, 0)  # left half red, right half blue
    arr[:, 300:] = (0, 0, 255)
    out = np.asarray(center_crop_adm(Image.fromarray(arr), 64))
    assert out.shape == (64, 64, 3)
    assert (out[:, :28, 0] > 250).all() and (out[:, 36:, 2] > 250).all()  # boundary stays in the middle
    same = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(center_crop_adm(Image.fromarray(same), 32)), same)
    tall = center_crop_adm(Image.new("RGB", (50, 90), (10, 20, 30)), 40)
    assert tall.size == (40, 40) and np.all(np.asarray(tall) == (10, 20, 30))


def test_ten_crop_layout():
    img = np.arange(12 * 14 * 1, dtype=np.int64).reshape(12, 14, 1)
    crops = ten_crop(img, 10)
    assert len(crops) == 10 and all(c.shape == (10, 10, 1) for c in crops)
    assert np.array_equal(crops[0], img[:10, :10]) and np.array_equal(crops[3], img[2:, 4:])
    assert np.array_equal(crops[4], img[1:11, 2:12])
    assert np.array_equal(crops[5], img[:, ::-1][:10, :10])  # first crop of the mirrored image
    with pytest.raises(ValueError, match="at least 20x20"):
        ten_crop(img, 20)


def test_to_uint8_truncates_like_upstream():
    x = torch.tensor([0.0, 0.5, 1.0, 1.2, -0.1, 0.999]).view(1, 1, 2, 3).expand(1, 3, 2, 3)
    out = to_uint8(x)
    assert out.shape == (1, 2, 3, 3) and out.dtype == np.uint8
    assert out[0, :, :, 0].ravel().tolist() == [0, 127, 255, 255, 0, 254]
    assert to_uint8(x, rounding=True)[0, :, :, 0].ravel().tolist() == [0, 128, 255, 255, 0, 255]


def test_make_grid_layout_and_save(tmp_path):
    imgs = np.stack([np.full((4, 5, 3), v, np.uint8) for v in (10, 20, 30)])
    grid = make_grid(imgs, nrow=2, padding=1)
    assert grid.shape == (11, 13, 3)
    assert grid[1, 1, 0] == 10 and grid[1, 7, 0] == 20 and grid[6, 1, 0] == 30
    assert grid[0, 0, 0] == 0 and grid[6, 7, 0] == 0  # border and the empty 4th cell
    path = save_grid(imgs, tmp_path / "sub" / "g.png", nrow=2, padding=1)
    assert np.array_equal(np.asarray(Image.open(path)), grid)
    paths = save_images(imgs[:, :, :, 0], tmp_path / "imgs", ["a", "b.png", "c"])
    assert [p.name for p in paths] == ["a.png", "b.png", "c.png"]
    assert np.array_equal(np.asarray(Image.open(paths[1])), imgs[1])


def test_psnr():
    a = torch.zeros(2, 3, 4, 4)
    assert psnr(a, a) == pytest.approx(100.0)
    assert psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-4)


def test_folder_walk_follows_links_but_never_loops_or_counts_a_file_twice(tmp_path):
    """A symlink loop inside a class, two links to one folder, a link to one file: each image once."""
    import os

    import numpy as np
    from PIL import Image

    from rar.data.images import list_image_folder

    cls = tmp_path / "data" / "cat"
    (cls / "sub").mkdir(parents=True)
    for i, where in enumerate([cls, cls / "sub"]):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(where / f"img{i}.png")
    os.symlink(cls, cls / "sub" / "loop")  # a loop back to the class folder
    os.symlink(cls / "sub", cls / "again")  # a second way into sub
    os.symlink(cls / "img0.png", cls / "sub" / "copy.png")  # a second name for one file
    elsewhere = tmp_path / "more"
    elsewhere.mkdir()
    Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(elsewhere / "img9.png")
    os.symlink(elsewhere, cls / "linked")  # a linked folder of other images: followed
    paths, labels, classes = list_image_folder(tmp_path / "data")
    assert classes == ["cat"] and labels.tolist() == [0, 0, 0]
    assert sorted(os.path.realpath(p) for p in paths) == sorted(
        os.path.realpath(p) for p in (cls / "img0.png", cls / "sub" / "img1.png", elsewhere / "img9.png"))


def test_a_16_bit_or_rotated_image_reads_as_its_8_bit_upright_twin(tmp_path):
    import numpy as np
    from PIL import Image

    from rar.data.images import load_rgb

    grey = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1))  # (8, 16) a ramp
    Image.fromarray(grey, "L").save(tmp_path / "eight.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")  # the same picture, 16-bit
    Image.fromarray(grey.astype(np.float32) / 255, "F").save(tmp_path / "float.tiff")
    want = np.asarray(load_rgb(tmp_path / "eight.png"))
    for name in ("sixteen.png", "float.tiff"):
        img = Image.open(tmp_path / name)
        assert img.mode != "L"  # really another mode
        assert np.abs(np.asarray(load_rgb(tmp_path / name)).astype(int) - want).max() <= 1, name
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[0, 0] = 255  # a white corner pixel
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(tmp_path / "rotated.png", exif=exif)
    shown = np.asarray(load_rgb(tmp_path / "rotated.png"))
    assert shown.shape == (6, 4, 3) and shown[0, -1].tolist() == [255, 255, 255]  # upright, as a viewer shows it
