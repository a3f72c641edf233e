"""Progressive lossy compression (paper Section 4.3, Fig. 5, Table 4) from the bound's terms.

After n = T - t + 1 reverse steps (1-based x_t received), the sender has transmitted x_T (the
prior term L_T) and x_{T-1} .. x_t (the KL terms L_{T-1} .. L_t): that is the rate. The receiver
estimates x_0 from x_t; the RMSE of that estimate on the [0, 255] scale is the distortion.
Sec. 4.3 defines it per image, sqrt(||x_0 - x0_hat||^2 / D); over a test set it is aggregated two
ways here: the mean of the per-image RMSEs (``distortion_rmse_per_image``, what Table 4 compares
with the paper: the paper's per-image definition, averaged) and the RMS, sqrt of the mean MSE
(``distortion_rmse``), which is never smaller (Jensen). After
all T steps the rate is the bound minus the decoder term L_0 (Table 4: 1.77581 bits/dim, RMSE
0.95136 for the paper's CIFAR10 model).

In 0-indexed arrays from calc_bpd_loop (index j = t - 1: x_t drawn at 0-indexed step j):
rate[j] = prior + sum_{k > j} vb[k] and distortion[j] = 127.5 * sqrt(xstart_mse[j]).
"""

from __future__ import annotations

import numpy as np

HALF_RANGE = 127.5  # [-1, 1] -> [0, 255]


def rate_distortion(
    vb_sum: np.ndarray,
    prior_sum: float,
    xstart_mse_sum: np.ndarray,
    count: int,
    xstart_rmse_sum: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Rate (bits/dim) and distortion (RMSE, [0, 255]) after each number of reverse steps.

    Args:
        vb_sum: [T] sum over images of calc_bpd_loop's ``vb`` (bits/dim per 0-indexed t).
        prior_sum: sum over images of ``prior_bpd``.
        xstart_mse_sum: [T] sum over images of ``xstart_mse`` ([-1, 1] units).
        xstart_rmse_sum: [T] sum over images of sqrt(``xstart_mse``) (per-image RMSE, [-1, 1]
            units), or None (then no ``distortion_rmse_per_image``).
        count: number of images summed (sums, not means of means, so blocks of any size
            aggregate exactly).

    Returns arrays indexed by 0-indexed t (length T): ``steps`` (reverse steps done when x_t
    is received, T - t + 1 for the 1-based t: Table 4's count), ``T_minus_t`` (Fig. 5's axis,
    the paper's "reverse process steps (T - t)"), ``rate_bpd``, ``distortion_rmse`` (RMS over
    the images) and ``distortion_rmse_per_image`` (mean of the per-image RMSEs).
    """
    vb = np.asarray(vb_sum, dtype=np.float64) / count
    T = vb.shape[0]
    # sum over k > j of vb[k]: a reversed cumulative sum shifted by one.
    after = np.concatenate([np.cumsum(vb[::-1])[::-1][1:], [0.0]])
    rate = prior_sum / count + after
    distortion = HALF_RANGE * np.sqrt(np.asarray(xstart_mse_sum, dtype=np.float64) / count)
    out = {
        "steps": T - np.arange(T),
        "T_minus_t": T - 1 - np.arange(T),
        "rate_bpd": rate,
        "distortion_rmse": distortion,
    }
    if xstart_rmse_sum is not None:
        per_image = np.asarray(xstart_rmse_sum, dtype=np.float64) / count
        out["distortion_rmse_per_image"] = HALF_RANGE * per_image
    return out


def table4_rows(
    curve: dict[str, np.ndarray], steps: tuple[int, ...]
) -> list[dict[str, float | None]]:
    """Rows of Table 4 (steps, rate, both distortions) for the requested reverse-step counts.

    ``distortion_rmse_per_image`` is None when the curve has no per-image aggregate.
    """
    T = len(curve["steps"])
    rows = []
    for n in steps:
        if not 1 <= n <= T:
            raise ValueError(f"reverse steps {n} outside [1, {T}]")
        j = T - n
        rows.append(
            {
                "steps": int(n),
                "rate_bpd": float(curve["rate_bpd"][j]),
                "distortion_rmse": float(curve["distortion_rmse"][j]),
                "distortion_rmse_per_image": (
                    float(curve["distortion_rmse_per_image"][j])
                    if "distortion_rmse_per_image" in curve
                    else None
                ),
            }
        )
    return rows


def table4_errors(
    prior_bpd: np.ndarray, vb: np.ndarray, xstart_mse: np.ndarray, steps: tuple[int, ...]
) -> list[dict[str, float | None]]:
    """Standard errors over the test images of Table 4's figures after ``steps`` reverse steps.

    Args:
        prior_bpd: [n] each image's prior term L_T (bits/dim).
        vb: [n, T] each image's KL terms by 0-indexed t (bits/dim), as calc_bpd_loop's ``vb``.
        xstart_mse: [n, T] each image's MSE of the x_0 estimate from x_t ([-1, 1] units).
        steps: reverse-step counts (Table 4's rows), each in [1, T].

    Returns, per step count, the standard error of the mean (std with ddof 1 over sqrt(n)) of
    the per-image rate ``rate_bpd_se`` and per-image RMSE ``distortion_rmse_per_image_se`` (both
    means over images, as :func:`rate_distortion`), and ``distortion_rmse_se``, the RMS's by the
    delta method: 127.5 * se(MSE) / (2 sqrt(mean MSE)). None where n < 2 (or the MSE is 0).
    """
    vb = np.asarray(vb, dtype=np.float64)
    mse = np.asarray(xstart_mse, dtype=np.float64)
    prior = np.asarray(prior_bpd, dtype=np.float64)
    n, T = vb.shape
    rows = []
    for count in steps:
        if not 1 <= count <= T:
            raise ValueError(f"reverse steps {count} outside [1, {T}]")
        j = T - count
        rate = prior + vb[:, j + 1 :].sum(axis=1)  # [n]: L_T + L_{T-1} .. L_{t}, per image
        mean_mse = float(mse[:, j].mean()) if n else 0.0
        mse_se = _standard_error(mse[:, j])
        rows.append(
            {
                "steps": int(count),
                "rate_bpd_se": _standard_error(rate),
                "distortion_rmse_per_image_se": _scaled(
                    _standard_error(np.sqrt(mse[:, j])), HALF_RANGE
                ),
                "distortion_rmse_se": (
                    HALF_RANGE * mse_se / (2.0 * np.sqrt(mean_mse))
                    if mse_se is not None and mean_mse > 0
                    else None
                ),
            }
        )
    return rows


def _standard_error(values: np.ndarray) -> float | None:
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) >= 2 else None


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else factor * value
