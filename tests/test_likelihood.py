"""The NLL bound in bits/dim (pipeline.evaluation.likelihood): units, training lowers it, Ray
blocks.

The bound's units are checked against a scipy evaluation of the decoder term; "training lowers
the bound" trains the tiny U-Net in this process (a few hundred L_simple steps on two images,
seconds) rather than comparing with an analytic oracle, so the real network, loss and bound are
exercised together; the Ray tests share one tiny project and the session's Ray instance.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import scipy.stats
import torch
from eval_project import VARIANT, make_model, make_project, tiny_unet

from pipeline.cluster.blocks import list_shards, shard_path
from pipeline.cluster.testhooks import FAIL_BLOCK_ENV
from pipeline.data import open_split, to_model_input
from pipeline.evaluation.likelihood import compute_nll, eval_network, image_nll, nll_key, summarize
from pipeline.evaluation.rate_distortion import rate_distortion
from pipeline.model.diffusion import GaussianDiffusion, linear_beta_schedule

BETAS = linear_beta_schedule(20, 5e-3, 0.5)  # the tiny preset's schedule


def zero_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


def test_decoder_term_is_nats_over_3hw_ln2():
    """x_1 = sqrt(alphabar_1) x_0 (zero noise) and eps = 0 give mean x_0 at t = 1 exactly, so
    L_0 is the Gaussian mass of each pixel's bin, computed here with scipy in float64."""
    d = GaussianDiffusion(BETAS, "eps", "fixedlarge", "mse")
    pixels = np.random.default_rng(0).integers(0, 256, (1, 4, 6, 3), dtype=np.uint8)
    pixels[0, 0, 0], pixels[0, 0, 1] = 0, 255  # the two edge bins
    x = to_model_input(pixels).double()
    out = d.calc_bpd_loop(zero_model, x, noise_fn=lambda s: torch.zeros(s, dtype=torch.float64))
    ab = np.cumprod(1 - BETAS)
    sigma = math.sqrt(BETAS[1] * (1 - ab[0]) / (1 - ab[1]))  # fixedlarge at t = 1: beta~_2
    k = pixels.astype(np.float64)
    inner = np.log(2 * scipy.stats.norm.cdf(1 / (255 * sigma)) - 1)
    edge = scipy.stats.norm.logcdf(1 / (255 * sigma))
    nats = np.where((k == 0) | (k == 255), edge, inner).sum()  # over all 3 * H * W values
    D = 3 * 4 * 6
    assert out["vb"][0, 0].item() == pytest.approx(-nats / (D * math.log(2)), rel=1e-9)
    assert out["total_bpd"][0].item() == pytest.approx(
        out["prior_bpd"][0].item() + out["vb"][0].sum().item(), rel=1e-12
    )


def train_tiny(diffusion: GaussianDiffusion, images: np.ndarray, steps: int) -> torch.nn.Module:
    """The tiny U-Net as initialised for training, after ``steps`` L_simple steps on images."""
    from pipeline.model.unet import UNet

    torch.manual_seed(0)
    model = UNet(8, 3, 3, 32, (1, 2), 1, (4,), 0.0)
    x0 = to_model_input(images)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = x0[torch.randint(len(x0), (8,), generator=g)]
        t = torch.randint(diffusion.num_timesteps, (8,), generator=g)
        noise = torch.randn(batch.shape, generator=g)
        loss = diffusion.training_losses(model, batch, t, noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_untrained_bound_is_far_above_a_trained_one():
    """A one-image data set (a constant colour). With sigma_t^2 = beta~_t (fixedsmall) a model
    that has learnt the noise leaves no variance mismatch in the KL terms, so 100 steps take the
    bound from ~10 to under 4 bits/dim (the decoder term is ~3.3 at this T = 20 schedule)."""
    d = GaussianDiffusion(BETAS, "eps", "fixedsmall", "mse")
    rng = np.random.default_rng(1)
    images = np.tile(rng.integers(0, 256, (1, 1, 1, 3), dtype=np.uint8), (1, 8, 8, 1))
    untrained = image_nll(train_tiny(d, images, 0), d, images, [0], seed=0, batch_size=1)
    trained = image_nll(train_tiny(d, images, 100), d, images, [0], seed=0, batch_size=1)
    assert untrained["total_bpd"][0] > 2 * trained["total_bpd"][0], (untrained, trained)
    assert trained["vb"].shape == (1, 20) and trained["total_bpd"].dtype == np.float64


# ---------------------------------------------------------------------------------------------
# On Ray: blocks, workers, resume.


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("nll")
    cfg = make_project(root)
    make_model(root)
    network = eval_network(cfg, cfg.variant(VARIANT), root / "models" / VARIANT / "ema.pt")
    return types.SimpleNamespace(root=root, cfg=cfg, network=network)


def nll(project, root=None, n=7, split="test", **eval_):
    """compute_nll of the project's model on its test split, in ``root`` (default: its own)."""
    import dataclasses

    cfg = project.cfg
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **eval_))
    root = root or project.root
    root.mkdir(parents=True, exist_ok=True)
    if root != project.root and not (root / "data").exists():
        (root / "data").symlink_to(project.root / "data", target_is_directory=True)
    digest = project.network.weights_digest()
    return compute_nll(cfg, VARIANT, project.network, digest, split, n, root)


