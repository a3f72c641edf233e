"""Rate-distortion bookkeeping against a direct, loop-based reading of Section 4.3."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.evaluation.rate_distortion import rate_distortion, table4_errors, table4_rows
from pipeline.model.diffusion import GaussianDiffusion, bits_per_dim, linear_beta_schedule
from pipeline.report.paper import TABLE4


def test_rate_is_prior_plus_the_kl_terms_already_sent():
    rng = np.random.default_rng(0)
    T, B = 12, 5
    vb, prior, mse = rng.uniform(0, 1, (B, T)), rng.uniform(0, 0.01, B), rng.uniform(0, 1, (B, T))
    curve = rate_distortion(vb.sum(0), prior.sum(), mse.sum(0), B)
    for n in range(1, T + 1):  # n reverse steps received: 1-based x_t with t = T - n + 1
        t = T - n + 1
        sent = prior.mean() + sum(vb[:, k].mean() for k in range(t, T))  # x_T, then x_{T-1}..x_t
        j = t - 1
        assert curve["steps"][j] == n
        assert math.isclose(curve["rate_bpd"][j], sent, rel_tol=1e-12)
        assert math.isclose(curve["distortion_rmse"][j], 127.5 * math.sqrt(mse[:, j].mean()))
    # After all T steps: the whole bound but the decoder term L_0.
    total = prior.mean() + vb.sum(1).mean()
    assert math.isclose(curve["rate_bpd"][0], total - vb[:, 0].mean(), rel_tol=1e-12)


def test_blocks_aggregate_exactly():
    rng = np.random.default_rng(1)
    vb, prior, mse = rng.uniform(0, 1, (7, 4)), rng.uniform(0, 1, 7), rng.uniform(0, 1, (7, 4))
    whole = rate_distortion(vb.sum(0), prior.sum(), mse.sum(0), 7)
    parts = [(vb[:3], prior[:3], mse[:3]), (vb[3:], prior[3:], mse[3:])]  # blocks of 3 and 4
    summed = rate_distortion(
        sum(p[0].sum(0) for p in parts),
        sum(p[1].sum() for p in parts),
        sum(p[2].sum(0) for p in parts),
        7,
    )
    for key in whole:
        np.testing.assert_allclose(summed[key], whole[key], rtol=1e-12)


def test_table4_rows_follow_the_papers_step_convention():
    T = 1000
    curve = {
        "steps": T - np.arange(T),
        "rate_bpd": np.linspace(2, 0, T),
        "distortion_rmse": np.linspace(1, 70, T),
    }
    rows = table4_rows(curve, tuple(n for n, _, _ in TABLE4))
    assert [r["steps"] for r in rows] == [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100]
    assert rows[0]["rate_bpd"] == 2.0  # 1000 steps: x_1 received
    with pytest.raises(ValueError, match="outside"):
        table4_rows(curve, (1001,))


def test_nats_to_bits_per_dim():
    D = 3 * 32 * 32
    assert math.isclose(bits_per_dim(D * math.log(2.0), D), 1.0)
    assert math.isclose(bits_per_dim(1000.0, D), 1000.0 / (3072 * math.log(2)))
    # calc_bpd_loop's per-term bits/dim are per-dimension means of nats divided by ln 2.
    d = GaussianDiffusion(linear_beta_schedule(4, 0.1, 0.4), "eps", "fixedlarge", "kl")
    x = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    prior_nats_per_dim = d.prior_bpd(x).item() * math.log(2)
    ab = np.prod(1 - linear_beta_schedule(4, 0.1, 0.4))
    ref = 0.5 * (-math.log(1 - ab) + (1 - ab) - 1)  # KL(N(0, 1 - ab) || N(0, 1)) per dim
    assert math.isclose(prior_nats_per_dim, ref, rel_tol=1e-10)


def test_distortion_both_aggregations_of_the_per_image_rmse():
    """Sec. 4.3: distortion per image is sqrt(||x_0 - x0_hat||^2 / D); over images we give the
    mean of those (what Table 4 compares) and the RMS, which Jensen makes no smaller."""
    rng = np.random.default_rng(2)
    B, T = 6, 5
    vb, prior = rng.uniform(0, 1, (B, T)), rng.uniform(0, 0.01, B)
    mse = rng.uniform(0, 1, (B, T)) ** 3  # spread-out per-image MSEs
    curve = rate_distortion(vb.sum(0), prior.sum(), mse.sum(0), B, np.sqrt(mse).sum(0))
    for j in range(T):
        per_image = [127.5 * math.sqrt(mse[b, j]) for b in range(B)]
        assert math.isclose(curve["distortion_rmse_per_image"][j], np.mean(per_image))
        assert math.isclose(curve["distortion_rmse"][j], 127.5 * math.sqrt(mse[:, j].mean()))
    assert np.all(curve["distortion_rmse_per_image"] < curve["distortion_rmse"])
    rows = table4_rows(curve, (T, 1))
    assert rows[0]["distortion_rmse_per_image"] == curve["distortion_rmse_per_image"][0]


def test_fig5_axis_is_t_rev_and_table4_counts_one_more():
    """Fig. 5 plots against T - t (0 at x_T); Table 4's rows count T - t + 1 reverse steps."""
    from pipeline.evaluation.figures import fig5_axis

    T = 10
    curve = rate_distortion(np.ones(T), 0.0, np.ones(T), 1)
    axis = fig5_axis(curve)
    for t in range(1, T + 1):  # 1-based t; index t - 1
        assert axis[t - 1] == T - t
        assert curve["steps"][t - 1] == T - t + 1
    assert axis.max() == T - 1 and axis.min() == 0


def test_table4_errors_are_standard_errors_over_the_images():
    """Per image: rate = L_T + L_{T-1} .. L_t, RMSE = 127.5 sqrt(MSE); their standard errors of
    the mean by a loop over images; the RMS's by the delta method, checked against the spread
    of the RMS over many redrawn image sets of the same distribution."""
    rng = np.random.default_rng(3)
    B, T = 9, 6
    vb, prior = rng.uniform(0, 1, (B, T)), rng.uniform(0, 0.1, B)
    mse = rng.uniform(0.01, 1, (B, T)) ** 2
    rows = table4_errors(prior, vb, mse, (T, 3, 1))
    for row in rows:
        n = row["steps"]
        j = T - n
        rate = [prior[b] + sum(vb[b, k] for k in range(j + 1, T)) for b in range(B)]
        rmse = [127.5 * math.sqrt(mse[b, j]) for b in range(B)]
        assert math.isclose(row["rate_bpd_se"], np.std(rate, ddof=1) / math.sqrt(B))
        assert math.isclose(row["distortion_rmse_per_image_se"], np.std(rmse, ddof=1) / 3.0)
    # the delta method's error of 127.5 sqrt(mean MSE) against a Monte Carlo of the same
    draws = rng.uniform(0.01, 1, (4000, 400)) ** 2  # 4000 test sets of 400 images
    rms = 127.5 * np.sqrt(draws.mean(axis=1))
    (one,) = table4_errors(np.zeros(400), np.zeros((400, 1)), draws[0][:, None], (1,))
    assert one["distortion_rmse_se"] == pytest.approx(rms.std(ddof=1), rel=0.1)
    # one image: no error; steps outside [1, T]: refused
    (single,) = table4_errors(prior[:1], vb[:1], mse[:1], (T,))
    assert single["rate_bpd_se"] is None and single["distortion_rmse_se"] is None
    with pytest.raises(ValueError, match="outside"):
        table4_errors(prior, vb, mse, (T + 1,))
