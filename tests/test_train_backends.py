"""train.backend: process (the loop in the train stage's process) against Ray Train.

The tiny scale, 12 steps of batch 8, dropout 0.1, a checkpoint every 4 steps (train_project).
A one-worker Ray Train run is the reference: the in-process run must give the same bits, keep
its checkpoints and MLflow curves as the Ray run does, restart a failed loop from its last
checkpoint, and resume a stopped run bit-identically.
"""

from __future__ import annotations

import dataclasses

import mlflow
import pytest
import ray
import torch
from train_project import VARIANT, make_project

from pipeline.cluster.raycluster import init_ray
from pipeline.config import RayConfig, config_from_dict
from pipeline.errors import ConfigError
from pipeline.model.weights import load_weights
from pipeline.training import faults
from pipeline.training.loop import TrainJob
from pipeline.training.trainer import _fit_here, train_variant


def train(root, monkeypatch, fault: str | None = None, **train_keys):
    """train_variant at tiny (one worker, dropout 0.1) in ``root`` with its own MLflow store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    if fault:
        monkeypatch.setenv(faults.ENV, fault)
    else:
        monkeypatch.delenv(faults.ENV, raising=False)
    cfg = make_project(root, num_workers=1, **train_keys)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.1))
    return train_variant(cfg, cfg.variant(VARIANT), root)


def weights(summary, name: str) -> dict[str, torch.Tensor]:
    model, _ = load_weights(summary.model_dir / name)
    return model.state_dict()


def same_bits(a, b) -> bool:
    return all(
        torch.equal(weights(a, n)[k], weights(b, n)[k])
        for n in ("model.pt", "ema.pt")
        for k in weights(a, n)
    )


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory):
    """The reference: one Ray Train worker (a local Ray instance, shut down after)."""
    init_ray(RayConfig(num_cpus=2))
    mp = pytest.MonkeyPatch()
    try:
        yield train(tmp_path_factory.mktemp("ray"), mp)
    finally:
        mp.undo()
        ray.shutdown()


@pytest.fixture(scope="module")
def process_run(tmp_path_factory, ray_run):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("process")
    try:
        yield train(root, mp, backend="process"), root
    finally:
        mp.undo()


def test_in_process_training_is_bit_identical_to_ray_train(ray_run, process_run):
    summary, root = process_run
    assert (summary.start, summary.restarts, summary.steps) == (0, [], 12)
    assert same_bits(summary, ray_run)
    # Each backend has its own run folder (a Ray run resumes only from Ray Train's records)
    assert summary.run_name != ray_run.run_name
    assert summary.run_name.startswith(f"{VARIANT}-")
    folder = root / "checkpoints" / VARIANT / summary.run_name
    assert sorted(p.name for p in folder.glob("checkpoint_*")) == [
        "checkpoint_000000008",
        "checkpoint_000000012",
    ]  # keep_checkpoints: 2
    assert not list(folder.rglob("checkpoint_manager_snapshot.json"))  # no Ray Train here


def test_in_process_run_logs_curves_and_tags_as_ray_does(process_run):
    summary, root = process_run
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(summary.mlflow_run_id)
    assert run.data.tags["ddpm.train_status"] == "finished"
    assert (run.data.tags["ddpm.world_size"], run.data.tags["ddpm.restarts"]) == ("1", "none")
    assert run.data.params["train.backend"] == "process"
    for key in ("loss", "lr", "grad_norm", "steps_per_s", "images_per_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [4, 8, 12]


def test_a_failed_loop_restarts_from_its_checkpoint_and_changes_nothing(
    ray_run, tmp_path, monkeypatch
):
    retried = train(tmp_path, monkeypatch, fault="fail:0:6", backend="process")
    assert retried.restarts == [4]  # failed before step 6: restarted from the checkpoint at 4
    assert same_bits(retried, ray_run)


def test_a_stopped_run_resumes_at_its_checkpoint_bit_identically(ray_run, tmp_path, monkeypatch):
    with pytest.raises(faults.InjectedFaultError):  # no retries: the stage ends at step 6
        train(tmp_path, monkeypatch, fault="fail:0:6", backend="process", max_failures=0)
    assert not (tmp_path / "models").exists()
    resumed = train(tmp_path, monkeypatch, backend="process", max_failures=0)
    assert (resumed.start, resumed.steps) == (4, 12)
    assert same_bits(resumed, ray_run)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"backend": "threads"}, "train.backend: .threads. is not one of ray, process"),
        ({"backend": "process", "num_workers": 2}, "needs num_workers 1, use_gpu false"),
        ({"backend": "process", "num_workers": 1, "use_gpu": True}, "needs num_workers 1"),
    ],
)
def test_bad_backend_settings_are_one_error_line(keys, message):
    from train_project import tiny_params

    with pytest.raises(ConfigError, match=message) as error:
        config_from_dict(tiny_params(**keys))
    assert "\n" not in str(error.value)


def test_in_process_training_refuses_a_bucket_run(tmp_path):
    from train_project import tiny_config

    cfg = tiny_config(backend="process", num_workers=1)
    job = TrainJob(cfg, cfg.variant(VARIANT), str(tmp_path), "s3://bucket/runs/x", {})
    with pytest.raises(ConfigError, match="use backend: ray"):
        _fit_here(job, "sqlite:///unused.db", "run")


def test_the_train_stage_stopped_by_sigterm_in_process_resumes_bit_identically(
    tmp_path, monkeypatch
):
    """The real stage command (tiny, backend process, dropout 0): SIGTERM while rank 0 hangs
    before step 6 ends it with status 143 and the stop line, no model written; the same command
    again resumes at step 4 and ends with the weights of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml
    from train_project import ROOT, tiny_params

    reference = train(tmp_path / "reference", monkeypatch, backend="process")  # dropout 0.1
    repo = tmp_path / "stage"
    make_project(repo, num_workers=1, backend="process")
    raw = tiny_params(num_workers=1, backend="process")
    raw["presets"]["tiny"]["model"]["dropout"] = 0.1
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT), faults.ENV: "hang:0:6"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "stages.train", "--variant", VARIANT]
    process = subprocess.Popen(command, cwd=repo, env=env, stderr=subprocess.PIPE, text=True)
    try:
        runs = repo / "checkpoints" / VARIANT
        deadline = time.monotonic() + 120
        while not list(runs.glob("*/.test-fault-hang-0-6")):  # after the checkpoint at step 4
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, stderr
    assert "interrupted: finished work is kept; rerun to resume" in stderr
    assert "Traceback" not in stderr
    assert not (repo / "models").exists()
    assert [p.name for p in runs.glob("*/checkpoint_*")] == ["checkpoint_000000004"]

    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"trained {VARIANT} (resumed at step 4): 12 steps" in done.stdout
    assert "resumed from the checkpoint at step 4" in done.stderr
    stage = load_weights(repo / "models" / VARIANT / "ema.pt")[0].state_dict()
    want = weights(reference, "ema.pt")
    assert all(torch.equal(stage[k], want[k]) for k in want)
