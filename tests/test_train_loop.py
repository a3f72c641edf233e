"""The training loop in this process (no Ray): learning, exact resume, divergence, export, errors.

The loop runs through :class:`LocalSession`, which keeps checkpoints in a folder with Ray
Train's semantics; the Ray Train runs themselves are in test_train_ray.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from train_project import ROOT, VARIANT, make_project, tiny_config, tiny_params

from pipeline.config import config_from_dict
from pipeline.errors import ConfigError, DataError
from pipeline.model.weights import load_weights, sha256_file
from pipeline.training import faults
from pipeline.training.checkpoint import read_checkpoint
from pipeline.training.export import export_weights
from pipeline.training.identity import run_identity
from pipeline.training.loop import TrainJob, run_worker
from pipeline.training.session import LocalSession
from pipeline.training.trainer import check_data, check_train_config

RUN = {"name": "test-run", "config_hash": "0123"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    cfg = make_project(root)
    return root / "data" / cfg.scale


def job(data: Path, run_dir: Path, fault: str | None = None, **train) -> TrainJob:
    cfg = tiny_config(**{"num_workers": 1, **train})
    spec = faults.parse(fault) if fault else None
    return TrainJob(cfg, cfg.variant(VARIANT), str(data), str(run_dir), RUN, fault=spec)


def test_loss_goes_down(data, tmp_path):
    session = LocalSession(tmp_path / "ck", keep=2)
    outcome = run_worker(job(data, tmp_path, steps=40, log_every=10, checkpoint_every=10), session)
    assert outcome == {"status": "finished", "start": 0, "step": 40, "bad_step": None}
    assert [r["step"] for r in session.reports] == [10, 20, 30, 40]
    assert sorted(p.name for p in session.folder.iterdir()) == [
        "checkpoint_000000030",
        "checkpoint_000000040",
    ]
    curve = [r["loss"] for r in session.reports]  # mean loss of each 10 steps
    assert curve[-1] < 0.6 * curve[0], curve


def test_resume_from_a_checkpoint_is_bit_exact(data, tmp_path):
    whole = LocalSession(tmp_path / "whole")
    run_worker(job(data, tmp_path, steps=8, checkpoint_every=4), whole)
    parts = LocalSession(tmp_path / "parts")
    run_worker(job(data, tmp_path, steps=8, checkpoint_every=4), parts)
    shutil.rmtree(parts.folder / "checkpoint_000000008")  # as if killed after step 4's checkpoint
    outcome = run_worker(job(data, tmp_path, steps=8, checkpoint_every=4), parts)
    assert outcome["start"] == 4
    a = read_checkpoint(whole.folder / "checkpoint_000000008")
    b = read_checkpoint(parts.folder / "checkpoint_000000008")
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])


@pytest.mark.parametrize("variant", ["eps_learned_kl", "xprev_fixed_kl"])
def test_bf16_channels_last_and_the_bound_train(data, tmp_path, variant):
    j = job(data, tmp_path, steps=4, checkpoint_every=4, bf16=True, channels_last=True)
    j = dataclasses.replace(j, variant=j.cfg.variant(variant))
    session = LocalSession(tmp_path / "ck")
    assert run_worker(j, session)["status"] == "finished"
    (report,) = session.reports
    assert report["step"] == 4 and 0 < report["loss"] < float("inf")


def test_non_finite_loss_stops_before_saving(data, tmp_path):
    session = LocalSession(tmp_path / "ck")
    outcome = run_worker(
        job(data, tmp_path, fault="nan:0:5", steps=12, log_every=2, checkpoint_every=4), session
    )
    assert outcome == {"status": "diverged", "start": 0, "step": 6, "bad_step": 5}
    assert [r["step"] for r in session.reports] == [4]  # nothing saved after the NaN


def test_export_writes_the_ema_weights_and_model_json(data, tmp_path):
    session = LocalSession(tmp_path / "ck")
    j = job(data, tmp_path, steps=4, checkpoint_every=4)
    run_worker(j, session)
    folder = session.folder / "checkpoint_000000004"
    info = export_weights(folder, tmp_path / "models" / VARIANT, j.cfg, j.variant, RUN)
    out = tmp_path / "models" / VARIANT
    assert json.loads((out / "model.json").read_text()) == info
    assert info["ema_sha256"] == sha256_file(out / "ema.pt")
    assert {k: info[k] for k in ("variant", "mean_type", "var_type", "loss_type", "steps")} == {
        "variant": VARIANT,
        "mean_type": "eps",
        "var_type": "fixedlarge",
        "loss_type": "mse",
        "steps": 4,
    }
    assert (info["run_name"], info["source"], info["resolution"]) == (RUN["name"], "trained", 8)
    assert not any("mlflow" in k or "seconds" in k for k in info)  # dvc.lock hashes model.json
    payload = read_checkpoint(folder)
    for name, key in (("ema.pt", "ema"), ("model.pt", "model")):
        model, meta = load_weights(out / name)
        assert meta["weights"] == key and meta["step"] == 4
        assert all(torch.equal(v, payload[key][k]) for k, v in model.state_dict().items())
    assert not torch.equal(payload["ema"]["conv_in.weight"], payload["model"]["conv_in.weight"])
    assert [p.name for p in (tmp_path / "models").iterdir()] == [VARIANT]  # no temporaries


def test_run_identity_follows_what_changes_the_weights(data):
    base = run_identity(tiny_config(), tiny_config().variant(VARIANT), data)["name"]
    assert base.startswith(f"{VARIANT}-")
    same = [
        dict(log_every=2),
        dict(num_workers=1),
        dict(torch_threads=2),
        dict(max_failures=0),
        dict(checkpoint_every=2),
    ]
    for train in same:
        cfg = tiny_config(**train)
        assert run_identity(cfg, cfg.variant(VARIANT), data)["name"] == base, train
    for train in (dict(lr=1e-4), dict(seed=1), dict(steps=13), dict(bf16=True)):
        cfg = tiny_config(**train)
        assert run_identity(cfg, cfg.variant(VARIANT), data)["name"] != base, train
    cfg = tiny_config()
    assert run_identity(cfg, cfg.variant("eps_fixed_kl"), data)["name"] != base


def test_bad_params_are_clear_errors(data):
    with pytest.raises(ConfigError, match=r"batch_size \(8\) must be divisible by .*\(3\)"):
        tiny_config(num_workers=3)
    with pytest.raises(ConfigError, match=r"unknown variant 'nope'; params\.yaml defines: "):
        tiny_config().variant("nope")
    for train, key in ((dict(torch_threads=0), "torch_threads"), (dict(lr=0), "lr")):
        with pytest.raises(ConfigError, match=f"train.{key} must be"):
            check_train_config(tiny_config(**train))
    wrong = config_from_dict(tiny_params())
    wrong = dataclasses.replace(wrong, data=dataclasses.replace(wrong.data, resolution=16))
    with pytest.raises(ConfigError, match=r"holds 8x8 images but .*resolution is 16"):
        check_data(wrong, data)
    with pytest.raises(DataError, match="no prepared data"):
        check_data(tiny_config(), data.parent / "missing")


def test_stage_reports_user_errors_in_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    env = {"PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)}
    for args, message in (
        (["--variant", "nope"], "error: unknown variant 'nope'"),
        (["--variant", VARIANT], "error: "),  # no prepared data
    ):
        run = subprocess.run(
            [sys.executable, "-m", "stages.train", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1, run.stderr
        assert lines[0].startswith(message)
    assert not (tmp_path / "models").exists()
