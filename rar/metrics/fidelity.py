"""FID, sFID, Inception Score and precision/recall as the ADM evaluator defines them, in PyTorch/NumPy.

The reference is guided-diffusion's `evaluations/evaluator.py` (used by RAR, ADM, DiT, MAR...):

- FID / sFID: Fréchet distance between Gaussians fitted (float64, unbiased covariance) to the
  `pool` / `spatial` features; the reference batch's stored `mu`/`sigma`/`mu_s`/`sigma_s` are used
  when present, exactly as ADM does.
- Inception Score: softmax of the bias-free logits, consecutive splits of 5000, mean of the scores.
- Precision / recall (Kynkäänniemi et al. 2019), k = 3, squared Euclidean distances. ADM computes
  the distance blocks in float16 (inputs and result rounded to half precision) and falls back to
  float32 for a block with overflow; `distance_dtype="float16"` (the default) emulates that, and
  "float32"/"float64" compute plainly.

Feature extractor protocol: any callable `extractor(images)` where `images` is a uint8 tensor
(B, 3, H, W) in 0..255 on the evaluation device, returning a dict of (B, D) float tensors with at
least `pool` (FID, precision/recall) and optionally `logits_unbiased` or `logits` (Inception Score,
softmax taken here) and `spatial` (sFID). Optional attributes: `cache_key` (str identifying the
weights; enables caching reference features next to the reference file) and
`matches_adm_statistics` (true only for the ADM Inception network, so stored reference statistics
apply). An `nn.Module` extractor is moved to the device and put in eval mode.
"""
from __future__ import annotations

import contextlib
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.files import require_path

_STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def _float64(name: str, value, ndim: int) -> np.ndarray:
    array = value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
    array = np.atleast_1d(array).astype(np.float64) if ndim == 1 else np.atleast_2d(array).astype(np.float64)
    if array.ndim != ndim or not np.isfinite(array).all():
        raise ValueError(f"{name} must be a finite {ndim}-d array, got shape {array.shape} with "
                         f"{int((~np.isfinite(array)).sum())} non-finite values.")
    return array


