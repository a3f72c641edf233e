"""Published weights in place of training (model.source: checkpoint), through DVC."""

from __future__ import annotations

import json
import subprocess

import diffusers  # noqa: F401  (dev extra: a missing install fails here, never skips)
import mlflow
import pandas as pd
import pytest
import torch
import yaml
from data_formats import ddpm_unet
from repo_copy import PARAMS, ROOT, copy_repo, env

from pipeline.config import load_config

TINY = load_config(PARAMS, "tiny")


def write_checkpoint(
    folder,
    num_timesteps=TINY.diffusion.num_timesteps,
    resolution=8,
    prediction_type="epsilon",
    variance_type="fixed_large",
):
    """A randomly initialised diffusers-format DDPM checkpoint in the tiny layout."""
    layout = {
        "block_out_channels": (32, 64),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "sample_size": resolution,
    }
    unet = ddpm_unet(layout, layers_per_block=1)
    unet.save_pretrained(folder)
    d = TINY.diffusion
    scheduler = {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": num_timesteps,
        "beta_start": d.beta_start,
        "beta_end": d.beta_end,
        "beta_schedule": "linear",
        "variance_type": variance_type,
        "prediction_type": prediction_type,
    }
    (folder / "scheduler_config.json").write_text(json.dumps(scheduler))
    return folder


def run(cmd, cwd):
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)


@pytest.mark.e2e
def test_published_weights_go_through_sample_evaluate_and_report(tmp_path):
    # the published variant and one it cannot stand for (the other four would only repeat the
    # skip, three stage processes each: ~50 s of CI); xprev_fixed_kl is absent (Table 2: not run)
    repo = copy_repo(tmp_path / "repo", variants={"eps_fixed_mse", "eps_fixed_kl"})
    ckpt = write_checkpoint(tmp_path / "ddpm-tiny")
    exp = run(
        ["dvc", "exp", "run", "-S", "+presets.tiny.model.source=checkpoint",
         "-S", f"+presets.tiny.model.checkpoint={ckpt}"],
        repo,
    )  # fmt: skip
    assert exp.returncode == 0, exp.stdout[-3000:] + exp.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ddpm-repro"])
    variants = runs[runs["tags.ddpm.variant"].notna()].set_index("tags.ddpm.variant")
    assert list(variants.index) == ["eps_fixed_mse"]  # the only variant the weights are
    published = variants.loc["eps_fixed_mse"]
    assert published["tags.ddpm.source"] == "published weights"
    sha = subprocess.run(
        ["sha256sum", ckpt / "diffusion_pytorch_model.safetensors"], capture_output=True, text=True
    ).stdout.split()[0]
    assert published["tags.ddpm.checkpoint_sha256"] == sha
    for metric in ("fid_train", "fid_test", "is_mean", "nll_bpd"):
        assert pd.notna(published[f"metrics.{metric}"]), metric
    model_json = json.loads((repo / "models/eps_fixed_mse/model.json").read_text())
    assert model_json["source"] == "published weights" and model_json["checkpoint_sha256"] == sha
    skipped = json.loads((repo / "metrics/eps_fixed_kl.json").read_text())
    assert "published weights of eps_fixed_mse only" in skipped["skipped"]
    t2 = pd.read_csv(repo / "reports/table2.csv").set_index("variant")
    assert "published weights" in t2.loc["eps_fixed_mse", "note"]
    assert t2.loc["eps_fixed_mse", "FID ours"] == pytest.approx(published["metrics.fid_train"])
    assert "not run" in t2.loc["xprev_fixed_kl", "note"]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder at the tiny scale whose L_simple variant reads a checkpoint."""
    params = yaml.safe_load(PARAMS.read_text())
    params["scale"] = "tiny"
    params["presets"]["tiny"]["model"].update(source="checkpoint", checkpoint=str(tmp_path / "ck"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def train_stage(capsys, variant="eps_fixed_mse"):
    from stages import train

    with pytest.raises(SystemExit) as exit_info:
        train.main(["--variant", variant])
    lines = capsys.readouterr().err.strip().splitlines()
    return exit_info.value.code, lines


def test_missing_key_is_named_in_one_line(project, capsys):
    from safetensors.torch import load_file, save_file

    weights = write_checkpoint(project / "ck") / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    del sd["mid_block.attentions.0.to_q.weight"]
    save_file(sd, str(weights))
    code, lines = train_stage(capsys)
    assert code == 2 and len(lines) == 1
    assert "missing" in lines[0] and "mid_attn_1.qkv.weight" in lines[0]
    assert not (project / "models" / "eps_fixed_mse").exists()


def test_wrong_shape_is_named_in_one_line(project, capsys):
    from safetensors.torch import load_file, save_file

    weights = write_checkpoint(project / "ck") / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    sd["conv_out.weight"] = torch.zeros(3, 32, 1, 1)
    save_file(sd, str(weights))
    code, lines = train_stage(capsys)
    assert code == 2 and len(lines) == 1
    assert "conv_out.weight" in lines[0] and "(3, 32, 1, 1)" in lines[0]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_timesteps": 1000}, "trained with {'num_train_timesteps': 1000}"),
        ({"resolution": 16}, "is for 16x16 images, but presets.tiny.data.resolution is 8"),
        ({"prediction_type": "sample"}, "predicts 'sample' (scheduler prediction_type)"),
        ({"variance_type": "fixed_small"}, "samples with variance_type 'fixed_small', but"),
    ],
)
def test_checkpoint_for_another_process_is_refused(project, capsys, kwargs, message):
    write_checkpoint(project / "ck", **kwargs)
    code, lines = train_stage(capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0]


def dvc_outs(variant: str) -> list[str]:
    """The outs dvc.yaml declares for the variant's train, sample and evaluate stages."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outs = []
    for name in ("train", "sample", "evaluate"):
        for out in stages[name]["do"]["outs"] + stages[name]["do"].get("metrics", []):
            path = out if isinstance(out, str) else next(iter(out))
            outs.append(path.replace("${key}", variant))
    return outs


