"""A bootstrap standard error of FID over the sample features, without a new network pass.

FID compares the Gaussian of the samples' features (mean mu_1, covariance Sigma_1, from N
samples) with the reference's (mu_2, Sigma_2, fixed):

    FID = |mu_1 - mu_2|^2 + tr Sigma_1 + tr Sigma_2 - 2 tr (Sigma_1 Sigma_2)^(1/2).

The finite sample set makes mu_1 and Sigma_1, and so FID, random. :func:`fid_bootstrap` draws
``resamples`` sets of N samples with replacement from the N feature rows already computed
(torch-fidelity's cached feature array, [N, D]), computes each set's FID against the same
reference, and returns their standard deviation: the standard error of our FID due to the sample
set. The reference statistics are held fixed (FID is defined against them); the training seed's
share of the variation is what ``seeds`` adds (docs/report-and-mlflow.md).

Each resample is a vector of multinomial counts c (sum N), so no rows are copied:
mu_b = c X / N, Sigma_b = (X - mu_b)^T diag(c) (X - mu_b) / (N - 1). With A = Sigma_2^(1/2)
(once), tr (Sigma_b Sigma_2)^(1/2) = tr (A Sigma_b A)^(1/2) = sum of the singular values of
Y = diag(sqrt c) (X - mu_b) A / sqrt(N - 1), taken from the smaller of Y^T Y and Y Y^T. The
arithmetic is float64, in torch on ``device`` (the Inception device: a GPU does a 50,000 x 2048
resample in milliseconds; 2 CPU cores take seconds each).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.atomic import write_text
from pipeline.cluster.storage import safe_load
from pipeline.errors import DataError

BOOTSTRAP_FORMAT = "ddpm-repro/fid-bootstrap-v1"


def frechet_terms(features: torch.Tensor, ref_mu: torch.Tensor, ref_sqrt: torch.Tensor):
    """A closure FID(counts) of weighted feature rows against a reference (float64 tensors).

    ``features`` [N, D], ``ref_mu`` [D], ``ref_sqrt`` [D, D] = Sigma_2^(1/2); the closure takes
    counts [N] (all ones: the plain FID of the features) and returns a float.
    """
    n = features.shape[0]
    ref_trace = float((ref_sqrt * ref_sqrt).sum())  # tr Sigma_2 = |A|_F^2
    projected = features @ ref_sqrt  # X A, [N, D]: once

    def fid(counts: torch.Tensor) -> float:
        w = counts.to(features.dtype)
        mu = (w @ features) / n
        centered = features - mu
        trace = float((w * (centered * centered).sum(dim=1)).sum()) / (n - 1)
        y = (projected - mu @ ref_sqrt) * torch.sqrt(w)[:, None] / math.sqrt(n - 1)
        gram = y @ y.T if y.shape[0] < y.shape[1] else y.T @ y
        eig = torch.linalg.eigvalsh(gram).clamp(min=0)
        mean_term = float(((mu - ref_mu) ** 2).sum())
        return mean_term + trace + ref_trace - 2.0 * float(torch.sqrt(eig).sum())

    return fid


def sqrt_psd(sigma: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a positive semi-definite matrix (negative eigenvalues: 0)."""
    sigma = (sigma + sigma.T) / 2
    w, v = torch.linalg.eigh(sigma)
    return (v * torch.sqrt(w.clamp(min=0))) @ v.T


def fid_bootstrap(
    features: Any,
    ref_mu: Any,
    ref_sigma: Any,
    resamples: int,
    seed: int,
    device: str = "cpu",
) -> dict[str, Any]:
    """FID of ``features`` [N, D] against (``ref_mu`` [D], ``ref_sigma`` [D, D]) and its
    bootstrap standard error over ``resamples`` resamples of the N rows (numpy seed ``seed``).

    Returns {"fid" (the features' own FID), "se" (std, ddof 1, of the resampled FIDs), "resamples",
    "seed", "n"}. ``se`` is None with fewer than 2 resamples.
    """
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64, device=device)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features: expected [N >= 2, D], got {tuple(x.shape)}")
    mu2 = torch.as_tensor(np.asarray(ref_mu), dtype=torch.float64, device=device)
    sigma2 = torch.as_tensor(np.asarray(ref_sigma), dtype=torch.float64, device=device)
    n = x.shape[0]
    # small matrices (the smoke scale's 64 x 64): one CPU thread, 14x faster than 2 on a loaded
    # 2-core machine (7.1 s against 0.5 s for 100 resamples), where thread syncs dominate
    saved = torch.get_num_threads()
    if x.device.type == "cpu" and max(x.shape) <= SMALL:
        torch.set_num_threads(1)
    try:
        fid = frechet_terms(x, mu2, sqrt_psd(sigma2))
        rng = np.random.default_rng(seed)
        values = []
        for _ in range(resamples):
            counts = rng.multinomial(n, np.full(n, 1.0 / n))
            values.append(fid(torch.as_tensor(counts, device=device)))
        plain = fid(torch.ones(n, dtype=torch.float64, device=device))
    finally:
        torch.set_num_threads(saved)
    se = float(np.std(values, ddof=1)) if len(values) >= 2 else None
    return {"fid": plain, "se": se, "resamples": resamples, "seed": seed, "n": n}