def _psd_factor(sigma: np.ndarray, max_pivots: int = 256) -> np.ndarray:
    """F (D, r) with F F^T = sigma for a PSD matrix, dropping rounding-level (or negative) directions.

    Low ranks (covariances of fewer than `max_pivots` samples) take a pivoted Cholesky, O(D r^2);
    otherwise the eigen-decomposition V sqrt(w).
    """
    d = sigma.shape[0]
    residual = np.diag(sigma).copy()  # (D,) diagonal of sigma - F F^T
    tol = d * np.finfo(np.float64).eps * max(residual.max(), 0.0)
    factor = np.zeros((d, min(d, max_pivots)))  # (D, pivots)
    for j in range(factor.shape[1]):
        p = int(np.argmax(residual))
        if residual[p] <= tol:
            return factor[:, :j]
        factor[:, j] = (sigma[:, p] - factor[:, :j] @ factor[p, :j]) / np.sqrt(residual[p])
        residual -= factor[:, j] ** 2
        residual[p] = 0.0
    if factor.shape[1] == d:
        return factor
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)  # (D,), (D, D)
    keep = w > max(w.max(), 0.0) * d * np.finfo(np.float64).eps
    return v[:, keep] * np.sqrt(w[keep])  # (D, r)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^(1/2)) for PSD sigma1 = F1 F1^T, sigma2 = F2 F2^T, by symmetric decompositions.

    sigma1 sigma2 has the eigenvalues of F1^T sigma2 F1 = B^T B with B = F2^T F1 (r2 x r1), so the
    trace is the sum of B's singular values. Unlike ADM's `scipy.linalg.sqrtm` of the non-symmetric
    product, no square root of rounding noise is taken, so rank-deficient covariances (fewer samples
    than dimensions) stay accurate, and low ranks make it cheap.
    """
    b = _psd_factor(sigma2).T @ _psd_factor(sigma1)  # (r2, r1)
    return float(np.linalg.svd(b, compute_uv=False).sum()) if b.size else 0.0


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64.

    If the decomposition fails (a numerically singular product), eps * I is added to both
    covariances and it is retried with a warning, as ADM / pytorch-fid do.
    """
    mu1, mu2 = _float64("mu1", mu1, 1), _float64("mu2", mu2, 1)
    sigma1, sigma2 = _float64("sigma1", sigma1, 2), _float64("sigma2", sigma2, 2)
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"frechet_distance needs means of one length D and D x D covariances, got "
                         f"{mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}.")
    try:
        tr_covmean = _trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:
        tr_covmean = float("nan")
    if not np.isfinite(tr_covmean):
        warnings.warn(f"Fréchet distance: singular covariance product; adding {eps} to the diagonals.")
        offset = np.eye(d) * eps
        tr_covmean = _trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64 (`np.cov` convention)."""
    x = _float64("features", features, 2)
    if x.shape[0] < 2:
        raise ValueError(f"feature_statistics needs at least 2 feature rows, got shape {x.shape}.")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def inception_score(probs, split_size: int = 5000) -> float:
    """Mean over consecutive splits of `split_size` rows (file order) of exp(E_x KL(p(y|x) || p(y))).

    `probs` is (N, C) class probabilities; the last split may be shorter, as in ADM. Terms with
    p(y|x) = 0 contribute 0 (ADM's float32 numpy would give NaN there).
    """
    p = _float64("probs", probs, 2)
    if p.shape[0] == 0 or split_size < 1:
        raise ValueError(f"inception_score needs a non-empty (N, C) array and split_size >= 1, "
                         f"got {p.shape}, {split_size}.")
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("inception_score expects probabilities (rows >= 0 summing to 1), not logits.")
    scores = []
    for start in range(0, p.shape[0], split_size):
        part = p[start:start + split_size]  # (n, C)
        marginal = part.mean(axis=0, keepdims=True)  # (1, C)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)  # (n, C)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def _distances(u: torch.Tensor, v: torch.Tensor, dtype: str) -> torch.Tensor:
    """Squared Euclidean distances (n, m) between rows of u (n, D) and v (m, D), clamped at 0."""
    def plain(a, b):
        return ((a * a).sum(1)[:, None] - 2 * (a @ b.T) + (b * b).sum(1)[None, :]).clamp_min(0)

    if dtype != "float16":
        return plain(u, v)
    h = lambda t: t.to(torch.float16).to(torch.float32)  # noqa: E731  round to half precision
    a, b = h(u), h(v)
    norm_a, norm_b = h(h(a * a).sum(1)), h(h(b * b).sum(1))  # (n,), (m,)
    d = h(h(norm_a[:, None] - h(2 * h(a @ b.T))) + norm_b[None, :]).clamp_min(0)  # (n, m)
    return d if torch.isfinite(d).all() else plain(u.float(), v.float())


def _to_device(name: str, features, dtype: str, device) -> torch.Tensor:
    x = torch.as_tensor(features).to(device=device, dtype=torch.float64 if dtype == "float64" else torch.float32)
    if x.dim() != 2 or not torch.isfinite(x).all():
        raise ValueError(f"{name} must be a finite (N, D) array, got shape {tuple(x.shape)}.")
    return x


def _knn_radii(x: torch.Tensor, k: int, block_size: int, dtype: str) -> torch.Tensor:
    """Squared distance (N,) from each row of x to its k-th nearest other row."""
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"precision_recall needs 1 <= k < number of points in each set, got k={k} with {n} points.")
    radii = []
    for r0 in range(0, n, block_size):
        rows = x[r0:r0 + block_size]  # (b, D)
        best = x.new_empty((rows.shape[0], 0))  # (b, <= k) smallest distances so far
        for c0 in range(0, n, block_size):
            d = _distances(rows, x[c0:c0 + block_size], dtype)  # (b, c)
            own = torch.arange(rows.shape[0], device=x.device) + r0 - c0  # column of each row's own point
            inside = (own >= 0) & (own < d.shape[1])
            d[inside.nonzero().squeeze(1), own[inside]] = float("inf")  # a point is not its own neighbour
            best = torch.cat([best, d], 1).topk(min(k, best.shape[1] + d.shape[1]), dim=1, largest=False).values
        radii.append(best[:, k - 1])
    return torch.cat(radii)


def precision_recall(real_features, fake_features, k: int = 3, block_size: int = 10000,
                     distance_dtype: str = "float16", device="cpu") -> tuple[float, float]:
    """Improved precision and recall of fake (generated) features against real (reference) features.

    A point's radius is the squared distance to its k-th nearest neighbour in its own set (itself
    excluded). Precision: share of fake points within (<=) the radius of some real point; recall:
    share of real points within the radius of some fake point. Distances are computed in
    `block_size` x `block_size` blocks (ADM: 10000), in `distance_dtype` (see the module notes).
    """
    if distance_dtype not in ("float16", "float32", "float64") or block_size < 1:
        raise ValueError(f"distance_dtype must be float16/float32/float64 and block_size >= 1, "
                         f"got {distance_dtype!r}, {block_size}.")
    real = _to_device("real_features", real_features, distance_dtype, device)  # (N, D)
    fake = _to_device("fake_features", fake_features, distance_dtype, device)  # (M, D)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features differ in width: {real.shape[1]} vs {fake.shape[1]}.")
    r_real = _knn_radii(real, k, block_size, distance_dtype)  # (N,)
    r_fake = _knn_radii(fake, k, block_size, distance_dtype)  # (M,)
    real_in = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    fake_in = torch.zeros(fake.shape[0], dtype=torch.bool, device=real.device)
    for r0 in range(0, real.shape[0], block_size):
        for f0 in range(0, fake.shape[0], block_size):
            d = _distances(real[r0:r0 + block_size], fake[f0:f0 + block_size], distance_dtype)  # (b, c)
            fake_in[f0:f0 + block_size] |= (d <= r_real[r0:r0 + block_size, None]).any(0)
            real_in[r0:r0 + block_size] |= (d <= r_fake[None, f0:f0 + block_size]).any(1)
    return fake_in.double().mean().item(), real_in.double().mean().item()


@contextlib.contextmanager
def _npy_member(path: Path, name: str):
    """Open `<name>.npy` inside an npz; yields (file positioned at the data or None, shape, dtype, fortran)."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:  # rare header version: report the layout, read the array whole when needed
            with np.load(path) as z:
                array = z[name]
            yield None, array.shape, array.dtype, False
            return
        yield f, shape, dtype, fortran


