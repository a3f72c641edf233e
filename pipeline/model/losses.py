"""Gaussian KL divergence and the discretized Gaussian decoder likelihood, in nats.

These are the two kinds of term in the variational bound (paper Eq. 5): L_{t-1} compares two
Gaussians, L_0 is the log-likelihood of 8-bit pixels under the decoder p(x_0 | x_1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BITS_PER_NAT = 1.0 / math.log(2.0)
# Half a pixel bin in [-1, 1] units: uint8 k maps to 2k/255 - 1, so neighbours are 2/255 apart.
HALF_BIN = 1.0 / 255.0
_EDGE = 0.999  # pixels at -1 (or +1) are the edge bins, which extend to -inf (or +inf)
_MIN_PROB = 1e-12  # floor of a bin's probability before the log, as in the official code


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every axis but the first: [B, ...] -> [B]."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) per element, in nats.

    Arguments broadcast against each other.
    """
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _log_ndtr_diff(a: Tensor, b: Tensor) -> Tensor:
    """log(Phi(a) - Phi(b)) for a > b, accurate when both lie in the lower tail."""
    log_a: Tensor = torch.special.log_ndtr(a)
    return log_a + torch.log(-torch.expm1(torch.special.log_ndtr(b) - log_a))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log p(x) per element, in nats, for pixels x in {2k/255 - 1 : k = 0..255}.

    Each pixel value owns the bin [x - 1/255, x + 1/255] of a Gaussian N(means, exp(log_scales)^2),
    and the edge bins extend to -inf (x = -1) and +inf (x = 1), so the 256 probabilities of a
    pixel sum to one (paper Eq. 13). Uses the exact Gaussian CDF in log space, taking each bin's
    mass from the nearer tail (Phi(u) - Phi(l) = Phi(-l) - Phi(-u)) so that float32 keeps its
    precision far from the mean; computed in float64 (it is elementwise and cheap) and returned in
    the inputs' dtype. As in the official code (which used a tanh approximation of
    the CDF), a bin's probability is floored at 1e-12 before the log.

    Args:
        x: [B, C, H, W] data scaled to [-1, 1].
        means, log_scales: broadcastable to x; log_scales is the log standard deviation.
    """
    if x.shape != means.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but means {tuple(means.shape)}")
    out_dtype = torch.promote_types(x.dtype, means.dtype)
    x, means, log_scales = x.double(), means.double(), log_scales.double()
    inv_std = torch.exp(-log_scales)
    centered = x - means
    upper = (centered + HALF_BIN) * inv_std
    lower = (centered - HALF_BIN) * inv_std
    above = centered > 0
    # Reflect bins above the mean into the lower tail: same mass, no cancellation.
    hi = torch.where(above, -lower, upper)
    lo = torch.where(above, -upper, lower)
    log_mass = _log_ndtr_diff(hi, lo)
    log_prob = torch.where(
        x < -_EDGE,
        torch.special.log_ndtr(upper),  # P(X <= upper edge)
        torch.where(x > _EDGE, torch.special.log_ndtr(-lower), log_mass),  # P(X >= lower edge)
    )
    return log_prob.clamp(min=math.log(_MIN_PROB)).to(out_dtype)