SMALL = 1024  # rows and feature dimensions up to this: one CPU thread


def bootstrap_file(cache: Path, key: str, ref_key: str, resamples: int, seed: int) -> Path:
    """Where the bootstrap of sample set ``key`` against reference ``ref_key`` is cached."""
    return Path(cache) / f"x{key[:32]}-fid-bootstrap-{ref_key[:32]}-b{resamples}-s{seed}.json"


def read_bootstrap(path: Path) -> dict[str, Any] | None:
    """A cached bootstrap result, or None when absent or of another format."""
    try:
        out = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) and out.get("format") == BOOTSTRAP_FORMAT else None


def write_bootstrap(path: Path, result: dict[str, Any]) -> None:
    """Cache a :func:`fid_bootstrap` result (atomically)."""
    write_text(Path(path), json.dumps({"format": BOOTSTRAP_FORMAT, **result}, indent=1) + "\n")


def load_features(path: Path) -> np.ndarray:
    """torch-fidelity's cached feature array [N, D] (a tensor file), as float64 numpy."""
    out = safe_load(Path(path))
    if not isinstance(out, torch.Tensor | np.ndarray) or np.ndim(out) != 2:
        raise DataError(f"{path}: not a feature array [N, D]")
    return np.asarray(out, dtype=np.float64)


def bootstrap_missing(
    cache: Path, key: str, refs: dict[str, dict[str, Any]], resamples: int, seed: int
) -> list[str]:
    """The reference splits whose bootstrap of sample set ``key`` is not cached yet."""
    if resamples < 2:
        return []
    return [
        split
        for split, stats in refs.items()
        if read_bootstrap(bootstrap_file(cache, key, stats["content_key"], resamples, seed)) is None
    ]


def bootstrap_errors(
    cache: Path,
    key: str,
    refs: dict[str, dict[str, Any]],
    features: Path,
    resamples: int,
    seed: int,
    device: str = "cpu",
) -> dict[str, float | None]:
    """{"fid_<split>_se"} of sample set ``key`` against each reference split (``refs``: the
    loaded statistics files, mu and sigma tensors), from the cache or computed from the feature
    file ``features`` and cached. Empty with fewer than 2 resamples."""
    if resamples < 2:
        return {}
    missing = bootstrap_missing(cache, key, refs, resamples, seed)
    x = load_features(features) if missing else None
    out = {}
    for split, stats in refs.items():
        path = bootstrap_file(cache, key, stats["content_key"], resamples, seed)
        if split in missing:
            mu, sigma = stats["mu"].numpy(), stats["sigma"].numpy()
            write_bootstrap(path, fid_bootstrap(x, mu, sigma, resamples, seed, device))
        cached = read_bootstrap(path)
        assert cached is not None  # written above, or found by bootstrap_missing
        out[f"fid_{split}_se"] = cached["se"]
    return out


def plan_pass(samples: Any, features: Path, stat_file: Path, missing: list, resamples: int) -> int:
    """Before the Inception pass: the resamples to draw. A bootstrap is ``missing`` and the
    feature file dropped by a run before it: the samples' statistics file is removed so the
    pass runs once more and leaves the features; images that cannot be read (a GPU task's
    placeholder of cached ones) get no pass and no error estimate (0)."""
    if not missing or Path(features).is_file():
        return resamples
    try:
        samples[:1]
    except RuntimeError:
        return 0
    Path(stat_file).unlink(missing_ok=True)
    return resamples