class NpzImages:
    """The validated `arr_0` images (N, H, W, 3) uint8 of an ADM-layout npz, read in batches."""

    def __init__(self, path: Path, shape: tuple, labels):
        self.path, self.shape, self.labels = path, tuple(shape), labels

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int):
        """Yields writable uint8 arrays (b, H, W, 3) in file order, without loading the whole file."""
        per_image = int(np.prod(self.shape[1:]))
        with _npy_member(self.path, "arr_0") as (f, shape, dtype, fortran):
            if f is None or fortran:
                with np.load(self.path) as z:
                    whole = np.ascontiguousarray(z["arr_0"])
                for start in range(0, len(whole), batch_size):
                    yield whole[start:start + batch_size].copy()
                return
            for start in range(0, self.shape[0], batch_size):
                count = min(batch_size, self.shape[0] - start)
                buf = bytearray(count * per_image)
                view, filled = memoryview(buf), 0
                while filled < len(buf):
                    got = f.readinto(view[filled:])
                    if not got:
                        raise ValueError(f"{self.path}: arr_0 ends early, after {start + filled // per_image} images.")
                    filled += got
                yield np.frombuffer(buf, dtype=np.uint8).reshape((count,) + self.shape[1:])

    def read_all(self) -> np.ndarray:
        return np.concatenate(list(self.batches(4096)), axis=0)


def read_npz_images(path) -> NpzImages:
    """Validate an ADM-layout npz (`arr_0` uint8 (N, H, W, 3), optional `arr_1` labels (N,) integers)."""
    path = require_path(path, "samples", "file", "an ADM-layout .npz (arr_0: uint8 N x H x W x 3)")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path} is not an npz file (expected np.savez output with arr_0).") from err
    if "arr_0.npy" not in names:
        raise ValueError(f"{path} has no arr_0 array; expected arr_0 uint8 images of shape (N, H, W, 3).")
    with _npy_member(path, "arr_0") as (_, shape, dtype, _fortran):
        pass
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or shape[0] < 1:
        raise ValueError(f"{path}: arr_0 has shape {tuple(shape)} and dtype {dtype}, "
                         f"expected uint8 images of shape (N, H, W, 3).")
    labels = None
    if "arr_1.npy" in names:
        with np.load(path) as z:
            labels = z["arr_1"]
        if labels.shape != (shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{path}: arr_1 has shape {labels.shape} and dtype {labels.dtype}, "
                             f"expected integer labels of shape ({shape[0]},).")
    return NpzImages(path, shape, labels)


def _extract(images: NpzImages, extractor, batch_size: int, device, desc: str, progress: bool) -> dict:
    """Run the extractor over all images; returns float32 numpy arrays per output key."""
    if isinstance(extractor, torch.nn.Module):
        extractor.to(device).eval()
    parts: dict[str, list] = {}
    with torch.inference_mode(), tqdm(total=len(images), desc=desc, unit="img", disable=not progress) as bar:
        for batch in images.batches(batch_size):
            x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2)  # (b, 3, H, W) uint8
            out = extractor(x)
            if not isinstance(out, dict) or "pool" not in out:
                raise ValueError(f"The feature extractor returned {type(out).__name__}, "
                                 f"expected a dict with a 'pool' entry.")
            for key in ("pool", "logits_unbiased", "logits", "spatial"):
                if key in out:
                    parts.setdefault(key, []).append(out[key].detach().float().reshape(len(batch), -1).cpu().numpy())
            bar.update(len(batch))
    return {key: np.concatenate(chunks, axis=0) for key, chunks in parts.items()}


def _cache_meta(path: Path, key: str) -> np.ndarray:
    st = path.stat()
    return np.array(f"{key}|{st.st_size}|{st.st_mtime_ns}")


