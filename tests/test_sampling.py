"""Sampling on Ray: per-image reproducibility, resume, the respaced extension, figures."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from repo_copy import PARAMS

from pipeline.cluster.blocks import list_shards, shard_path
from pipeline.cluster.testhooks import FAIL_BLOCK_ENV
from pipeline.config import config_from_dict
from pipeline.model.diffusion import GaussianDiffusion, linear_beta_schedule
from pipeline.model.respace import RespacedDiffusion, sampler_label, space_timesteps
from pipeline.model.unet import UNet
from pipeline.model.weights import save_weights, sha256_file
from pipeline.sampling.draw import (
    block_key,
    draw_samples,
    load_model_info,
    sample_images,
    to_uint8,
)
from pipeline.sampling.job import make_job
from pipeline.sampling.noise import ImageNoise, item_generator
from pipeline.sampling.shards import open_samples

ROOT = Path(__file__).resolve().parents[1]
VARIANT = "eps_fixed_mse"


def tiny_unet(out_channels: int = 3, seed: int = 0) -> UNet:
    """The tiny preset's network with random (non-zero) weights, so samples depend on it."""
    model = UNet(8, 3, out_channels, 32, (1, 2), 1, (4,), 0.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def make_model(
    root: Path, variant: str = VARIANT, seed: int = 0, channels: int | None = None, **meta
) -> Path:
    """models/<variant>/ema.pt and a hand-written model.json, as the train stage leaves them."""
    raw = yaml.safe_load(PARAMS.read_text())
    types = raw["variants"][variant]
    folder = root / "models" / variant
    folder.mkdir(parents=True, exist_ok=True)
    out = channels or (6 if types["var_type"] == "learned" else 3)
    save_weights(folder / "ema.pt", tiny_unet(out, seed), {"variant": variant})
    info = {"variant": variant, **types, "scale": "tiny"}  # no run_name: no MLflow run
    info.update(ema_sha256=sha256_file(folder / "ema.pt"), resolution=8, source="test")
    info.update(meta)
    (folder / "model.json").write_text(json.dumps(info))
    return folder


def tiny_config(**sample):
    """The tiny scale of params.yaml with sample-section overrides."""
    raw = copy.deepcopy(yaml.safe_load(PARAMS.read_text()))
    base = {"n_samples": 12, "batch_size": 4, "block_size": 4, "num_workers": 2}
    raw["presets"]["tiny"]["sample"].update({**base, "progressive_seeds": [1, 5], **sample})
    return config_from_dict(raw, "tiny")


def draw(root: Path, **sample):
    cfg = tiny_config(**sample)
    variant = cfg.variant(VARIANT)
    info = load_model_info(root / "models" / VARIANT, variant, "tiny")
    return draw_samples(cfg, variant, info, root=root)


# ---------------------------------------------------------------------------------------------
# The noise source


def test_noise_rows_are_each_images_own_stream():
    """Row b of every call is the next draw of image b's generator, whatever the batch."""
    noise = ImageNoise(3, [7, 2, 9])
    calls = [noise((3, 2, 4, 4)) for _ in range(3)]
    for b, index in enumerate([7, 2, 9]):
        g = item_generator(3, index)
        for call in calls:
            assert torch.equal(call[b], torch.randn((2, 4, 4), generator=g))
    assert not torch.equal(calls[0][0], calls[0][1])
    assert not torch.equal(ImageNoise(4, [7])((1, 2, 4, 4))[0], calls[0][0])  # another seed


def test_noise_rejects_a_shape_for_another_batch():
    with pytest.raises(ValueError, match="noise for 2 images"):
        ImageNoise(0, [0, 1])((3, 3, 8, 8))


# ---------------------------------------------------------------------------------------------
# Reproducibility (CPU, float32)


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """12 samples drawn with 2 workers, batch 4: the set every other way must reproduce."""
    root = tmp_path_factory.mktemp("ref")
    make_model(root)
    return root, draw(root)


def test_one_and_two_workers_give_identical_bytes(reference, tmp_path):
    make_model(tmp_path)
    one = draw(tmp_path, num_workers=1)
    assert one.images[:].tobytes() == reference[1].images[:].tobytes()
    assert one.manifest["sha256"] == reference[1].manifest["sha256"]
    assert one.images.shape == (12, 8, 8, 3) and one.images.dtype == np.uint8


def test_a_block_whose_worker_is_sigkilled_is_retried_and_gives_identical_bytes(
    reference, tmp_path, monkeypatch
):
    make_model(tmp_path)
    monkeypatch.setenv(FAIL_BLOCK_ENV, "kill:4")  # block [4, 8): its worker process dies
    killed = draw(tmp_path)
    assert list((tmp_path / "work").rglob(".failed-once-00000004.kill"))  # the kill did happen
    assert killed.images[:].tobytes() == reference[1].images[:].tobytes()


def test_batch_sizes_4_and_7_give_identical_bytes(reference, tmp_path):
    """One block of 12 split 7 + 5 against the reference's blocks of 4 split 4."""
    make_model(tmp_path)
    seven = draw(tmp_path, batch_size=7, block_size=12)
    assert seven.images[:].tobytes() == reference[1].images[:].tobytes()


def test_ray_samples_equal_a_direct_p_sample_loop(reference):
    """The same indices through GaussianDiffusion.p_sample_loop in this process."""
    root, ref = reference
    cfg = tiny_config()
    job = make_job(cfg, cfg.variant(VARIANT), root / "models" / VARIANT / "ema.pt")
    model, diffusion = job.model(torch.device("cpu")), job.diffusion()
    with torch.inference_mode():
        x = diffusion.p_sample_loop(model, (3, 3, 8, 8), noise_fn=ImageNoise(0, [4, 9, 11]))
    assert to_uint8(x).tobytes() == ref.images[[4, 9, 11]].tobytes()
    assert len(np.unique(ref.images[:].reshape(12, -1), axis=0)) == 12  # samples differ


def test_another_seed_or_other_weights_give_other_samples(reference, tmp_path):
    make_model(tmp_path)
    other_seed = draw(tmp_path, seed=1)
    assert other_seed.work_dir.name != reference[1].work_dir.name
    assert not np.array_equal(other_seed.images[:], reference[1].images[:])
    make_model(tmp_path, seed=1)  # retrained weights: a new key, stale blocks never mixed in
    other_weights = draw(tmp_path)
    assert other_weights.work_dir.name not in (reference[1].work_dir.name, other_seed.work_dir.name)
    assert other_weights.run.skipped == []


# ---------------------------------------------------------------------------------------------
# Resume


def test_rerun_and_more_samples_reuse_finished_blocks(reference, tmp_path):
    make_model(tmp_path)
    first = draw(tmp_path, n_samples=8)
    stamps = {b: shard_path(first.work_dir, *b).stat().st_mtime_ns for b in [(0, 4), (4, 8)]}
    again = draw(tmp_path, n_samples=8)
    assert again.run.computed == [] and sorted(again.run.skipped) == [(0, 4), (4, 8)]
    more = draw(tmp_path, n_samples=12, num_workers=1)  # another worker count: same blocks
    assert more.work_dir == first.work_dir
    assert more.run.computed == [(8, 12)]
    assert {b: shard_path(more.work_dir, *b).stat().st_mtime_ns for b in stamps} == stamps
    assert more.images[:].tobytes() == reference[1].images[:].tobytes()
    assert list_shards(more.work_dir) == [(0, 4), (4, 8), (8, 12)]


# ---------------------------------------------------------------------------------------------
# Block identity


def test_block_key_follows_the_bytes_not_the_schedule_of_work(tmp_path):
    make_model(tmp_path)
    make_model(tmp_path / "again")  # identical weights saved again

    def key(root=tmp_path, block_size=4, **sample):
        cfg = tiny_config(**sample)
        weights = root / "models" / VARIANT / "ema.pt"
        return block_key(make_job(cfg, cfg.variant(VARIANT), weights), block_size)

    assert key(root=tmp_path / "again") == key()
    make_model(tmp_path / "other", seed=1)
    assert key(root=tmp_path / "other") != key()  # other weights
    assert key(block_size=8) != key()
    for change in [{"seed": 1}, {"steps": 10}, {"bf16": True}, {"channels_last": True}]:
        assert key(**change) != key(), change
    for same in [{"n_samples": 99}, {"num_workers": 5}, {"batch_size": 3}, {"torch_threads": 2}]:
        assert key(**same) == key(), same
    # Not batch-invariant (bf16): then the batch size is part of a block's identity.
    assert key(bf16=True, batch_size=3) != key(bf16=True, batch_size=4)


# ---------------------------------------------------------------------------------------------
# Progressive generation (Fig. 6)


def test_progressive_rows_are_the_samples_of_their_indices(reference):
    prog = reference[1].progressive
    assert prog["frames"].shape == (2, 4, 8, 8, 3)  # tiny: progressive_frames 4
    np.testing.assert_array_equal(prog["t"], [20, 14, 7, 1])
    assert prog["final"].tobytes() == reference[1].images[[1, 5]].tobytes()
    # At t = 1 the prediction of x_0 is the sample (eps model: the last mean is x_0's estimate).
    assert prog["frames"][:, -1].tobytes() == prog["final"].tobytes()


# ---------------------------------------------------------------------------------------------
# The respaced extension (not the paper's sampler)


def test_space_timesteps_keeps_the_ends_evenly():
    assert space_timesteps(100, 100) == list(range(100))
    assert space_timesteps(100, 1) == [99]
    ts = space_timesteps(1000, 10)
    assert ts[0] == 0 and ts[-1] == 999 and len(ts) == 10
    assert max(np.diff(ts)) - min(np.diff(ts)) <= 1


def test_respaced_process_keeps_alphabar_at_its_timesteps():
    base = GaussianDiffusion(linear_beta_schedule(100, 1e-3, 0.2), "eps", "fixedlarge", "mse")
    ts = space_timesteps(100, 7)
    respaced = RespacedDiffusion(base, ts)
    # Independently: alphabar of the respaced chain is the product of its alphas.
    np.testing.assert_allclose(np.cumprod(1 - respaced.betas), base.alphas_cumprod[ts], rtol=1e-12)
    assert respaced.num_timesteps == 7
    assert respaced.original_t(torch.tensor([0, 6])).tolist() == [0, 99]


def test_respacing_with_every_step_is_algorithm_2():
    base = GaussianDiffusion(linear_beta_schedule(20, 5e-3, 0.5), "eps", "fixedlarge", "mse")
    full = RespacedDiffusion(base, list(range(20)))
    model = tiny_unet()
    a = sample_images(model, base, range(3), 0, 3)
    b = sample_images(model, full, range(3), 0, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # the same up to float rounding


@pytest.mark.parametrize("mean_type", ["eps", "xprev", "xstart"])
def test_respaced_sampler_runs_for_every_mean_type(mean_type):
    base = GaussianDiffusion(linear_beta_schedule(20, 5e-3, 0.5), mean_type, "learned", "kl")
    respaced = RespacedDiffusion(base, space_timesteps(20, 5))
    assert respaced.var_type == "fixedlarge"  # a learned variance is for single steps
    model, calls = tiny_unet(6), []
    model.register_forward_pre_hook(lambda _, args: calls.append(args[1][0].item()))
    images = sample_images(model, respaced, range(2), 0, 2)
    assert images.shape == (2, 8, 8, 3)
    assert calls == [19, 14, 10, 5, 0]  # the network sees the original timesteps


def test_respaced_samples_are_labelled_not_the_papers(reference, tmp_path):
    make_model(tmp_path)
    quick = draw(tmp_path, steps=5, n_samples=4)
    assert quick.manifest["respaced"] is True and quick.manifest["steps"] == 5
    assert quick.manifest["sampler"] == "respaced, not the paper's sampler: 5 of 20 steps"
    assert reference[1].manifest["sampler"] == sampler_label(20, None) == "Algorithm 2, 20 steps"
    assert reference[1].manifest["respaced"] is False


# ---------------------------------------------------------------------------------------------
# Sampling options and figures


def test_channels_last_and_bf16_options_run_the_network_so():
    base = GaussianDiffusion(linear_beta_schedule(5, 5e-3, 0.5), "eps", "fixedlarge", "mse")
    model, inputs, outputs = tiny_unet(), [], []

    def record(_, args, out) -> None:
        inputs.append(args[0])
        outputs.append(out)

    model.register_forward_hook(record)
    ref = sample_images(model, base, range(3), 0, 3)
    model = model.to(memory_format=torch.channels_last)
    cl = sample_images(model, base, range(3), 0, 3, channels_last=True)
    laid_out = [x.is_contiguous(memory_format=torch.channels_last) for x in inputs]
    assert laid_out == [False] * 5 + [True] * 5
    assert np.abs(cl.astype(int) - ref.astype(int)).max() <= 2  # same maths, other rounding
    bf16 = sample_images(model, base, range(3), 0, 3, bf16=True)
    assert bf16.shape == ref.shape and bf16.dtype == np.uint8
    assert [y.dtype for y in outputs[10:]] == [torch.bfloat16] * 5


def test_grid_tiles_enlarged_images_in_order(tmp_path):
    from PIL import Image

    from pipeline.sampling.figures import save_sample_grid, tile

    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    grid = np.asarray(tile(images, nrow=2))  # 16 px images are shown at 32 px, 2 px padding
    assert grid.shape == (2 + 2 * 34, 2 + 2 * 34, 3)
    tile_1 = grid[2 : 2 + 32, 36 : 36 + 32]  # row 0, column 1
    np.testing.assert_array_equal(tile_1, images[1].repeat(2, axis=0).repeat(2, axis=1))
    save_sample_grid(tmp_path / "g.png", images, "a title")
    saved = Image.open(tmp_path / "g.png")
    # the layout torchvision's make_grid gives (what the figures used before, for 1..7 images)
    from torchvision.utils import make_grid

    for n, nrow in ((1, 4), (3, 2), (5, 3), (7, 7), (4, 1)):
        x = np.random.default_rng(n).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
        big = torch.from_numpy(x.repeat(4, axis=1).repeat(4, axis=2)).permute(0, 3, 1, 2)
        want = make_grid(big, nrow=nrow, padding=2, pad_value=255).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(np.asarray(tile(x, nrow=nrow)), want)
    assert saved.height > grid.shape[0] and saved.width >= grid.shape[1]  # a caption above


# ---------------------------------------------------------------------------------------------
# The stage: python -m stages.sample --variant NAME


def stage_project(root: Path, monkeypatch, **sample) -> None:
    """A project folder with params.yaml at the tiny scale; the stage runs from it."""
    raw = yaml.safe_load(PARAMS.read_text())
    raw["scale"] = "tiny"
    raw["presets"]["tiny"]["sample"].update(sample)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")


def run_stage(capsys, *argv: str) -> tuple[int, str]:
    from stages.sample import main

    try:
        main(["--variant", VARIANT, *argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_stage_writes_samples_figures_and_logs_to_mlflow(
    ray_session, tmp_path, monkeypatch, capsys
):
    import mlflow
    from PIL import Image

    from pipeline.config import load_config
    from pipeline.report.tracking import TAG_RUN, start_variant_run

    stage_project(tmp_path, monkeypatch, n_samples=8, block_size=4, batch_size=4)
    cfg = load_config()
    # the train stage's way: model.json names the run, the MLflow run carries it as a tag
    run_id = start_variant_run(cfg, cfg.variant(VARIANT), tags={TAG_RUN: "r-1"})
    make_model(tmp_path, run_name="r-1")
    code, err = run_stage(capsys)
    assert code == 0, err
    out = tmp_path / "samples" / VARIANT
    manifest = json.loads((out / "manifest.json").read_text())
    blocks = ["block-00000000-00000004.npz", "block-00000004-00000008.npz"]
    assert sorted(p.name for p in out.glob("*.np[yz]")) == blocks  # sharded: no merged file
    assert [s["file"] for s in manifest["shards"]] == blocks
    work = next((tmp_path / "work" / "sample" / VARIANT).iterdir())
    for name in blocks:  # disk once: the output shards are the blocks, hard-linked
        assert (out / name).stat().st_ino == (work / name).stat().st_ino
    images = open_samples(out, manifest, "rerun")[:]  # hashes verified
    assert images.shape == (8, 8, 8, 3) and images.dtype == np.uint8
    assert manifest["count"] == 8 and manifest["shape"] == [8, 8, 8, 3]
    assert manifest["format"] == "ddpm-repro/samples-v2"
    assert manifest["sha256"] == __import__("hashlib").sha256(images.tobytes()).hexdigest()
    assert "stand_in" in manifest  # synthetic data
    assert not any("mlflow" in k or "seconds" in k for k in manifest)  # dvc.lock hashes it
    assert manifest["sampler"] == "Algorithm 2, 20 steps"
    assert Image.open(out / "grid.png").size[0] >= 3 * 32
    assert Image.open(out / "progressive.png").size[0] >= 4 * 32  # 4 frames of >= 32 px
    run = mlflow.get_run(run_id)
    assert run.data.metrics["n_samples"] == 8 and run.data.metrics["samples_per_s"] > 0
    assert run.data.tags["ddpm.sampler"] == "Algorithm 2, 20 steps"
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "samples")}
    assert names == {"samples/grid.png", "samples/progressive.png"}


def test_stage_without_a_trained_model_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    stage_project(tmp_path, monkeypatch)
    code, err = run_stage(capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "run the train stage first" in err
    assert not (tmp_path / "samples").exists()


def test_stage_with_another_variants_model_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    stage_project(tmp_path, monkeypatch)
    make_model(tmp_path, mean_type="xprev")  # model.json says xprev; params say eps
    code, err = run_stage(capsys)
    assert code == 2 and err.count("\n") == 1
    assert "mean_type 'xprev'" in err and "mean_type 'eps'" in err
    assert not (tmp_path / "samples").exists()


def test_stage_with_stale_weights_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    stage_project(tmp_path, monkeypatch)
    make_model(tmp_path, ema_sha256="0" * 64)
    code, err = run_stage(capsys)
    assert code == 2 and "sha256 differs" in err and err.count("\n") == 1


@pytest.mark.slow
def test_interrupted_stage_resumes_where_it_stopped(tmp_path):
    """SIGINT to the real stage process, then a rerun: finished blocks are reused untouched."""
    import os
    import signal
    import subprocess
    import sys
    import time

    raw = yaml.safe_load(PARAMS.read_text())
    raw["scale"] = "tiny"
    raw["presets"]["tiny"]["sample"].update(n_samples=64, block_size=4, batch_size=4)
    raw["presets"]["tiny"]["sample"].update(num_workers=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    make_model(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "stages.sample", "--variant", VARIANT]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    work = tmp_path / "work" / "sample" / VARIANT
    deadline = time.time() + 120
    while time.time() < deadline and not list(work.glob("*/block-*.npz")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "rerun to resume" in err
    [folder] = work.iterdir()
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("block-*")}
    assert 0 < len(before) < 16 and not (tmp_path / "samples").exists()
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{16 - len(before)} blocks computed, {len(before)} reused" in done.stdout
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("block-*")}
    assert {name: after[name] for name in before} == before and len(after) == 16


def test_a_network_without_the_variance_channels_is_a_data_error(tmp_path):
    from pipeline.errors import DataError

    make_model(tmp_path, "eps_learned_kl", channels=3)
    cfg = tiny_config()
    variant = cfg.variant("eps_learned_kl")
    info = load_model_info(tmp_path / "models" / variant.name, variant, "tiny")
    with pytest.raises(DataError, match="returns 3 channels but var_type 'learned' needs 6"):
        make_job(cfg, variant, info.weights)


def test_stage_with_an_unknown_mlflow_run_is_one_line_exit_2(
    ray_session, tmp_path, monkeypatch, capsys
):
    stage_project(tmp_path, monkeypatch, n_samples=4, block_size=4, progressive_seeds=[])
    make_model(tmp_path, mlflow_run_id="0123456789abcdef0123456789abcdef")
    code, err = run_stage(capsys)
    assert code == 2 and "Traceback" not in err
    [line] = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert err.endswith(line + "\n")  # the progress bar, then one error line
    assert "MLflow run 0123456789abcdef0123456789abcdef" in err and "MLFLOW_TRACKING_URI" in err
    assert list((tmp_path / "samples").iterdir()) == []  # nothing half-written


def test_stage_whose_training_run_is_not_in_the_store_stops_before_drawing(
    tmp_path, monkeypatch, capsys
):
    """model.json names its run (run_name); a store without a run of that name (e.g. a fresh
    clone after dvc pull, MLFLOW_TRACKING_URI elsewhere): one error line, no block drawn."""
    stage_project(tmp_path, monkeypatch, n_samples=4, block_size=4, progressive_seeds=[])
    make_model(tmp_path, run_name=f"{VARIANT}-0123abcd")
    code, err = run_stage(capsys)
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(
        f"error: models/{VARIANT}/model.json: no MLflow run of {VARIANT}-0123abcd (tag "
        "ddpm.ray_run) in sqlite:///"
    )
    assert "MLFLOW_TRACKING_URI" in err
    assert not (tmp_path / "work").exists() and not (tmp_path / "samples").exists()
