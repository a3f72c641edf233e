"""The evaluate stage's PNG figures: reconstructions (Fig. 7), interpolation (Fig. 8) and the
rate-distortion curves (Fig. 5).

Image strips reuse pipeline.sampling.figures (torchvision grids, Pillow captions); the curves are
drawn with matplotlib's Agg backend (no display needed). Every figure is written atomically.
"""

from __future__ import annotations

import os

import numpy as np

from pipeline.atomic import atomic_path
from pipeline.sampling.figures import captioned, save_png, tile


def save_reconstructions(
    path: str | os.PathLike,
    originals: np.ndarray,
    x_t: np.ndarray,
    x_0: np.ndarray,
    ts: tuple[int, ...],
    title: str,
) -> None:
    """Fig. 7: per test image (row) the original, then for each t: x_t and its reconstructions.

    ``originals`` uint8 [N, R, R, 3]; ``x_t`` [N, K, R, R, 3]; ``x_0`` [N, K, D, R, R, 3].
    """
    N, K, D = x_0.shape[:3]
    rows = []
    for n in range(N):
        row = [originals[n]]
        for k in range(K):
            row += [x_t[n, k], *x_0[n, k]]
        rows.append(np.stack(row))
    strip = tile(np.concatenate(rows), nrow=1 + K * (1 + D))
    steps = ", ".join(str(t) for t in ts)
    caption = (
        f"{title}\ncolumns: x_0, then for t = {steps}: x_t and {D} samples of "
        f"p(x_0 | x_t) from that same x_t"
    )
    save_png(path, captioned(strip, caption))


def save_interpolation(
    path: str | os.PathLike,
    sources: np.ndarray,
    targets: np.ndarray,
    mixes: np.ndarray,
    lambdas: np.ndarray,
    t: int,
    title: str,
) -> None:
    """Fig. 8: per pair (row) the source, the decoded mixes for each λ, then the target.

    Captions are ASCII: Pillow's default bitmap font has no Greek letters.

    ``sources``, ``targets`` uint8 [P, R, R, 3]; ``mixes`` [P, L, R, R, 3].
    """
    P, L = mixes.shape[:2]
    rows = [np.concatenate([sources[p : p + 1], mixes[p], targets[p : p + 1]]) for p in range(P)]
    strip = tile(np.concatenate(rows), nrow=L + 2)
    weights = ", ".join(f"{v:.2g}" for v in lambdas)
    caption = (
        f"{title}\ncolumns: x_0, decoded (1 - lambda) x_t + lambda x'_t at t = {t} for lambda = "
        f"{weights}, then x'_0 (lambda 0 and 1: the two reconstructions)"
    )
    save_png(path, captioned(strip, caption))


def fig5_axis(curve: dict[str, np.ndarray]) -> np.ndarray:
    """Fig. 5's x values: T - t for the 1-based t (0 at x_T; Table 4 counts T - t + 1 instead)."""
    return curve["T_minus_t"]


def save_rate_distortion(path: str | os.PathLike, curve: dict[str, np.ndarray], title: str) -> None:
    """Fig. 5: distortion and rate against reverse steps, and distortion against rate.

    ``curve`` is pipeline.evaluation.rate_distortion.rate_distortion's output (arrays indexed by t).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    steps, rate, rmse = fig5_axis(curve), curve["rate_bpd"], curve["distortion_rmse"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
    panels = [
        (steps, rmse, "reverse process steps (T - t)", "distortion (RMSE, [0, 255])"),
        (steps, rate, "reverse process steps (T - t)", "rate (bits/dim)"),
        (rate, rmse, "rate (bits/dim)", "distortion (RMSE, [0, 255])"),
    ]
    for ax, (x, y, xlabel, ylabel) in zip(axes, panels, strict=True):
        ax.plot(x, y, color="tab:blue")
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