@pytest.fixture(scope="module")
def reference(ray_session, project):
    """7 test images in blocks of 3 (3 + 3 + 1) on two workers."""
    return nll(project, nll_block_size=3, num_workers=2)


def test_blocks_equal_the_bound_computed_in_one_batch(reference, project):
    test = open_split(project.root / "data" / "tiny", "test")
    model = project.network.model(torch.device("cpu"))
    direct = image_nll(model, project.network.diffusion(), test[:7], range(7), 0, 7)
    for key, value in direct.items():
        np.testing.assert_array_equal(reference.terms[key], value, err_msg=key)
    assert reference.summary["nll_bpd"] == pytest.approx(direct["total_bpd"].mean(), rel=1e-12)
    assert len(np.unique(direct["total_bpd"])) == 7  # images differ


def test_one_worker_and_other_blocks_give_identical_results(reference, project, tmp_path):
    one = nll(project, tmp_path / "a", nll_block_size=3, num_workers=1)
    four = nll(project, tmp_path / "b", nll_block_size=4, num_workers=2)  # blocks 4 + 3
    assert one.work_dir.name == reference.work_dir.name  # same key: workers are not in it
    assert four.work_dir.name != reference.work_dir.name
    for other in (one, four):
        for key, value in reference.terms.items():
            np.testing.assert_array_equal(other.terms[key], value, err_msg=key)


def test_a_block_whose_worker_is_sigkilled_is_retried_and_changes_nothing(
    reference, project, tmp_path, monkeypatch
):
    monkeypatch.setenv(FAIL_BLOCK_ENV, "kill:3")  # block [3, 6): its worker process dies
    killed = nll(project, tmp_path, nll_block_size=3, num_workers=2)
    assert (killed.work_dir / ".failed-once-00000003.kill").exists()  # the kill did happen
    for key, value in reference.terms.items():
        np.testing.assert_array_equal(killed.terms[key], value, err_msg=key)


def test_aggregation_sums_images_not_block_means(reference):
    terms, s = reference.terms, reference.summary
    assert s["count"] == 7
    assert s["nll_bpd"] == pytest.approx(terms["total_bpd"].sum() / 7, rel=1e-15)
    np.testing.assert_allclose(s["vb_bpd"], terms["vb"].mean(axis=0), rtol=1e-14)
    block_means = [terms["total_bpd"][a:b].mean() for a, b in [(0, 3), (3, 6), (6, 7)]]
    assert abs(np.mean(block_means) - s["nll_bpd"]) > 1e-9  # what a mean of means would give
    curve = rate_distortion(s["vb_sum"], s["prior_sum"], s["xstart_mse_sum"], s["count"])
    # after all T steps: the bound minus the decoder term L_0, averaged over images
    expected = (terms["total_bpd"] - terms["vb"][:, 0]).mean()
    assert curve["rate_bpd"][0] == pytest.approx(expected, rel=1e-12)
    parts = [summarize({k: v[a:b] for k, v in terms.items()}) for a, b in [(0, 3), (3, 7)]]
    assert sum(p["prior_sum"] for p in parts) == pytest.approx(s["prior_sum"], rel=1e-14)


def test_rerun_and_more_images_reuse_finished_blocks(reference, project, tmp_path):
    first = nll(project, tmp_path, n=4, nll_block_size=2)
    stamps = {b: shard_path(first.work_dir, *b).stat().st_mtime_ns for b in [(0, 2), (2, 4)]}
    again = nll(project, tmp_path, n=4, nll_block_size=2)
    assert again.run.computed == [] and sorted(again.run.skipped) == [(0, 2), (2, 4)]
    more = nll(project, tmp_path, n=7, nll_block_size=2)
    assert sorted(more.run.computed) == [(4, 6), (6, 7)]  # in order of completion
    assert {b: shard_path(more.work_dir, *b).stat().st_mtime_ns for b in stamps} == stamps
    assert list_shards(more.work_dir) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    np.testing.assert_array_equal(more.terms["total_bpd"], reference.terms["total_bpd"])


def test_train_subset_has_its_own_blocks(reference, project):
    train = nll(project, n=3, split="train", nll_block_size=3)
    assert train.work_dir.name.startswith("train-") and reference.work_dir.name.startswith("test-")
    images = open_split(project.root / "data" / "tiny", "train")[:3]
    model = project.network.model(torch.device("cpu"))
    direct = image_nll(model, project.network.diffusion(), images, range(3), 0, 3)
    np.testing.assert_array_equal(train.terms["total_bpd"], direct["total_bpd"])
    assert train.summary["count"] == 3


def test_key_follows_what_changes_the_numbers(project):
    import dataclasses

    net, digest = project.network, project.network.weights_digest()
    other = tiny_unet(seed=1).state_dict()

    def key(network=net, weights=digest, split="test", data="d", block=4):
        return nll_key(network, weights, split, data, block)

    assert key() == key(dataclasses.replace(net, torch_threads=2, batch_size=3))
    changed = [
        key(dataclasses.replace(net, seed=1)),
        key(weights=dataclasses.replace(net, state_dict=other).weights_digest()),
        key(split="train"),
        key(data="e"),
        key(block=8),
        key(dataclasses.replace(net, mean_type="xprev")),
    ]
    assert key() not in changed and len(set(changed)) == len(changed)
