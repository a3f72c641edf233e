"""GaussianDiffusion against the paper's formulas, recomputed here in numpy float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from pipeline.model.diffusion import GaussianDiffusion, linear_beta_schedule
from pipeline.model.losses import discretized_gaussian_log_likelihood, normal_kl

T = 10
BETAS = np.linspace(0.01, 0.3, T)  # a short schedule with large steps: every term matters
SHAPE = (3, 3, 4, 4)


def tables(betas: np.ndarray) -> dict[str, np.ndarray]:
    """The paper's quantities, written out independently of pipeline.model.diffusion."""
    alphas = 1.0 - betas
    abar = np.array([np.prod(alphas[: i + 1]) for i in range(len(betas))])
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = (1 - abar_prev) / (1 - abar) * betas
    return {
        "alphas": alphas,
        "abar": abar,
        "abar_prev": abar_prev,
        "post_var": post_var,
        "coef1": np.sqrt(abar_prev) * betas / (1 - abar),
        "coef2": np.sqrt(alphas) * (1 - abar_prev) / (1 - abar),
        "fixedlarge": np.concatenate([[post_var[1]], betas[1:]]),
        "fixedsmall_log": np.log(np.concatenate([[post_var[1]], post_var[1:]])),
    }


def gauss_kl(m1, lv1, m2, lv2):
    return 0.5 * (lv2 - lv1 + (np.exp(lv1) + (m1 - m2) ** 2) / np.exp(lv2) - 1.0)


def decoder_logp(x, mean, log_std):
    """log P(bin of x) under N(mean, std^2), edges to +-inf, in float64 with scipy."""
    std = np.exp(log_std)
    upper = np.where(x > 0.999, np.inf, x + 1 / 255)
    lower = np.where(x < -0.999, -np.inf, x - 1 / 255)
    zu, zl = (upper - mean) / std, (lower - mean) / std
    mass = np.where(x > mean, norm.sf(zl) - norm.sf(zu), norm.cdf(zu) - norm.cdf(zl))
    return np.log(np.maximum(mass, 1e-12))


def rand(*shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape))


def pixels(seed=0):
    """Images on the uint8 lattice, scaled to [-1, 1], float64."""
    k = np.random.default_rng(seed).integers(0, 256, SHAPE)
    return torch.from_numpy(2 * k / 255 - 1)


class LinearModel(torch.nn.Module):
    """A deterministic stand-in network: out = a_t * x + b_t (per timestep), float64."""

    def __init__(self, out_channels=3, seed=1):
        super().__init__()
        g = np.random.default_rng(seed)
        self.a = torch.from_numpy(g.uniform(-0.5, 0.5, (T, out_channels)))
        self.b = torch.from_numpy(g.uniform(-0.2, 0.2, (T, out_channels)))
        self.out_channels = out_channels

    def forward(self, x, t):
        reps = self.out_channels // x.shape[1]
        x = x.repeat(1, reps, 1, 1)
        return self.a[t][:, :, None, None] * x + self.b[t][:, :, None, None]

    def numpy(self, x, t):
        return self.forward(torch.from_numpy(x), torch.as_tensor(t)).numpy()


@pytest.fixture
def tab():
    return tables(BETAS)


def test_linear_schedule_is_the_papers():
    b = linear_beta_schedule()
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == 1e-4 and b[-1] == 0.02
    np.testing.assert_allclose(np.diff(b), (0.02 - 1e-4) / 999, rtol=1e-9)


def test_tables_float64_and_match_formulas(tab):
    d = GaussianDiffusion(BETAS)
    for name, ref in [
        ("alphas_cumprod", tab["abar"]),
        ("alphas_cumprod_prev", tab["abar_prev"]),
        ("posterior_variance", tab["post_var"]),
        ("posterior_mean_coef1", tab["coef1"]),
        ("posterior_mean_coef2", tab["coef2"]),
        ("posterior_log_variance_clipped", tab["fixedsmall_log"]),
    ]:
        arr = getattr(d, name)
        assert arr.dtype == np.float64, name
        np.testing.assert_allclose(arr, ref, rtol=1e-12, err_msg=name)
    assert d.posterior_variance[0] == 0.0  # beta~_1 = 0, hence the clipped log


