"""Models that leave the pipeline (stage export): the diffusers folder samples what our sampler
samples, a round trip gives the same weights, the variants diffusers cannot express are
refused by DDPMPipeline, and the model card tells the truth. Real diffusers, tiny U-Net."""

from __future__ import annotations

import json

import diffusers  # dev extra: a missing install fails here, never skips
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from diffusers.pipelines.ddpm import pipeline_ddpm
from diffusers.schedulers import scheduling_ddpm
from repo_copy import PARAMS

from pipeline import layout
from pipeline.config import load_config
from pipeline.model.convert import load_diffusers_unet
from pipeline.model.diffusers_export import scheduler_config, write_diffusers_folder
from pipeline.model.diffusion import GaussianDiffusion, linear_beta_schedule
from pipeline.model.unet import UNet
from pipeline.model.weights import save_weights
from pipeline.report.export import write_export

T, BETAS = 20, (5e-3, 0.5)  # the tiny preset's schedule
TOLERANCE = 1e-5  # images in [0, 1]: float32 schedules computed two ways (measured: 4e-7)


def tiny_unet(out_channels: int = 3, seed: int = 0) -> UNet:
    """The tiny preset's U-Net with every tensor random (a mapping error cannot hide)."""
    torch.manual_seed(seed)
    model = UNet(8, 3, out_channels, 32, (1, 2), 1, (4,), 0.0, 32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def noises(count: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(shape, generator=g) for _ in range(count)]


@pytest.mark.parametrize(
    ("mean_type", "var_type"),
    [("eps", "fixedlarge"), ("eps", "fixedsmall"), ("xstart", "fixedlarge")],
)
def test_diffusers_pipeline_draws_what_our_sampler_draws(
    tmp_path, monkeypatch, mean_type, var_type
):
    model = tiny_unet()
    scheduler, reason = scheduler_config(T, *BETAS, mean_type, var_type)
    assert scheduler is not None and reason == ""
    write_diffusers_folder(tmp_path / "f", model, scheduler)
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "f")
    pipe.set_progress_bar_config(disable=True)
    shape = (2, 3, 8, 8)
    drawn = noises(T, shape)  # x_T, then one per step t = T-1 .. 1 (none at t = 0)
    it = iter(drawn)

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return next(it).clone()

    monkeypatch.setattr(pipeline_ddpm, "randn_tensor", randn_tensor)
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", randn_tensor)
    theirs = pipe(batch_size=2, num_inference_steps=T, output_type="np").images
    assert next(it, None) is None  # diffusers drew exactly as many as ours
    ours_it = iter(drawn)
    diffusion = GaussianDiffusion(linear_beta_schedule(T, *BETAS), mean_type, var_type, "mse")
    with torch.no_grad():
        x = diffusion.p_sample_loop(model, shape, noise_fn=lambda s: next(ours_it).clone())
    ours = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert theirs.shape == ours.shape == (2, 8, 8, 3)
    assert np.abs(theirs - ours).max() <= TOLERANCE
    assert np.abs(theirs - ours).max() > 0 or mean_type == "xstart"  # two codes, not one
    assert ours.std() > 1e-3  # images, not a constant


@pytest.mark.parametrize("out_channels", [3, 6])
def test_export_then_import_gives_the_same_weights(tmp_path, out_channels):
    model = tiny_unet(out_channels, seed=3)
    write_diffusers_folder(tmp_path / "f", model, None)
    back, _ = load_diffusers_unet(tmp_path / "f")
    assert back.init_kwargs == model.init_kwargs
    got, want = back.state_dict(), model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # diffusers' own model loads the folder strictly and computes our function
    ref = diffusers.UNet2DModel.from_pretrained(tmp_path / "f", subfolder="unet").eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0, 19])
    with torch.no_grad():
        assert (ref(x, t).sample - model(x, t)).abs().max() <= 1e-5


@pytest.mark.parametrize(
    ("mean_type", "var_type", "word"),
    [("xprev", "fixedlarge", "posterior-mean"), ("eps", "learned", "log variance")],
)
def test_variants_diffusers_cannot_sample_get_the_network_only(tmp_path, mean_type, var_type, word):
    scheduler, reason = scheduler_config(T, *BETAS, mean_type, var_type)
    assert scheduler is None and word in reason
    write_diffusers_folder(tmp_path / "f", tiny_unet(6 if var_type == "learned" else 3), None)
    assert not (tmp_path / "f" / "model_index.json").exists()
    with pytest.raises(EnvironmentError):  # refused, never sampled with the wrong maths
        diffusers.DDPMPipeline.from_pretrained(tmp_path / "f")


