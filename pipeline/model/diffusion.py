"""GaussianDiffusion: the DDPM forward process, reverse process, losses, sampler and bound.

Ho, Jain, Abbeel (2020), with the method names of the official implementation. Timesteps are
0-indexed: ``t = 0 .. T-1`` here is the paper's ``t = 1 .. T``, so ``t = 0`` is the decoder
term L_0 and ``t = T-1`` produces x_T's successor in the reverse chain.

Conventions: images are [B, C, H, W] tensors in [-1, 1]; the schedule tables are float64 numpy
arrays cast to the input's dtype at use; likelihood terms are in nats inside the class and in
bits per dimension (nats / (D ln 2), D = C*H*W, as a per-dimension mean) at ``calc_bpd_loop``.

A denoising model is any callable ``model(x_t, t) -> Tensor`` with x_t [B, C, H, W] and t a long
tensor [B]; it returns C channels, or 2C when the variance is learned (mean part, log variance).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.choices import LOSS_TYPES, MEAN_TYPES, VAR_TYPES, LossType, MeanType, VarType
from pipeline.model.losses import (
    BITS_PER_NAT,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)

Model = Callable[[Tensor, Tensor], Tensor]
NoiseFn = Callable[[tuple[int, ...]], Tensor]
"""Draws standard normal noise of a given shape [B, C, H, W] (a source of reproducibility)."""


def linear_beta_schedule(
    num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """The paper's schedule: betas linear from beta_start to beta_end, float64 [T]."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be at least 1 (got {num_timesteps})")
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