def test_q_sample_moments(tab):
    d = GaussianDiffusion(BETAS)
    x0 = pixels()[:1].expand(20000, *SHAPE[1:]).contiguous()
    t = torch.full((20000,), 6, dtype=torch.long)
    torch.manual_seed(0)
    xt = d.q_sample(x0, t).numpy()
    np.testing.assert_allclose(xt.mean(0), np.sqrt(tab["abar"][6]) * x0[0].numpy(), atol=0.03)
    np.testing.assert_allclose(xt.var(0), 1 - tab["abar"][6], rtol=0.05)


def test_q_mean_variance(tab):
    d = GaussianDiffusion(BETAS)
    x0, t = pixels(), torch.tensor([0, 4, 9])
    mean, var, log_var = d.q_mean_variance(x0, t)
    ab = tab["abar"][t.numpy()][:, None, None, None]
    np.testing.assert_allclose(mean.numpy(), np.sqrt(ab) * x0.numpy(), rtol=1e-12)
    np.testing.assert_allclose(var.numpy(), np.broadcast_to(1 - ab, SHAPE), rtol=1e-12)
    np.testing.assert_allclose(log_var.numpy(), np.log(np.broadcast_to(1 - ab, SHAPE)), rtol=1e-12)


def test_posterior_mean_variance(tab):
    d = GaussianDiffusion(BETAS)
    x0, xt, t = pixels(), rand(*SHAPE), torch.tensor([0, 3, 9])
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
    tn = t.numpy()
    ab, abp, b = tab["abar"][tn], tab["abar_prev"][tn], BETAS[tn]
    c = (slice(None), None, None, None)
    ref_mean = (np.sqrt(abp) * b / (1 - ab))[c] * x0.numpy() + (
        np.sqrt(1 - b) * (1 - abp) / (1 - ab)
    )[c] * xt.numpy()
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-10, atol=1e-12)
    ref_var = ((1 - abp) / (1 - ab) * b)[c]
    np.testing.assert_allclose(var.numpy(), np.broadcast_to(ref_var, SHAPE), rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(log_var[1:].numpy(), np.log(np.broadcast_to(ref_var, SHAPE)[1:]))
    np.testing.assert_allclose(log_var[0].numpy(), np.log(tab["post_var"][1]))  # clipped


def test_predict_xstart_from_eps(tab):
    d = GaussianDiffusion(BETAS)
    x0, eps, t = pixels(), rand(*SHAPE), torch.tensor([1, 5, 8])
    xt = d.q_sample(x0, t, eps)
    ab = tab["abar"][t.numpy()][:, None, None, None]
    ref = (xt.numpy() - np.sqrt(1 - ab) * eps.numpy()) / np.sqrt(ab)
    got = d._predict_xstart_from_eps(xt, t, eps)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10)
    np.testing.assert_allclose(got.numpy(), x0.numpy(), atol=1e-10)


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall", "learned"])
@pytest.mark.parametrize("mean_type", ["eps", "xprev", "xstart"])
def test_p_mean_variance_each_type(tab, mean_type, var_type):
    loss = "kl" if var_type == "learned" else "mse"
    d = GaussianDiffusion(BETAS, mean_type, var_type, loss)
    model = LinearModel(6 if var_type == "learned" else 3)
    xt, t = rand(*SHAPE), torch.tensor([0, 2, 9])
    out = d.p_mean_variance(model, xt, t, clip_denoised=False)
    tn, c = t.numpy(), (slice(None), None, None, None)
    raw = model.numpy(xt.numpy(), tn)
    mean_out = raw[:, :3]
    ab = tab["abar"][tn][c]
    if mean_type == "eps":
        x0 = (xt.numpy() - np.sqrt(1 - ab) * mean_out) / np.sqrt(ab)
        ref_mean = tab["coef1"][tn][c] * x0 + tab["coef2"][tn][c] * xt.numpy()
    elif mean_type == "xstart":
        x0 = mean_out
        ref_mean = tab["coef1"][tn][c] * x0 + tab["coef2"][tn][c] * xt.numpy()
    else:
        ref_mean = mean_out
        x0 = (mean_out - tab["coef2"][tn][c] * xt.numpy()) / tab["coef1"][tn][c]
    np.testing.assert_allclose(out["mean"].numpy(), ref_mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out["pred_xstart"].numpy(), x0, rtol=1e-9, atol=1e-12)
    if var_type == "learned":
        ref_log_var = raw[:, 3:]
    elif var_type == "fixedlarge":
        ref_log_var = np.broadcast_to(np.log(tab["fixedlarge"][tn])[c], SHAPE)
    else:
        ref_log_var = np.broadcast_to(tab["fixedsmall_log"][tn][c], SHAPE)
    np.testing.assert_allclose(out["log_variance"].numpy(), ref_log_var, rtol=1e-12)