def project(tmp_path, variant="eps_fixed_mse", fid=41.5):
    """A tiny project with a trained variant's outputs as the export stage reads them."""
    cfg = load_config(PARAMS, "tiny")
    var = cfg.variant(variant)
    model = tiny_unet(6 if var.var_type == "learned" else 3)
    folder = tmp_path / layout.model_dir(variant)
    folder.mkdir(parents=True)
    save_weights(folder / "ema.pt", model, {"variant": variant})
    (folder / "model.json").write_text(json.dumps({"variant": variant, "steps": 8}))
    metrics = {"fid_train": fid, "is_mean": 2.5, "is_std": 0.1, "nll_bpd": 5.25,
               "nll_bpd_se": 0.5, "nll_images": 8, "stand_in": True}  # fmt: skip
    (tmp_path / "metrics").mkdir()
    (tmp_path / layout.metrics_path(variant)).write_text(json.dumps(metrics))
    (tmp_path / "reports").mkdir()
    pd.DataFrame(
        [{"variant": variant, "FID paper": 3.17, "FID ours": fid, "FID ours err": 1.5,
          "FID ours n": 16, "FID margin": 0.5, "FID verdict": "n/a (stand-in)"}]
    ).to_csv(tmp_path / "reports" / "table2.csv", index=False)  # fmt: skip
    return cfg, var


def test_export_folder_and_model_card(tmp_path):
    cfg, var = project(tmp_path)
    lock = {"stages": {"train@eps_fixed_mse": {"outs": [
        {"path": "models/eps_fixed_mse", "hash": "md5", "md5": "9b05.dir"}]}}}  # fmt: skip
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    done = write_export(cfg, var, "fixedlarge", tmp_path)
    folder = tmp_path / "export" / "eps_fixed_mse"
    assert done.folder == folder and (folder / "model_index.json").is_file()
    spec = json.loads((folder / "ddpm.json").read_text())
    assert spec["mean_type"] == "eps" and spec["diffusion"]["num_timesteps"] == T
    card = (folder / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "diffusers"
    assert meta["pipeline_tag"] == "unconditional-image-generation"
    assert "stand-in" in meta["tags"] and "model-index" not in meta  # stand-in: no hub figures
    assert "stand-in, not comparable to published numbers" in card
    assert "| FID | 3.17 | 41.5 ± 1.5 (16) | 0.5 | n/a (stand-in) |" in card
    assert "DDPMPipeline.from_pretrained" in card and "models:/ddpm-tiny-eps_fixed_mse@best" in card
    assert f"num_inference_steps={T}" in card
    assert "recorded models/eps_fixed_mse as `md5 9b05.dir`" in card
    first = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    write_export(cfg, var, "fixedlarge", tmp_path)  # the same inputs: the same bytes
    again = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert again == first


def test_a_variant_diffusers_cannot_sample_says_so_on_its_card(tmp_path):
    cfg, var = project(tmp_path, "xprev_fixed_kl")
    write_export(cfg, var, "fixedlarge", tmp_path)
    folder = tmp_path / "export" / "xprev_fixed_kl"
    assert not (folder / "model_index.json").exists() and (folder / "unet").is_dir()
    card = (folder / "README.md").read_text()
    assert "diffusers cannot sample this variant" in card and "posterior-mean" in card


def test_registered_model_samples_and_a_rerun_adds_no_version(tmp_path, monkeypatch):
    """Real MLflow (SQLite store): the pyfunc loads by alias and samples; the same weights
    again add no version; better weights get their own version and the alias."""
    import mlflow

    from pipeline.report import registry, tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg, var = project(tmp_path / "a")
    tracking.setup(cfg, tmp_path)
    with mlflow.start_run() as run:
        pass
    done = write_export(cfg, var, "fixedlarge", tmp_path / "a")
    facts = done.facts
    tags = registry.version_tags(facts.metrics, registry.model_card_verdict(facts), "abc")
    version, added = registry.register_export(
        done.folder, facts.name, run.info.run_id, facts.weights_sha256, tags
    )
    assert (version, added) == ("1", True)
    assert registry.register_export(
        done.folder, facts.name, run.info.run_id, facts.weights_sha256, tags
    ) == ("1", False)  # a rerun with the same weights
    client = mlflow.MlflowClient()
    v1 = client.get_model_version_by_alias("ddpm-tiny-eps_fixed_mse", "best")
    assert str(v1.version) == "1" and v1.tags["fid"] == "41.5" and v1.tags["git_commit"] == "abc"
    assert v1.tags["verdict"] == "FID: n/a (stand-in)" and v1.tags["stand_in"] == "true"

    model = mlflow.pyfunc.load_model("models:/ddpm-tiny-eps_fixed_mse@best")
    images = model.predict({"n": 4, "seed": 0})
    assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8
    assert np.array_equal(images, model.predict({"n": 4, "seed": 0}))  # seeded
    assert not np.array_equal(images, model.predict({"n": 4, "seed": 1}))
    with pytest.raises(ValueError, match="1 to 10000"):
        model.predict({"n": 0})

    # new weights with a lower FID: version 2 takes the alias; a worse one would not
    other = tmp_path / "b"
    cfg_b, var_b = project(other, fid=30.0)
    save_weights(other / layout.model_dir("eps_fixed_mse") / "ema.pt", tiny_unet(seed=5), {})
    done_b = write_export(cfg_b, var_b, "fixedlarge", other)
    tags_b = registry.version_tags(done_b.facts.metrics, "FID: n/a (stand-in)", "def")
    assert registry.register_export(
        done_b.folder, facts.name, run.info.run_id, done_b.facts.weights_sha256, tags_b
    ) == ("2", True)
    assert str(client.get_model_version_by_alias("ddpm-tiny-eps_fixed_mse", "best").version) == "2"
