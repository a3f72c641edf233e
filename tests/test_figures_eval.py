"""Fig. 7 (reconstructions), Fig. 8 (interpolation) and Fig. 5 (rate-distortion) figures.

The tiny U-Net with random weights on 8x8 images and T = 20: a few hundred network calls.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from eval_project import tiny_unet
from PIL import Image

from pipeline.data import to_model_input, to_uint8
from pipeline.evaluation.figures import (
    save_interpolation,
    save_rate_distortion,
    save_reconstructions,
)
from pipeline.evaluation.rate_distortion import rate_distortion
from pipeline.evaluation.reconstruction import (
    FigureSpec,
    figure_arrays,
    interpolations,
    q_sample_at,
    reconstructions,
    reverse_from,
    stream_seed,
    submit_figures,
)
from pipeline.model.diffusion import GaussianDiffusion, linear_beta_schedule
from pipeline.sampling.job import SamplingJob
from pipeline.sampling.noise import ImageNoise

BETAS = linear_beta_schedule(20, 5e-3, 0.5)


@pytest.fixture(scope="module")
def model():
    return tiny_unet()


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(BETAS, "eps", "fixedlarge", "mse")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (4, 2, 2, 3), dtype=np.uint8)
    return coarse.repeat(4, axis=1).repeat(4, axis=2)  # four blocky 8x8 images


def test_reconstructions_shapes_and_determinism(model, diffusion, images):
    out = reconstructions(model, diffusion, images[:2], (5, 20), draws=3, seed=0)
    assert out["x_t"].shape == (2, 2, 8, 8, 3) and out["x_0"].shape == (2, 2, 3, 8, 8, 3)
    again = reconstructions(model, diffusion, images[:2], (5, 20), draws=3, seed=0)
    assert all(np.array_equal(out[k], again[k]) for k in out)
    other = reconstructions(model, diffusion, images[:2], (5, 20), draws=3, seed=1)
    assert not np.array_equal(out["x_0"], other["x_0"])
    draws = out["x_0"][:, 1].reshape(2, 3, -1)  # t = 20: the draws differ from one another
    assert all(len(np.unique(d, axis=0)) == 3 for d in draws)


def test_reconstruction_draws_share_their_x_t(model, diffusion, images):
    """Draw 1 of image 1 at t = 5: the reverse process from that image's x_t, run alone."""
    out = reconstructions(model, diffusion, images[:2], (5,), draws=2, seed=0)
    x0 = to_model_input(images[:2])
    eps = ImageNoise(stream_seed(0, "recon-q", 5), range(2))(tuple(x0.shape))
    x_t = q_sample_at(diffusion, x0, 5, eps)
    assert np.array_equal(to_uint8(x_t), out["x_t"][:, 0])
    noise = ImageNoise(stream_seed(0, "recon-p", 5), [1 * 2 + 1])  # image 1, draw 1
    with torch.inference_mode():
        alone = reverse_from(model, diffusion, x_t[1:2], 5, noise)
    assert np.array_equal(to_uint8(alone)[0], out["x_0"][1, 0, 1])


def test_interpolation_ends_are_the_two_reconstructions(model, diffusion, images):
    t, seed = 10, 3
    mixes = interpolations(model, diffusion, images[0::2], images[1::2], t, 4, seed)
    assert mixes.shape == (2, 4, 8, 8, 3)
    a, b = to_model_input(images[0::2]), to_model_input(images[1::2])
    eps = ImageNoise(stream_seed(seed, "interp-q", t), range(2))(tuple(a.shape))
    eps2 = ImageNoise(stream_seed(seed, "interp-q2", t), range(2))(tuple(b.shape))
    for p in range(2):
        for column, source, q_noise in ((0, a, eps), (-1, b, eps2)):
            x_t = q_sample_at(diffusion, source, t, q_noise)[p : p + 1]
            noise = ImageNoise(stream_seed(seed, "interp-p", t), [p])
            with torch.inference_mode():
                alone = to_uint8(reverse_from(model, diffusion, x_t, t, noise))[0]
            assert np.array_equal(alone, mixes[p, column]), (p, column)
    assert not np.array_equal(mixes[0, 0], mixes[0, -1])


def test_interpolation_endpoints_draw_independent_q_noise(model, diffusion, images):
    """As the official code: an image mixed with itself still has two different x_t (its own
    q-noise each), so the λ = 0 and λ = 1 decodings differ; the reverse noise is shared."""
    same = interpolations(model, diffusion, images[:1], images[:1], 10, 3, seed=0)
    assert not np.array_equal(same[0, 0], same[0, -1])


def test_figure_pngs(tmp_path, images):
    save_reconstructions(
        tmp_path / "r.png",
        images[:2],
        np.zeros((2, 2, 8, 8, 3), np.uint8),
        np.zeros((2, 2, 3, 8, 8, 3), np.uint8),
        (5, 20),
        "title",
    )
    width = Image.open(tmp_path / "r.png").width
    assert width >= 9 * 32  # 1 + 2 * (1 + 3) columns of >= 32 px
    save_interpolation(
        tmp_path / "i.png",
        images[:2],
        images[2:],
        np.zeros((2, 5, 8, 8, 3), np.uint8),
        np.linspace(0, 1, 5),
        10,
        "t",
    )
    assert Image.open(tmp_path / "i.png").width >= 7 * 32
    rng = np.random.default_rng(0)
    curve = rate_distortion(rng.uniform(0, 1, 20), 0.1, rng.uniform(0, 1, 20), 1)
    save_rate_distortion(tmp_path / "rd.png", curve, "smoke: stand-in")
    assert Image.open(tmp_path / "rd.png").size[0] > 600


def test_one_batched_loop_and_the_ray_task_match_and_are_cached(
    ray_session, model, diffusion, images, tmp_path
):
    job = SamplingJob(
        model.init_kwargs, model.state_dict(), tuple(BETAS), "eps", "fixedlarge", "mse", None, 0, 4
    )
    spec = FigureSpec(images[:2], (5, 20), 2, images[:1], images[1:2], 10, 3, seed=0)
    connects = []
    pending = submit_figures(
        job, "digest", spec, tmp_path, {"num_cpus": 1}, lambda: connects.append(1)
    )
    out = pending.result()
    direct = figure_arrays(model, diffusion, spec)  # every chain in one batched loop
    alone = reconstructions(model, diffusion, images[:2], (5, 20), 2, seed=0)
    assert np.array_equal(direct["recon_x_0"], alone["x_0"])
    assert np.array_equal(direct["recon_x_t"], alone["x_t"])
    mixes = interpolations(model, diffusion, images[:1], images[1:2], 10, 3, seed=0)
    assert np.array_equal(direct["interp"], mixes)
    assert set(out) == {"recon_x_t", "recon_x_0", "interp"} and connects == [1]
    assert all(np.array_equal(out[k], direct[k]) for k in out)
    again = submit_figures(job, "digest", spec, tmp_path, {"num_cpus": 1}, _no_ray).result()
    assert all(np.array_equal(out[k], again[k]) for k in out)


def _no_ray() -> None:
    raise AssertionError("cached figures must not start Ray")