class GaussianDiffusion:
    """The DDPM process for one parameterisation (a Table-2 row).

    Args:
        betas: 1-D array of T noise variances, each in (0, 1).
        mean_type: what the model predicts: ``eps`` (the noise), ``xprev`` (the posterior mean
            mu~, the paper's "mu~ prediction") or ``xstart`` (x_0).
        var_type: ``fixedlarge`` (sigma_t^2 = beta_t, the first step taking beta~ of the second),
            ``fixedsmall`` (sigma_t^2 = beta~_t, log clipped at beta~ of the second step) or
            ``learned`` (the model's second C channels are a log variance).
        loss_type: ``mse`` (unweighted MSE on the model's target; with ``eps`` this is L_simple)
            or ``kl`` (the variational bound term L_t; L_0 is the decoder NLL).
    """

    def __init__(
        self,
        betas: np.ndarray | list[float],
        mean_type: MeanType = "eps",
        var_type: VarType = "fixedlarge",
        loss_type: LossType = "mse",
    ) -> None:
        for name, value, allowed in (
            ("mean_type", mean_type, MEAN_TYPES),
            ("var_type", var_type, VAR_TYPES),
            ("loss_type", loss_type, LOSS_TYPES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        if var_type == "learned" and loss_type != "kl":
            raise ValueError(
                "a learned variance gets no gradient from the mse loss: use loss_type 'kl' "
                "(the variational bound) with var_type 'learned'"
            )
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array (got shape {betas.shape})")
        if not (np.all(np.isfinite(betas)) and np.all(betas > 0) and np.all(betas < 1)):
            raise ValueError(
                f"betas must lie in (0, 1) (got min {betas.min()!r}, max {betas.max()!r})"
            )
        self.mean_type, self.var_type, self.loss_type = mean_type, var_type, loss_type
        self.betas = betas
        self.num_timesteps = T = int(betas.size)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # q(x_{t-1} | x_t, x_0): beta~_t and mu~_t = coef1 x_0 + coef2 x_t (paper Eq. 6-7)
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # beta~ at the first step is 0: its log takes beta~ of the second step instead.
        first = self.posterior_variance[1] if T > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        # fixedlarge: sigma_t^2 = beta_t, but beta~ of the second step at the first step
        # (a better decoder likelihood), as in the official code.
        self.fixedlarge_variance = np.append(first, betas[1:])
        self.fixedlarge_log_variance_clipped = np.log(self.fixedlarge_variance)
        self._tables: dict[tuple[str, str], Tensor] = {}

    # -----------------------------------------------------------------------------------------
    # Helpers

    def _extract(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Table ``name`` at timesteps t, as [B, 1, ..., 1] in like's dtype and device."""
        key = (name, str(like.device))
        table = self._tables.get(key)
        if table is None:
            table = torch.from_numpy(getattr(self, name)).to(like.device)
            self._tables[key] = table
        out = table[t].to(like.dtype)
        return out.reshape(t.shape[0], *([1] * (like.ndim - 1)))

    def check_timesteps(self, t: Tensor, batch: int) -> None:
        """Raise ValueError unless t is an integer tensor [batch] with values in [0, T).

        The range is checked for CPU tensors only: reading an accelerator tensor would stall
        the device queue on every step. The loops of this class build their own t.
        """
        if not isinstance(t, Tensor) or t.dtype.is_floating_point or t.is_complex():
            raise ValueError(f"t must be an integer tensor of timesteps (got {t!r:.80})")
        if t.shape != (batch,):
            raise ValueError(
                f"t must have shape ({batch},), one step per image (got {tuple(t.shape)})"
            )
        if t.device.type == "cpu" and t.numel() and (t.min() < 0 or t.max() >= self.num_timesteps):
            raise ValueError(
                f"t must lie in [0, {self.num_timesteps}) (got min {int(t.min())}, "
                f"max {int(t.max())}); timesteps are 0-indexed"
            )

    @staticmethod
    def _check_same_shape(a: Tensor, b: Tensor, what: str) -> None:
        if a.shape != b.shape:
            raise ValueError(f"{what}: shapes differ ({tuple(a.shape)} vs {tuple(b.shape)})")

    def model_output_channels(self, channels: int) -> int:
        """Channels the model must return for images with ``channels`` channels."""
        return 2 * channels if self.var_type == "learned" else channels

    # -----------------------------------------------------------------------------------------
    # Forward process q

    def q_mean_variance(self, x_start: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log variance of q(x_t | x_0) (paper Eq. 4)."""
        self.check_timesteps(t, x_start.shape[0])
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._extract("alphas_cumprod", t, x_start).neg().add(1.0)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start)
        return mean, variance.expand_as(x_start), log_variance.expand_as(x_start)

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(alphabar_t) x_0, (1 - alphabar_t) I)."""
        self.check_timesteps(t, x_start.shape[0])
        if noise is None:
            noise = torch.randn_like(x_start)
        self._check_same_shape(x_start, noise, "q_sample(x_start, noise)")
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) (paper Eq. 6-7)."""
        self._check_same_shape(x_start, x_t, "q_posterior_mean_variance(x_start, x_t)")
        self.check_timesteps(t, x_start.shape[0])
        return self._q_posterior(x_start, x_t, t)

    # -----------------------------------------------------------------------------------------
    # Reverse process p

    def _predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        # x_0 = (x_t - sqrt(1 - alphabar_t) eps) / sqrt(alphabar_t)
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def _predict_xstart_from_xprev(self, x_t: Tensor, t: Tensor, xprev: Tensor) -> Tensor:
        # invert mu~ = coef1 x_0 + coef2 x_t for x_0
        coef1 = self._extract("posterior_mean_coef1", t, x_t)
        coef2 = self._extract("posterior_mean_coef2", t, x_t)
        return (xprev - coef2 * x_t) / coef1

    def _predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart
        ) / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t)

    def _run_model(self, model: Model, x_t: Tensor, t: Tensor) -> Tensor:
        out = model(x_t, t)
        want = self.model_output_channels(x_t.shape[1])
        if out.ndim != x_t.ndim or out.shape[0] != x_t.shape[0] or out.shape[2:] != x_t.shape[2:]:
            raise ValueError(
                f"model output has shape {tuple(out.shape)}; expected "
                f"({x_t.shape[0]}, {want}, {', '.join(map(str, x_t.shape[2:]))})"
            )
        if out.shape[1] != want:
            raise ValueError(
                f"model returns {out.shape[1]} channels but var_type {self.var_type!r} needs "
                f"{want} ({'mean and log variance' if want != x_t.shape[1] else 'the mean only'})"
            )
        return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out

    def p_mean_variance(
        self,
        model: Model,
        x_t: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        model_output: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Mean and variance of p(x_{t-1} | x_t), and the predicted x_0.

        With ``clip_denoised`` the predicted x_0 is clipped to [-1, 1] before the posterior mean
        is formed (eps and xstart types), as in the official code; an xprev model's mean is its
        own output. Returns a dict with ``mean``, ``variance``, ``log_variance``,
        ``pred_xstart`` (all [B, C, H, W]) and ``model_output``.
        """
        self.check_timesteps(t, x_t.shape[0])
        return self._p_mean_variance(model, x_t, t, clip_denoised, model_output)

    def _p_mean_variance(
        self,
        model: Model,
        x_t: Tensor,
        t: Tensor,
        clip_denoised: bool,
        model_output: Tensor | None = None,
    ) -> dict[str, Tensor]:
        if model_output is None:
            model_output = self._run_model(model, x_t, t)
        C = x_t.shape[1]
        if self.var_type == "learned":
            mean_output, log_variance = model_output[:, :C], model_output[:, C:]
            variance = torch.exp(log_variance)
        else:
            mean_output = model_output
            name = "fixedlarge" if self.var_type == "fixedlarge" else "posterior"
            variance = self._extract(f"{name}_variance", t, x_t).expand_as(x_t)
            log_variance = self._extract(f"{name}_log_variance_clipped", t, x_t).expand_as(x_t)

        def maybe_clip(x: Tensor) -> Tensor:
            return x.clamp(-1.0, 1.0) if clip_denoised else x

        if self.mean_type == "xprev":
            pred_xstart = maybe_clip(self._predict_xstart_from_xprev(x_t, t, mean_output))
            mean = mean_output
        else:
            if self.mean_type == "xstart":
                pred_xstart = maybe_clip(mean_output)
            else:
                pred_xstart = maybe_clip(self._predict_xstart_from_eps(x_t, t, mean_output))
            mean, _, _ = self._q_posterior(pred_xstart, x_t, t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "model_output": model_output,
        }

    def _q_posterior(
        self, x_start: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        mean = (
            self._extract("posterior_mean_coef1", t, x_t) * x_start
            + self._extract("posterior_mean_coef2", t, x_t) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # -----------------------------------------------------------------------------------------
    # Sampling (Algorithm 2)

    def p_sample(
        self,
        model: Model,
        x_t: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """One reverse step: x_{t-1} = mu_theta(x_t, t) + sigma_t z, with z = 0 where t == 0.

        Returns ``sample`` (x_{t-1}) and ``pred_xstart``. ``noise`` defaults to torch.randn_like.
        """
        self.check_timesteps(t, x_t.shape[0])
        if noise is None:
            noise = torch.randn_like(x_t)
        self._check_same_shape(x_t, noise, "p_sample(x_t, noise)")
        return self._p_sample(model, x_t, t, clip_denoised, noise)

    def _p_sample(
        self, model: Model, x_t: Tensor, t: Tensor, clip_denoised: bool, noise: Tensor
    ) -> dict[str, Tensor]:
        out = self._p_mean_variance(model, x_t, t, clip_denoised)
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop_progressive(
        self,
        model: Model,
        shape: tuple[int, ...],
        noise_fn: NoiseFn | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        clip_denoised: bool = True,
    ) -> Iterator[dict[str, Any]]:
        """Run Algorithm 2, yielding ``{"t", "sample", "pred_xstart"}`` after every step.

        Noise comes from ``noise_fn(shape)`` when given (x_T first, then one draw per step with
        t > 0, in order), else from torch.randn with ``generator`` on ``device``.
        """
        if noise_fn is None:

            def noise_fn(s: tuple[int, ...]) -> Tensor:
                return torch.randn(s, generator=generator, device=device)

        x = noise_fn(tuple(shape))
        batch = x.shape[0]
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((batch,), i, dtype=torch.long, device=x.device)
            noise = noise_fn(tuple(shape)).to(x.device) if i > 0 else torch.zeros_like(x)
            out = self._p_sample(model, x, t, clip_denoised, noise)
            x = out["sample"]
            yield {"t": i, "sample": x, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model: Model,
        shape: tuple[int, ...],
        noise_fn: NoiseFn | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        clip_denoised: bool = True,
    ) -> Tensor:
        """Algorithm 2: x_T ~ N(0, I), then T reverse steps; returns x_0 [B, C, H, W], unclipped."""
        final: Tensor | None = None
        for out in self.p_sample_loop_progressive(
            model, shape, noise_fn, generator, device, clip_denoised
        ):
            final = out["sample"]
        assert final is not None
        return final

    # -----------------------------------------------------------------------------------------
    # Losses and the variational bound

    def _vb_terms(
        self,
        model: Model,
        x_start: Tensor,
        x_t: Tensor,
        t: Tensor,
        clip_denoised: bool,
        model_output: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The bound's term at t per image, in nats per dimension: L_t (KL) or L_0 (decoder)."""
        true_mean, _, true_log_variance = self._q_posterior(x_start, x_t, t)
        out = self._p_mean_variance(model, x_t, t, clip_denoised, model_output)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]))
        decoder_nll = -mean_flat(
            discretized_gaussian_log_likelihood(
                x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
            )
        )
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self, model: Model, x_start: Tensor, t: Tensor, noise: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Per-image training loss at timesteps t (Algorithm 1), shape [B].

        ``kl``: the bound's term L_t in nats per dimension (the decoder NLL at t = 0). The
        official code trains on the same term in bits (a constant factor 1 / ln 2).
        ``mse``: mean squared error between the model's output and its target (eps: the noise,
        L_simple; xprev: the posterior mean mu~; xstart: x_0).
        Returns ``loss`` and the term it came from (``vb`` or ``mse``).
        """
        self.check_timesteps(t, x_start.shape[0])
        if noise is None:
            noise = torch.randn_like(x_start)
        self._check_same_shape(x_start, noise, "training_losses(x_start, noise)")
        x_t = self.q_sample(x_start, t, noise)
        if self.loss_type == "kl":
            vb = self._vb_terms(model, x_start, x_t, t, clip_denoised=False)["output"]
            return {"loss": vb, "vb": vb}
        model_output = self._run_model(model, x_t, t)
        if self.mean_type == "xprev":
            target = self._q_posterior(x_start, x_t, t)[0]
        elif self.mean_type == "xstart":
            target = x_start
        else:
            target = noise
        mse = mean_flat((target - model_output) ** 2)
        return {"loss": mse, "mse": mse}

    def prior_bpd(self, x_start: Tensor) -> Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension, shape [B]."""
        t = torch.full(
            (x_start.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x_start.device
        )
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        kl = normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(log_variance))
        return mean_flat(kl) * BITS_PER_NAT

    @torch.no_grad()
    def calc_bpd_loop(
        self,
        model: Model,
        x_start: Tensor,
        clip_denoised: bool = True,
        noise_fn: NoiseFn | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """The full variational bound of each image, term by term, in bits per dimension.

        For every t (T model evaluations), x_t is drawn from q(x_t | x_0) with fresh noise
        (``noise_fn`` or torch.randn with ``generator``, drawn for t = T-1 down to 0).

        Returns:
            total_bpd [B]: prior_bpd + sum over t of vb (the NLL bound, Table 1).
            prior_bpd [B]: L_T.
            vb [B, T]: L_t in bits/dim at each 0-indexed t (vb[:, 0] is the decoder L_0).
            xstart_mse [B, T]: mean squared error of the predicted x_0 ([-1, 1] units).
            mse [B, T]: mean squared error of the implied eps against the true noise.
        """
        if noise_fn is None:

            def noise_fn(s: tuple[int, ...]) -> Tensor:
                return torch.randn(s, generator=generator, device=x_start.device)

        B, T = x_start.shape[0], self.num_timesteps
        vb = torch.zeros(B, T, dtype=torch.float64, device=x_start.device)
        xstart_mse = torch.zeros_like(vb)
        mse = torch.zeros_like(vb)
        for i in reversed(range(T)):
            t = torch.full((B,), i, dtype=torch.long, device=x_start.device)
            noise = noise_fn(tuple(x_start.shape)).to(x_start.device)
            x_t = self.q_sample(x_start, t, noise)
            out = self._vb_terms(model, x_start, x_t, t, clip_denoised)
            vb[:, i] = out["output"].double() * BITS_PER_NAT
            xstart_mse[:, i] = mean_flat((out["pred_xstart"] - x_start) ** 2).double()
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse[:, i] = mean_flat((eps - noise) ** 2).double()
        prior = self.prior_bpd(x_start).double()
        return {
            "total_bpd": vb.sum(dim=1) + prior,
            "prior_bpd": prior,
            "vb": vb,
            "xstart_mse": xstart_mse,
            "mse": mse,
        }


def bits_per_dim(nats: Tensor | float, num_dims: int) -> Tensor | float:
    """Convert a total in nats per image to bits per dimension: nats / (D ln 2)."""
    return nats / (num_dims * math.log(2.0))
