"""Respaced sampling: fewer reverse steps for quick looks. NOT the paper's sampler.

The paper samples with all T steps (Algorithm 2). For a quick look at a model, this module runs
the reverse process on S < T of the original timesteps, evenly spaced and always including the
last one, as in improved-diffusion's ``respace.py`` (Nichol & Dhariwal 2021): the forward process
restricted to timesteps tau_1 < ... < tau_S is again Gaussian with
``beta'_i = 1 - alphabar_{tau_i} / alphabar_{tau_{i-1}}`` (alphabar before tau_1 is 1).

At each respaced step the network is evaluated at its original timestep, its x_0 prediction is
formed with the original process (so eps, xprev and xstart models all work), and the step's mean
is the respaced posterior mean of that prediction. The variance is the respaced fixed one; a
learned variance was trained for single steps and is replaced by the respaced sigma^2 = beta'
(fixedlarge). Outputs of this sampler are labelled "respaced, not the paper's sampler".
"""

from __future__ import annotations

from typing import Any, NoReturn

import numpy as np
import torch
from torch import Tensor

from pipeline.model.diffusion import GaussianDiffusion, Model

NOT_THE_PAPER = "respaced, not the paper's sampler"


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` of the 0-indexed timesteps 0 .. T-1, evenly spaced, ascending, with T-1 kept."""
    if not 0 < steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}] (got {steps})")
    picked = np.round(np.linspace(num_timesteps - 1, 0, steps)).astype(int)
    return sorted(set(picked.tolist()))


def sampler_label(num_timesteps: int, steps: int | None) -> str:
    """How samples were drawn, for manifests, MLflow tags and figure titles."""
    if steps is None or steps == num_timesteps:
        return f"Algorithm 2, {num_timesteps} steps"
    return f"{NOT_THE_PAPER}: {steps} of {num_timesteps} steps"


class RespacedDiffusion(GaussianDiffusion):
    """The reverse process of ``base`` on a subset of its timesteps (see the module docstring).

    Timesteps ``t`` of this process are 0 .. S-1; ``timesteps[t]`` is the original timestep the
    network sees. Only sampling is supported (p_sample, p_sample_loop, its progressive form).
    """

    def __init__(self, base: GaussianDiffusion, timesteps: list[int]) -> None:
        timesteps = sorted(timesteps)
        alphas_cumprod = base.alphas_cumprod[timesteps]
        betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
        var_type = "fixedlarge" if base.var_type == "learned" else base.var_type
        super().__init__(betas, base.mean_type, var_type, base.loss_type)
        self.base = base
        self.timesteps = np.asarray(timesteps, dtype=np.int64)
        self._map = torch.from_numpy(self.timesteps)

    def original_t(self, t: Tensor) -> Tensor:
        """The original timesteps of respaced timesteps t (long [B])."""
        return self._map.to(t.device)[t]

    def _p_mean_variance(
        self,
        model: Model,
        x_t: Tensor,
        t: Tensor,
        clip_denoised: bool,
        model_output: Tensor | None = None,
    ) -> dict[str, Tensor]:
        out = self.base._p_mean_variance(
            model, x_t, self.original_t(t), clip_denoised, model_output
        )
        pred_xstart = out["pred_xstart"]
        mean, _, _ = self._q_posterior(pred_xstart, x_t, t)
        name = "fixedlarge" if self.var_type == "fixedlarge" else "posterior"
        variance = self._extract(f"{name}_variance", t, x_t).expand_as(x_t)
        log_variance = self._extract(f"{name}_log_variance_clipped", t, x_t).expand_as(x_t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "model_output": out["model_output"],
        }

    def training_losses(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError("a respaced process is for sampling only")

    def calc_bpd_loop(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError("a respaced process is for sampling only; use the base process")
