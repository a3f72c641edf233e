"""The Inception Score in numpy float64, independent of torch-fidelity (for the tests)."""

from __future__ import annotations

import numpy as np


def inception_score(logits: np.ndarray, splits: int, seed: int = 2020) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split, mean and std over splits, in numpy float64.

    Salimans et al.'s definition with torch-fidelity's protocol: rows shuffled by
    RandomState(seed), split ``i`` is rows [i N // splits, (i + 1) N // splits).
    """
    n = len(logits)
    x = logits[np.random.RandomState(seed).permutation(n)]
    log_p = x - x.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    scores = []
    for i in range(splits):
        chunk = log_p[i * n // splits : (i + 1) * n // splits]
        log_q = np.log(np.exp(chunk).mean(axis=0))
        scores.append(np.exp((np.exp(chunk) * (chunk - log_q)).sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))