def test_clip_denoised_clips_pred_xstart_before_the_mean(tab):
    d = GaussianDiffusion(BETAS, "xstart", "fixedlarge", "mse")
    xt, t = rand(*SHAPE), torch.tensor([3, 3, 3])

    def model(x, t):
        return 3.0 * torch.ones_like(x)  # predicts x_0 far outside [-1, 1]

    out = d.p_mean_variance(model, xt, t, clip_denoised=True)
    assert torch.all(out["pred_xstart"] == 1.0)
    c1, c2 = tab["coef1"][3], tab["coef2"][3]
    np.testing.assert_allclose(out["mean"].numpy(), c1 * 1.0 + c2 * xt.numpy(), rtol=1e-10)


def test_normal_kl():
    m, lv = rand(5, seed=1), rand(5, seed=2)
    assert torch.all(normal_kl(m, lv, m, lv).abs() < 1e-12)
    m2, lv2 = rand(5, seed=3), rand(5, seed=4)
    ref = gauss_kl(m.numpy(), lv.numpy(), m2.numpy(), lv2.numpy())
    np.testing.assert_allclose(normal_kl(m, lv, m2, lv2).numpy(), ref, rtol=1e-12)


@pytest.mark.parametrize("mean,log_std", [(0.0, -3.0), (0.37, -4.5), (-0.99, -2.0), (0.5, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decoder_probabilities_sum_to_one(mean, log_std, dtype):
    x = torch.tensor(2 * np.arange(256) / 255 - 1, dtype=dtype).reshape(1, 1, 16, 16)
    m = torch.full_like(x, mean)
    logp = discretized_gaussian_log_likelihood(x, m, torch.full_like(x, log_std))
    total = torch.exp(logp.double()).sum().item()
    assert abs(total - 1.0) < 1e-6
    ref = decoder_logp(x.double().numpy(), mean, log_std)
    mask = ref > -20  # bins with non-negligible mass: compare log-probabilities
    tol = 1e-9 if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(logp.double().numpy()[mask], ref[mask], rtol=tol, atol=tol)


def _bound_numpy(d, model, x0, noises, tab, clip=True):
    """The whole variational bound, per image and per t, recomputed in numpy."""
    x0n = x0.numpy()
    B, D = x0n.shape[0], np.prod(x0n.shape[1:])
    vb = np.zeros((B, T))
    c = (slice(None), None, None, None)
    for k, i in enumerate(reversed(range(T))):
        tn = np.full(B, i)
        xt = np.sqrt(tab["abar"][i]) * x0n + np.sqrt(1 - tab["abar"][i]) * noises[k]
        raw = model.numpy(xt, tn)
        eps = raw[:, :3]
        x0_hat = (xt - np.sqrt(1 - tab["abar"][i]) * eps) / np.sqrt(tab["abar"][i])
        if clip:
            x0_hat = np.clip(x0_hat, -1, 1)
        mu = tab["coef1"][tn][c] * x0_hat + tab["coef2"][tn][c] * xt
        log_var = np.broadcast_to(np.log(tab["fixedlarge"][tn])[c], x0n.shape)
        if i == 0:
            term = -decoder_logp(x0n, mu, 0.5 * log_var)
        else:
            true_mu = tab["coef1"][i] * x0n + tab["coef2"][i] * xt
            term = gauss_kl(true_mu, tab["fixedsmall_log"][i], mu, log_var)
        vb[:, i] = term.reshape(B, -1).sum(1) / (D * math.log(2))
    ab_T = tab["abar"][-1]
    prior = gauss_kl(np.sqrt(ab_T) * x0n, np.log(1 - ab_T), 0.0, 0.0).reshape(B, -1).sum(1)
    return vb, prior / (D * math.log(2))


def test_calc_bpd_loop_matches_independent_bound(tab):
    d = GaussianDiffusion(BETAS, "eps", "fixedlarge", "kl")
    model, x0 = LinearModel(), pixels()
    noises = [np.random.default_rng(100 + k).standard_normal(SHAPE) for k in range(T)]
    it = iter(noises)
    out = d.calc_bpd_loop(model, x0, noise_fn=lambda s: torch.from_numpy(next(it)))
    vb, prior = _bound_numpy(d, model, x0, noises, tab)
    assert out["vb"].shape == (3, T) and out["mse"].shape == (3, T)
    np.testing.assert_allclose(out["vb"].numpy(), vb, rtol=1e-8)
    np.testing.assert_allclose(out["prior_bpd"].numpy(), prior, rtol=1e-10)
    np.testing.assert_allclose(out["total_bpd"].numpy(), vb.sum(1) + prior, rtol=1e-8)


def test_prior_term_is_kl_to_standard_normal(tab):
    d = GaussianDiffusion(linear_beta_schedule())
    x0 = pixels()
    ab = np.prod(1 - linear_beta_schedule())
    ref = gauss_kl(np.sqrt(ab) * x0.numpy(), np.log(1 - ab), 0.0, 0.0)
    ref = ref.reshape(3, -1).mean(1) / math.log(2)
    np.testing.assert_allclose(d.prior_bpd(x0).numpy(), ref, rtol=1e-9)
    assert ref.max() < 1e-4  # x_T is almost exactly N(0, I) under the paper's schedule


def test_training_losses_against_formulas(tab):
    x0, t, noise = pixels(), torch.tensor([0, 4, 9]), rand(*SHAPE, seed=5)
    model = LinearModel()
    tn, c = t.numpy(), (slice(None), None, None, None)
    xt = np.sqrt(tab["abar"][tn])[c] * x0.numpy() + np.sqrt(1 - tab["abar"][tn])[c] * noise.numpy()
    out = model.numpy(xt, tn)
    targets = {
        "eps": noise.numpy(),
        "xstart": x0.numpy(),
        "xprev": tab["coef1"][tn][c] * x0.numpy() + tab["coef2"][tn][c] * xt,
    }
    for mean_type, target in targets.items():
        d = GaussianDiffusion(BETAS, mean_type, "fixedlarge", "mse")
        got = d.training_losses(model, x0, t, noise)["loss"].numpy()
        np.testing.assert_allclose(got, ((target - out) ** 2).reshape(3, -1).mean(1), rtol=1e-10)
    # kl: the bound's term in nats per dimension, without clipping (as in training).
    d = GaussianDiffusion(BETAS, "eps", "fixedlarge", "kl")
    got = d.training_losses(model, x0, t, noise)["loss"].numpy()
    noises = [noise.numpy()] * T
    vb, _ = _bound_numpy(d, model, x0, noises, tab, clip=False)
    ref = np.array([vb[b, tn[b]] for b in range(3)]) * math.log(2)
    np.testing.assert_allclose(got, ref, rtol=1e-8)


def test_oracle_sampler_returns_the_only_image():
    """Data concentrated on one image x*: the optimal eps model's sampler returns x*."""
    betas = linear_beta_schedule(50, 1e-3, 0.2)
    x_star = pixels()[:1]
    for var_type in ("fixedlarge", "fixedsmall"):
        d = GaussianDiffusion(betas, "eps", var_type, "mse")
        sab = torch.from_numpy(d.sqrt_alphas_cumprod)
        s1m = torch.from_numpy(d.sqrt_one_minus_alphas_cumprod)

        def oracle(x, t, sab=sab, s1m=s1m):
            return (x - sab[t][:, None, None, None] * x_star) / s1m[t][:, None, None, None]

        g = torch.Generator().manual_seed(0)
        x = d.p_sample_loop(oracle, (4, *SHAPE[1:]), generator=g).to(torch.float64)
        np.testing.assert_allclose(x.numpy(), np.broadcast_to(x_star.numpy(), x.shape), atol=1e-9)


def test_sampling_is_reproducible_from_a_generator():
    d = GaussianDiffusion(BETAS)
    model = LinearModel()
    a = d.p_sample_loop(model, SHAPE, generator=torch.Generator().manual_seed(3))
    b = d.p_sample_loop(model, SHAPE, generator=torch.Generator().manual_seed(3))
    c = d.p_sample_loop(model, SHAPE, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_progressive_yields_every_step_and_xstart():
    d = GaussianDiffusion(BETAS)
    steps = list(d.p_sample_loop_progressive(LinearModel(), SHAPE, generator=torch.Generator()))
    assert [s["t"] for s in steps] == list(reversed(range(T)))
    assert all(s["pred_xstart"].shape == SHAPE for s in steps)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mean_type": "mu"}, "mean_type 'mu' is not one of eps, xprev, xstart"),
        ({"var_type": "large"}, "var_type 'large' is not one of"),
        ({"loss_type": "l1"}, "loss_type 'l1' is not one of mse, kl"),
        ({"var_type": "learned", "loss_type": "mse"}, "use loss_type 'kl'"),
        ({"betas": np.zeros(5)}, r"betas must lie in \(0, 1\)"),
        ({"betas": np.full(5, 1.0)}, r"betas must lie in \(0, 1\)"),
        ({"betas": np.ones((2, 2)) * 0.1}, "1-D"),
        ({"betas": []}, "non-empty"),
    ],
)
def test_bad_construction_is_a_clear_value_error(kwargs, match):
    args = {"betas": BETAS, **kwargs}
    with pytest.raises(ValueError, match=match):
        GaussianDiffusion(**args)


def test_bad_calls_are_clear_value_errors():
    d = GaussianDiffusion(BETAS, "eps", "learned", "kl")
    x = rand(*SHAPE)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 10\)"):
        d.q_sample(x, torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 10\)"):
        d.p_sample(LinearModel(6), x, torch.tensor([-1, 0, 0]))
    with pytest.raises(ValueError, match="one step per image"):
        d.q_sample(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer tensor"):
        d.q_sample(x, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="shapes differ"):
        d.q_sample(x, torch.tensor([1, 2, 3]), noise=rand(3, 3, 4, 5))
    with pytest.raises(ValueError, match="returns 3 channels but var_type 'learned' needs 6"):
        d.p_mean_variance(LinearModel(3), x, torch.tensor([1, 2, 3]))
    fixed = GaussianDiffusion(BETAS)
    with pytest.raises(ValueError, match="returns 6 channels but var_type 'fixedlarge' needs 3"):
        fixed.training_losses(LinearModel(6), pixels(), torch.tensor([1, 2, 3]))
