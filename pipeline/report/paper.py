"""The paper's published numbers (Ho, Jain, Abbeel 2020), as data for the report's tables.

Sources: Table 1 (CIFAR10 sample quality and NLL), Table 2 (the ablation over the mean
parameterisation and objective; None marks the rows the paper leaves empty because training was
unstable), Table 4 (rate and distortion along the reverse process, CIFAR10 test set, L_simple
model) and Section 4's 256x256 FIDs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Table2Row:
    """One Table-2 row and the variant of params.yaml that reproduces it."""

    variant: str
    mean: str  # the paper's "mean" column
    objective: str  # the paper's objective column
    is_mean: float | None  # None: the paper reports no score (unstable training)
    is_std: float | None
    fid: float | None


# The splits of the paper's IS (the original Inception Score code's default): its "± 0.11" is
# the std over them, so the standard error of its IS is 0.11 / sqrt(IS_SPLITS).
IS_SPLITS = 10

TABLE2 = (
    Table2Row("xprev_learned_kl", "mu~ prediction", "L, learned diagonal Sigma", 7.28, 0.10, 23.69),
    Table2Row("xprev_fixed_kl", "mu~ prediction", "L, fixed isotropic Sigma", 8.06, 0.09, 13.22),
    Table2Row("xprev_fixed_mse", "mu~ prediction", "||mu~ - mu_theta||^2", None, None, None),
    Table2Row("eps_learned_kl", "eps prediction", "L, learned diagonal Sigma", None, None, None),
    Table2Row("eps_fixed_kl", "eps prediction", "L, fixed isotropic Sigma", 7.67, 0.13, 13.51),
    Table2Row(
        "eps_fixed_mse", "eps prediction", "||eps - eps_theta||^2 (L_simple)", 9.46, 0.11, 3.17
    ),
)


@dataclass(frozen=True)
class Table1Row:
    """One of the paper's own Table-1 rows (CIFAR10)."""

    variant: str
    model: str
    is_mean: float
    is_std: float
    fid_train: float
    fid_test: float | None
    nll_test: float  # bits/dim, an upper bound ("<=")
    nll_train: float


TABLE1 = (
    Table1Row(
        "eps_fixed_kl", "Ours (L, fixed isotropic Sigma)", 7.67, 0.13, 13.51, None, 3.70, 3.69
    ),
    Table1Row("eps_fixed_mse", "Ours (L_simple)", 9.46, 0.11, 3.17, 5.24, 3.75, 3.72),
)

# Table 4: (reverse process steps T - t + 1, rate in bits/dim, distortion RMSE on [0, 255]).
TABLE4 = (
    (1000, 1.77581, 0.95136),
    (900, 0.11994, 12.02277),
    (800, 0.05415, 18.47482),
    (700, 0.02866, 24.43656),
    (600, 0.01507, 30.80948),
    (500, 0.00716, 38.03236),
    (400, 0.00282, 46.12765),
    (300, 0.00081, 54.18826),
    (200, 0.00013, 60.97170),
    (100, 0.00000, 67.60125),
)
TABLE4_VARIANT = "eps_fixed_mse"  # the L_simple model of Section 4.3

# Progressive coding totals (Section 4.3): codelength = rate + distortion, in bits/dim.
CODELENGTH_BPD, RATE_BPD, DISTORTION_BPD, DISTORTION_RMSE = 3.75, 1.78, 1.97, 0.95

# 256x256 FIDs (Section 4.1 / Table 3 text), against the training set.
LSUN_FID = {
    "lsun_bedroom": 6.36,  # the large model: 4.90
    "lsun_church_outdoor": 7.89,
    "lsun_cat": 19.75,
}
