"""The TF-faithful InceptionV3: weight-file layout and loading, TF1 resize, outputs, and the metric pipeline.

A randomly initialised network is written in the layout of torch-fidelity's released weight file
(a plain state dict without BatchNorm counters) and read back through `load_inception`, the code
path the real weights take. Inception at 299x299 costs seconds per image on a CPU: few images here.
"""
import urllib.error

import numpy as np
import pytest
import torch

from rar.metrics import inception
from rar.metrics.inception import InceptionV3Features, load_inception, load_weights, resize_bilinear_tf1
from rar.metrics.fidelity import evaluate_npz, load_reference

N_IMAGES = 4  # the fewest that allow k = 3 nearest neighbours


def _images(seed: int, smooth: bool) -> np.ndarray:
    """(N, 32, 32, 3) uint8: noise, or smooth colour ramps."""
    rng = np.random.default_rng(seed)
    if not smooth:
        return rng.integers(0, 256, size=(N_IMAGES, 32, 32, 3), dtype=np.uint8)
    ramp = np.linspace(0, 1, 32)[None, :, None, None] * np.linspace(0, 1, 32)[None, None, :, None]
    return (ramp * rng.uniform(60, 255, size=(N_IMAGES, 1, 1, 3))).astype(np.uint8)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    torch.manual_seed(0)
    net = InceptionV3Features()
    # one train-mode pass sets every BatchNorm to its batch statistics, so that the random network's
    # features depend on the input instead of collapsing to a constant
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(_images(1, smooth=False)[:2]).permute(0, 3, 1, 2))
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("weights") / "random-inception.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def model(weights_file):
    return load_inception(weights_path=weights_file[0])


def test_key_layout_matches_the_released_weight_file(weights_file):
    _, state = weights_file
    # the converted TF graph: 94 conv+batchnorm layers (1 + 4 tensors each) and the 1008-way softmax layer
    assert len(state) == 94 * 5 + 2
    shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_1a_3x3.bn.running_var": (32,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6d.branch1x1.conv.weight": (192, 768, 1, 1),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key


def test_loaded_weights_equal_saved(model, weights_file):
    _, state = weights_file
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_strict_loading_names_the_key():
    net = InceptionV3Features()
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    bad = dict(state, **{"fc.weight": torch.zeros(1000, 2048)})
    with pytest.raises(ValueError, match=r"fc\.weight has shape \(1000, 2048\), expected \(1008, 2048\)"):
        load_weights(net, bad, "w.pth")
    missing = {k: v for k, v in state.items() if k != "Mixed_6d.branch1x1.bn.bias"}
    with pytest.raises(ValueError, match=r"Mixed_6d\.branch1x1\.bn\.bias"):
        load_weights(net, missing, "w.pth")
    with pytest.raises(ValueError, match="AuxLogits"):
        load_weights(net, dict(state, **{"AuxLogits.fc.weight": torch.zeros(1)}), "w.pth")


def test_missing_weights_offline_names_the_file(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as info:
        load_inception(hub_dir=tmp_path)
    message = str(info.value)
    assert inception.WEIGHTS_FILENAME in message and inception.WEIGHTS_URL in message
    assert str(tmp_path / "checkpoints") in message
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_inception(weights_path=tmp_path / "nowhere.pth")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError, match=inception.WEIGHTS_FILENAME):
        load_inception(hub_dir=tmp_path, download=True)


def test_weights_found_in_hub_cache(tmp_path, weights_file, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / inception.WEIGHTS_FILENAME).symlink_to(weights_file[0])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    net = load_inception()
    assert torch.equal(net.fc.weight, weights_file[1]["fc.weight"])


def test_resize_is_tf1_bilinear():
    row = torch.tensor([0.0, 10.0]).view(1, 1, 1, 2).expand(1, 1, 2, 2)
    # TF1 samples source x = i * in / out: 0, 0.5, 1, 1.5 -> 0, 5, 10, 10 (PyTorch would give 0, 2.5, 7.5, 10)
    assert resize_bilinear_tf1(row, 4)[0, 0, 0].tolist() == [0.0, 5.0, 10.0, 10.0]
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # downscaling picks pixels 0 and 2 of each axis, no averaging
    assert resize_bilinear_tf1(x, 2)[0, 0].tolist() == [[0.0, 2.0], [8.0, 10.0]]
    y = torch.rand(2, 3, 299, 299)
    assert torch.equal(resize_bilinear_tf1(y, 299), y)


def test_output_shapes_and_input_checks(model):
    x = torch.from_numpy(_images(2, smooth=False)[:2]).permute(0, 3, 1, 2)  # (2, 3, 32, 32) uint8
    out = model(x)
    assert out["pool"].shape == (2, 2048) and out["logits_unbiased"].shape == (2, 1008)
    assert out["spatial"].shape == (2, 17 * 17 * 7)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())
    torch.testing.assert_close(out["logits_unbiased"], out["pool"] @ model.fc.weight.T)
    assert (out["pool"] >= 0).all() and (out["spatial"] >= 0).all()  # both follow a ReLU
    assert not torch.allclose(out["pool"][0], out["pool"][1])
    with pytest.raises(ValueError, match="uint8"):
        model(x.float())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(x[:, :1])


def test_evaluate_npz_end_to_end(model, tmp_path):
    samples, ref = tmp_path / "samples.npz", tmp_path / "ref.npz"
    images = _images(3, smooth=False)
    np.savez(samples, images, np.arange(N_IMAGES))
    np.savez(ref, images)
    same = evaluate_npz(samples, ref, model, batch_size=N_IMAGES, progress=False)
    assert same["num_samples"] == N_IMAGES and same["num_reference"] == N_IMAGES
    assert abs(same["fid"]) < 1e-6 and abs(same["sfid"]) < 1e-6
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert 1.0 <= same["inception_score"] <= N_IMAGES
    assert (tmp_path / "ref.rar-stats.npz").is_file()

    calls = []

    def counting(batch):
        calls.append(len(batch))
        return model(batch)

    counting.cache_key, counting.matches_adm_statistics = model.cache_key, True
    cached = load_reference(ref, counting, progress=False)
    assert calls == []  # served from the cache next to the reference file
    assert cached["pool"].shape == (N_IMAGES, 2048) and cached["mu_s"].shape == (2023,)