def test_other_variants_are_marked_not_run(project, capsys):
    from stages import evaluate, sample, train

    for stage in (train, sample, evaluate):
        stage.main(["--variant", "xprev_learned_kl"])
    marker = json.loads((project / "models/xprev_learned_kl/model.json").read_text())
    assert "published weights of eps_fixed_mse only" in marker["skipped"]
    outs = dvc_outs("xprev_learned_kl")
    assert len(outs) >= 7  # models, samples, figures, metrics, plots, work/{sample,nll,fid}
    for out in outs:  # every declared output exists, and no folder is bare
        path = project / out
        assert path.exists(), out
        assert path.is_file() or any(path.iterdir()), out
    csv = (project / "plots/xprev_learned_kl/rate_distortion.csv").read_text()
    assert csv.startswith("t,steps,T_minus_t,rate_bpd") and csv.count("\n") == 1  # header only
    assert not (project / "mlflow.db").exists()  # nothing was tracked for it


def test_sampler_variance_follows_the_scale_and_the_checkpoint_must_agree():
    """The LSUN presets sample with beta~_t (sample.var_type fixedsmall, the official LSUN
    sampler), CIFAR10 with the variant's beta_t; a checkpoint's scheduler must agree."""
    from pipeline.errors import ConfigError
    from pipeline.sampling.job import sampler_var_type
    from pipeline.training.published import _check_variance

    lsun = load_config(PARAMS, "published_lsun_church")
    cifar = load_config(PARAMS, "published")
    variant = lsun.variant("eps_fixed_mse")
    assert sampler_var_type(lsun, variant) == "fixedsmall"
    assert sampler_var_type(cifar, variant) == "fixedlarge"
    for scale in ("paper_lsun_church", "paper_lsun_bedroom", "paper_lsun_cat"):
        assert sampler_var_type(load_config(PARAMS, scale), variant) == "fixedsmall"
    _check_variance(lsun, variant, {"variance_type": "fixed_small"}, "x")  # accepted
    _check_variance(cifar, variant, {"variance_type": "fixed_large"}, "x")
    with pytest.raises(ConfigError, match=r"set presets\.published_lsun_church\.sample\.var_type"):
        _check_variance(lsun, variant, {"variance_type": "fixed_large"}, "x")
    with pytest.raises(ConfigError, match="cannot replace the learned variance"):
        sampler_var_type(lsun, lsun.variant("eps_learned_kl"))
