"""FID's bootstrap standard error (pipeline.evaluation.bootstrap) against independent numpy/scipy
computations: the Fréchet distance of resampled rows (np.repeat, np.cov, scipy's sqrtm or the
eigenvalues of S1 S2) and the spread of FID over independent sample sets of Gaussian features
with a known covariance."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from pipeline.evaluation.bootstrap import (
    bootstrap_errors,
    bootstrap_file,
    fid_bootstrap,
    read_bootstrap,
)


def scipy_fid(features: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), S1 = np.cov; tr sqrt from the
    eigenvalues of S1 S2 (real, >= 0: similar to a PSD matrix)."""
    mu1 = features.mean(axis=0)
    s1 = np.atleast_2d(np.cov(features, rowvar=False))
    eig = np.linalg.eigvals(s1 @ sigma2).real.clip(min=0)
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(sigma2) - 2 * np.sqrt(eig).sum())


def known_gaussian(dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dim, dim))
    return rng.normal(size=dim), a @ a.T / dim + 0.1 * np.eye(dim)


def numpy_bootstrap(x, mu2, sigma2, resamples, seed) -> list[float]:
    """The resampled FIDs drawn as fid_bootstrap draws them (multinomial counts), rows copied."""
    rng, n = np.random.default_rng(seed), len(x)
    out = []
    for _ in range(resamples):
        counts = rng.multinomial(n, np.full(n, 1.0 / n))
        out.append(scipy_fid(np.repeat(x, counts, axis=0), mu2, sigma2))
    return out


@pytest.mark.parametrize("n, dim", [(200, 6), (5, 8)])  # rows > dims, and the Gram branch
def test_fid_and_bootstrap_match_independent_scipy(n, dim):
    mu2, sigma2 = known_gaussian(dim, seed=1)
    x = np.random.default_rng(2).multivariate_normal(mu2 + 0.3, sigma2 * 1.5, size=n)
    out = fid_bootstrap(x, mu2, sigma2, resamples=30, seed=7)
    assert out["fid"] == pytest.approx(scipy_fid(x, mu2, sigma2), rel=1e-8)
    if n > dim:  # scipy's sqrtm as a second formula where S1 S2 is well conditioned
        s1 = np.cov(x, rowvar=False)
        covmean = scipy.linalg.sqrtm(s1 @ sigma2).real
        d = x.mean(0) - mu2
        direct = d @ d + np.trace(s1 + sigma2 - 2 * covmean)
        assert out["fid"] == pytest.approx(direct, rel=1e-8)
    values = numpy_bootstrap(x, mu2, sigma2, 30, seed=7)
    assert out["se"] == pytest.approx(np.std(values, ddof=1), rel=1e-7)
    assert out["se"] > 0 and (out["resamples"], out["seed"], out["n"]) == (30, 7, n)


def test_bootstrap_se_estimates_the_spread_over_independent_sample_sets():
    """Gaussian features of known covariance: FID over 300 independent sample sets of N rows
    has a standard deviation the bootstrap of one set estimates (within 35 %, 5 sets)."""
    dim, n = 4, 400
    mu2, sigma2 = known_gaussian(dim, seed=3)
    mu1, sigma1 = mu2 + 0.5, sigma2 * 1.3
    rng = np.random.default_rng(4)
    spread = np.std(
        [scipy_fid(rng.multivariate_normal(mu1, sigma1, n), mu2, sigma2) for _ in range(300)],
        ddof=1,
    )
    estimates = [
        fid_bootstrap(rng.multivariate_normal(mu1, sigma1, n), mu2, sigma2, 200, seed=s)["se"]
        for s in range(5)
    ]
    assert np.mean(estimates) == pytest.approx(spread, rel=0.35)


def test_seeded_and_fewer_than_two_resamples_give_no_error():
    mu2, sigma2 = known_gaussian(3, seed=5)
    x = np.random.default_rng(6).normal(size=(20, 3))
    assert fid_bootstrap(x, mu2, sigma2, 10, 0) == fid_bootstrap(x, mu2, sigma2, 10, 0)
    assert fid_bootstrap(x, mu2, sigma2, 10, 0)["se"] != fid_bootstrap(x, mu2, sigma2, 10, 1)["se"]
    assert fid_bootstrap(x, mu2, sigma2, 1, 0)["se"] is None


def test_bootstrap_errors_cached_per_reference(tmp_path):
    import torch

    mu2, sigma2 = known_gaussian(3, seed=8)
    x = np.random.default_rng(9).normal(size=(30, 3))
    features = tmp_path / "features.pt"
    torch.save(torch.from_numpy(x.astype(np.float32)), features)
    refs = {
        split: {"content_key": key * 64, "mu": torch.from_numpy(mu2), "sigma": torch.from_numpy(s)}
        for split, key, s in (("train", "a", sigma2), ("test", "b", 2 * sigma2))
    }
    out = bootstrap_errors(tmp_path, "c" * 64, refs, features, 12, 3)
    x32 = x.astype(np.float32).astype(np.float64)
    assert out["fid_train_se"] == pytest.approx(
        np.std(numpy_bootstrap(x32, mu2, sigma2, 12, 3), ddof=1)
    )
    assert out["fid_test_se"] != out["fid_train_se"]
    features.unlink()  # cached: the features are no longer read
    assert bootstrap_errors(tmp_path, "c" * 64, refs, features, 12, 3) == out
    assert read_bootstrap(bootstrap_file(tmp_path, "c" * 64, "a" * 64, 12, 3))["n"] == 30
    assert bootstrap_errors(tmp_path, "c" * 64, refs, features, 0, 3) == {}