def _load_cache(cache_path: Path, meta: np.ndarray):
    if not cache_path.is_file():
        return None
    try:
        with np.load(cache_path) as z:
            if "meta" not in z.files or str(z["meta"]) != str(meta):
                return None
            return {k: z[k] for k in z.files if k != "meta"}
    except (OSError, ValueError, zipfile.BadZipFile):
        return None


def _save_cache(cache_path: Path, meta: np.ndarray, stats: dict) -> None:
    tmp = cache_path.with_name(cache_path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, meta=meta, **stats)
        os.replace(tmp, cache_path)
    except OSError as err:
        warnings.warn(f"Could not cache reference features at {cache_path} ({err}); they will be recomputed next time.")


def load_reference(npz_path, extractor, cache: bool = True, batch_size: int = 64, device="cpu",
                   progress: bool = True) -> dict:
    """Reference statistics and features from an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz).

    Returns a dict with `mu`, `sigma` (and `mu_s`, `sigma_s` for sFID when available), `pool`
    (N, D) reference features for precision/recall (absent if the file has no `arr_0`),
    `num_images` and `stats_source` ("stored" or "computed"). Stored `mu`/`sigma`/`mu_s`/`sigma_s`
    are used, as ADM does, when the extractor has `matches_adm_statistics`; otherwise they are
    computed from `arr_0`. Features computed from `arr_0` are cached next to the file as
    `<name>.rar-stats.npz` when `cache` is true and the extractor has a `cache_key`.
    """
    path = require_path(npz_path, "reference batch", "file", "an ADM-layout .npz such as "
                        "VIRTUAL_imagenet256_labeled.npz")
    with np.load(path) as z:
        files = set(z.files)
        stored = {k: z[k] for k in _STAT_KEYS if k in files}
    use_stored = bool(getattr(extractor, "matches_adm_statistics", False)) and {"mu", "sigma"} <= set(stored)
    ref: dict = {}
    if "arr_0" in files:
        key = getattr(extractor, "cache_key", None) if cache else None
        cache_path = path.with_name(path.stem + ".rar-stats.npz")
        meta = _cache_meta(path, key) if isinstance(key, str) else None
        ref = _load_cache(cache_path, meta) if meta is not None else None
        if ref is None:
            feats = _extract(read_npz_images(path), extractor, batch_size, device, "reference", progress)
            ref = {"pool": feats["pool"]}
            ref["mu"], ref["sigma"] = feature_statistics(feats["pool"])
            if "spatial" in feats:
                ref["mu_s"], ref["sigma_s"] = feature_statistics(feats["spatial"])
            if meta is not None:
                _save_cache(cache_path, meta, ref)
    elif not use_stored:
        raise ValueError(f"Reference batch {path} has neither arr_0 images nor mu/sigma statistics "
                         f"usable with this extractor.")
    ref["stats_source"] = "stored" if use_stored else "computed"
    if use_stored:
        ref.update(stored)
        if "mu_s" not in stored:  # never mix stored pool statistics with spatial ones from arr_0
            ref.pop("mu_s", None)
            ref.pop("sigma_s", None)
    ref["num_images"] = int(len(ref["pool"])) if "pool" in ref else None
    return ref


def evaluate_npz(samples_npz, ref_npz, extractor, batch_size: int = 64, device="cpu", k: int = 3,
                 cache: bool = True, progress: bool = True) -> dict:
    """All metrics of an ADM-layout sample npz against a reference batch, ADM's conventions throughout.

    Returns `num_samples`, `num_reference`, `fid`, and when the inputs allow: `sfid` (both sides
    have spatial features), `inception_score` (the extractor gives logits), `precision` and
    `recall` (the reference has `arr_0`). Metrics that cannot be computed are left out.
    """
    samples = read_npz_images(samples_npz)
    ref = load_reference(ref_npz, extractor, cache=cache, batch_size=batch_size, device=device, progress=progress)
    feats = _extract(samples, extractor, batch_size, device, "samples", progress)
    result: dict = {"num_samples": len(samples), "num_reference": ref["num_images"]}
    mu, sigma = feature_statistics(feats["pool"])
    result["fid"] = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
    if "spatial" in feats and "mu_s" in ref:
        mu_s, sigma_s = feature_statistics(feats["spatial"])
        result["sfid"] = frechet_distance(mu_s, sigma_s, ref["mu_s"], ref["sigma_s"])
    logits = feats.get("logits_unbiased", feats.get("logits"))
    if logits is not None:
        probs = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()  # (N, C) float64
        result["inception_score"] = inception_score(probs)
    if "pool" in ref:
        result["precision"], result["recall"] = precision_recall(ref["pool"], feats["pool"], k=k, device=device)
    return result
