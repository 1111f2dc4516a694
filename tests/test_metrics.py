"""FID / IS / precision-recall against closed forms and brute force; the ADM npz layout checks."""
import math

import numpy as np
import pytest
import torch

from rar.metrics.fidelity import (
    evaluate_npz,
    feature_statistics,
    frechet_distance,
    inception_score,
    load_reference,
    precision_recall,
    read_npz_images,
)


# ---------------------------------------------------------------- Fréchet distance


def test_fd_diagonal_closed_form():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    # diagonal covariances: tr((S1 S2)^(1/2)) = sum sqrt(a b), so FD = |dmu|^2 + sum (sqrt a - sqrt b)^2
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_fd_commuting_full_covariances_and_symmetry():
    rng = np.random.default_rng(1)
    d = 24
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # shared eigenvectors: the covariances commute
    a, b = rng.uniform(0.0, 2.0, size=d), rng.uniform(0.0, 2.0, size=d)
    a[:3] = 0.0  # singular first covariance
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)
    # torch inputs are accepted too
    assert frechet_distance(torch.tensor(mu1), torch.tensor(s1), mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fd_one_dimensional_and_self_distance():
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(50, 30)) @ rng.normal(size=(30, 30))
    mu, sigma = feature_statistics(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)
    # rank-deficient covariance (fewer samples than dimensions) still gives FD(x, x) ~ 0
    mu, sigma = feature_statistics(feats[:10])
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_fd_rank_deficient_against_sample_form():
    # with S = Xc^T Xc / (n - 1), tr((S1 S2)^(1/2)) is the nuclear norm of X1c X2c^T / (n - 1): no roots
    rng = np.random.default_rng(7)
    n, d = 12, 40
    x1 = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    x2 = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 1.0
    (mu1, s1), (mu2, s2) = feature_statistics(x1), feature_statistics(x2)
    tr = np.linalg.svd((x1 - mu1) @ (x2 - mu2).T / (n - 1), compute_uv=False).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_fd_rejects_bad_shapes_and_nan():
    with pytest.raises(ValueError, match="D x D"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


def test_feature_statistics_matches_np_cov():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    mu, sigma = feature_statistics(x)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    xc = x.astype(np.float64) - mu
    np.testing.assert_allclose(sigma, xc.T @ xc / (len(x) - 1), rtol=1e-10)  # unbiased, as np.cov


# ---------------------------------------------------------------- Inception Score


def _direct_is(p):
    marginal = p.mean(0)
    kl = [sum(pi * math.log(pi / mj) for pi, mj in zip(row, marginal) if pi > 0) for row in p]
    return math.exp(sum(kl) / len(kl))


def test_inception_score_single_split_and_extremes():
    rng = np.random.default_rng(4)
    p = rng.dirichlet(np.full(10, 0.3), size=37)
    assert inception_score(p) == pytest.approx(_direct_is(p), rel=1e-12)
    # confident and uniformly spread over C classes -> C; all identical -> 1
    assert inception_score(np.eye(7)) == pytest.approx(7.0)
    assert inception_score(np.tile(p[:1], (20, 1))) == pytest.approx(1.0)


def test_inception_score_consecutive_splits():
    rng = np.random.default_rng(5)
    p = rng.dirichlet(np.full(6, 0.5), size=23)
    # splits of 10: rows 0-9, 10-19, 20-22 (the last one shorter), file order, no shuffling
    expected = np.mean([_direct_is(p[0:10]), _direct_is(p[10:20]), _direct_is(p[20:23])])
    assert inception_score(p, split_size=10) == pytest.approx(expected, rel=1e-12)
    assert inception_score(p, split_size=10) != pytest.approx(inception_score(p[::-1], split_size=10), rel=1e-6)
    with pytest.raises(ValueError, match="logits"):
        inception_score(np.log(p))


# ---------------------------------------------------------------- precision / recall


def _brute_pr(real, fake, k):
    real, fake = real.astype(np.float64), fake.astype(np.float64)

    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    d = ((real[:, None] - fake[None]) ** 2).sum(-1)  # (N, M)
    precision = (d <= radii(real)[:, None]).any(0).mean()
    recall = (d <= radii(fake)[None, :]).any(1).mean()
    return precision, recall


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_precision_recall_matches_brute_force(k, dtype):
    rng = np.random.default_rng(13)
    # small integer coordinates: squared distances are exact in every dtype, and ties (== radius) occur
    real = rng.integers(-4, 5, size=(41, 3)).astype(np.float32)
    fake = (rng.integers(-4, 5, size=(29, 3)) + np.array([2, 0, 0])).astype(np.float32)
    fake[:4] = real[:4]  # exact duplicates across the sets
    expected = _brute_pr(real, fake, k)
    for block in (7, 10000):  # blocks smaller than N exercise the blocked k-NN and self-exclusion
        got = precision_recall(real, fake, k=k, block_size=block, distance_dtype=dtype)
        assert got == pytest.approx(expected, abs=1e-12)
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0


def test_precision_recall_self_exclusion_and_continuous():
    rng = np.random.default_rng(20)
    real = rng.normal(size=(60, 8))
    fake = rng.normal(size=(45, 8)) * 1.5 + 0.3
    expected = _brute_pr(real, fake, 3)
    assert precision_recall(real, fake, k=3, block_size=16, distance_dtype="float64") == pytest.approx(expected)
    # including a point in its own neighbourhood would shrink each radius to the (k-1)-th neighbour
    assert expected != pytest.approx(_brute_pr(real, fake, 2))
    # identical sets: every point lies within its own twin's radius
    assert precision_recall(real, real, k=3, block_size=16) == (1.0, 1.0)


def test_precision_recall_float16_matches_float32_on_feature_scale_data():
    rng = np.random.default_rng(21)
    real = np.abs(rng.normal(0.3, 0.4, size=(80, 64))).astype(np.float32)
    fake = np.abs(rng.normal(0.35, 0.4, size=(70, 64))).astype(np.float32)
    p16, r16 = precision_recall(real, fake, k=3, block_size=32)
    p32, r32 = precision_recall(real, fake, k=3, block_size=32, distance_dtype="float32")
    assert abs(p16 - p32) <= 0.05 and abs(r16 - r32) <= 0.05
    # overflowing half precision falls back to float32 as ADM does
    assert precision_recall(real * 2.0**14, fake * 2.0**14, k=3, distance_dtype="float16") == (p32, r32)


def test_precision_recall_float16_rounds_like_adm():
    # ADM rounds features and distances to half precision: 8.002 becomes 8.0, so its squared
    # distance 64.03 to the origin becomes 64, exactly the origin's radius (k=1: 64), hence "inside"
    real = np.array([[0.0, 0.0], [-8.0, 0.0]])
    fake = np.array([[8.002, 0.0], [100.0, 0.0]])
    assert precision_recall(real, fake, k=1, distance_dtype="float16") == (0.5, 1.0)
    assert precision_recall(real, fake, k=1, distance_dtype="float64") == (0.0, 1.0)


def test_precision_recall_rejects_bad_k():
    x = np.zeros((3, 2))
    with pytest.raises(ValueError, match="k=3"):
        precision_recall(x, x, k=3)


# ---------------------------------------------------------------- ADM npz layout


def test_read_npz_images_valid_and_streamed(tmp_path):
    images = np.random.default_rng(6).integers(0, 256, size=(5, 6, 4, 3), dtype=np.uint8)
    labels = np.arange(5)
    path = tmp_path / "ok.npz"
    np.savez(path, images, labels)
    got = read_npz_images(path)
    assert len(got) == 5 and got.shape == (5, 6, 4, 3)
    np.testing.assert_array_equal(got.labels, labels)
    batches = list(got.batches(2))
    assert [len(b) for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    compressed = tmp_path / "c.npz"
    np.savez_compressed(compressed, images)
    np.testing.assert_array_equal(read_npz_images(compressed).read_all(), images)
    assert read_npz_images(compressed).labels is None


@pytest.mark.parametrize("array, fragment", [
    (np.zeros((2, 8, 8, 3), np.float32), "float32"),
    (np.zeros((2, 3, 8, 8), np.uint8), r"\(2, 3, 8, 8\)"),
    (np.zeros((8, 8, 3), np.uint8), r"\(8, 8, 3\)"),
])
def test_read_npz_images_rejects_wrong_layout(tmp_path, array, fragment):
    path = tmp_path / "bad.npz"
    np.savez(path, array)
    with pytest.raises(ValueError, match=fragment) as info:
        read_npz_images(path)
    assert "bad.npz" in str(info.value) and "arr_0" in str(info.value) and "(N, H, W, 3)" in str(info.value)


def test_read_npz_images_rejects_bad_labels_and_missing_arrays(tmp_path):
    path = tmp_path / "labels.npz"
    np.savez(path, np.zeros((2, 4, 4, 3), np.uint8), np.zeros(3))
    with pytest.raises(ValueError, match="arr_1"):
        read_npz_images(path)
    other = tmp_path / "other.npz"
    np.savez(other, images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="no arr_0"):
        read_npz_images(other)
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        read_npz_images(tmp_path / "absent.npz")


# ---------------------------------------------------------------- the pipeline, with a cheap extractor


class ToyExtractor:
    """Follows the extractor protocol: mean colour of each image quadrant (12-d) and 5 logits."""

    def __init__(self, cache_key=None, adm=False):
        self.calls = 0
        if cache_key is not None:
            self.cache_key = cache_key
        self.matches_adm_statistics = adm
        self.proj = torch.linspace(-2, 2, 60).view(12, 5)

    def __call__(self, images):
        assert images.dtype == torch.uint8 and images.shape[1] == 3  # (B, 3, H, W)
        self.calls += len(images)
        pool = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 2).flatten(1)  # (B, 12)
        return {"pool": pool, "logits": pool @ self.proj}

    def direct(self, images):
        return {k: v.double().numpy() for k, v in self(torch.from_numpy(images).permute(0, 3, 1, 2)).items()}


def _write(path, n, seed, **extra):
    images = np.random.default_rng(seed).integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    np.savez(path, images, **extra)
    return images


def test_evaluate_npz_matches_the_parts(tmp_path):
    ref_images = _write(tmp_path / "ref.npz", 10, 0)
    sample_images = _write(tmp_path / "samples.npz", 12, 1)
    toy = ToyExtractor()
    got = evaluate_npz(tmp_path / "samples.npz", tmp_path / "ref.npz", toy, batch_size=5, progress=False)
    ref, fake = toy.direct(ref_images), toy.direct(sample_images)
    fid = frechet_distance(*feature_statistics(fake["pool"]), *feature_statistics(ref["pool"]))
    assert got["fid"] == pytest.approx(fid)
    assert got["fid"] > 0
    probs = torch.softmax(torch.from_numpy(fake["logits"]), 1).numpy()
    assert got["inception_score"] == pytest.approx(inception_score(probs), rel=1e-6)
    assert (got["precision"], got["recall"]) == precision_recall(ref["pool"], fake["pool"])
    assert got["num_samples"] == 12 and got["num_reference"] == 10 and "sfid" not in got
    assert not (tmp_path / "ref.rar-stats.npz").exists()  # no cache_key: nothing cached


def test_reference_statistics_stored_versus_computed(tmp_path):
    mu, sigma = np.full(12, 0.5), np.eye(12) * 0.01
    images = _write(tmp_path / "ref.npz", 10, 2, mu=mu, sigma=sigma)
    adm = load_reference(tmp_path / "ref.npz", ToyExtractor(adm=True), progress=False)
    assert adm["stats_source"] == "stored" and np.array_equal(adm["mu"], mu) and "mu_s" not in adm
    assert adm["pool"].shape == (10, 12)  # arr_0 still feeds precision/recall
    plain = load_reference(tmp_path / "ref.npz", ToyExtractor(), progress=False)
    assert plain["stats_source"] == "computed"
    np.testing.assert_allclose(plain["mu"], feature_statistics(ToyExtractor().direct(images)["pool"])[0], rtol=1e-6)
    np.savez(tmp_path / "stats_only.npz", mu=mu, sigma=sigma)
    _write(tmp_path / "s.npz", 6, 3)
    result = evaluate_npz(tmp_path / "s.npz", tmp_path / "stats_only.npz", ToyExtractor(adm=True), progress=False)
    assert np.isfinite(result["fid"]) and "precision" not in result and result["num_reference"] is None
    with pytest.raises(ValueError, match="stats_only.npz"):
        load_reference(tmp_path / "stats_only.npz", ToyExtractor(), progress=False)


def test_reference_cache_is_keyed_by_extractor_and_file(tmp_path):
    path = tmp_path / "ref.npz"
    _write(path, 10, 4)
    first = ToyExtractor(cache_key="toy-1")
    computed = load_reference(path, first, progress=False)
    assert first.calls == 10 and (tmp_path / "ref.rar-stats.npz").is_file()
    again = ToyExtractor(cache_key="toy-1")
    cached = load_reference(path, again, progress=False)
    assert again.calls == 0 and np.array_equal(cached["pool"], computed["pool"])
    np.testing.assert_array_equal(cached["sigma"], computed["sigma"])
    other = ToyExtractor(cache_key="toy-2")
    load_reference(path, other, progress=False)
    assert other.calls == 10  # other weights: recomputed
    _write(path, 11, 5)  # the reference file changed
    changed = ToyExtractor(cache_key="toy-2")
    assert load_reference(path, changed, progress=False)["pool"].shape == (11, 12) and changed.calls == 11
    off = ToyExtractor(cache_key="toy-2")
    load_reference(path, off, cache=False, progress=False)
    assert off.calls == 11


def test_extractor_must_return_pool(tmp_path):
    _write(tmp_path / "x.npz", 4, 6)
    with pytest.raises(ValueError, match="'pool'"):
        evaluate_npz(tmp_path / "x.npz", tmp_path / "x.npz", lambda images: images, progress=False)
