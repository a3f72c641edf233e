"""An authenticated MLflow server: credentials only from the environment, a refusal is one line.

Real components: ``mlflow server --app-name basic-auth`` on 127.0.0.1 (tests/two_node.py's
``auth_mlflow_server``: an admin and a user made for the test through the REST API). A user
with MLFLOW_TRACKING_USERNAME/PASSWORD in the environment logs a variant run that the admin
reads back; ``stages.repro`` without credentials or with a wrong password stops before any work
with one ``error:`` line and no traceback; a stage whose user may not write to the experiment
(HTTP 403) stops with one line too (pipeline.cli.entry_point). The two-node job logs to such a
server as that user (tests/test_two_node.py).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import mlflow
import pytest
from repo_copy import BIN, copy_repo, env
from two_node import auth_mlflow_server, credentials

from pipeline.cli import entry_point
from pipeline.config import load_config
from pipeline.report import tracking

ROOT = Path(__file__).resolve().parents[1]
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with auth_mlflow_server(tmp_path_factory.mktemp("mlflow-auth")) as running:
        yield running


@pytest.fixture
def project(tmp_path, monkeypatch, server):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    for name in CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def as_user(monkeypatch, creds: dict[str, str]) -> None:
    for name, value in creds.items():
        monkeypatch.setenv(name, value)


def test_a_user_logs_with_credentials_from_the_environment_only(project, server, monkeypatch):
    cfg = load_config(scale="tiny")
    as_user(monkeypatch, server.user)
    run_id = tracking.start_variant_run(cfg, cfg.variant("eps_fixed_mse"))
    with tracking.variant_run(cfg, run_id):
        mlflow.log_metric("fid_train", 12.5)
    as_user(monkeypatch, server.admin)  # read back by another account
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.data.metrics["fid_train"] == 12.5
    assert run.data.tags[tracking.TAG_VARIANT] == "eps_fixed_mse"
    secret = server.user["MLFLOW_TRACKING_PASSWORD"]
    assert not [v for v in (*run.data.params.values(), *run.data.tags.values()) if secret in v]


def repro(repo: Path, extra: dict[str, str]):
    import subprocess

    return subprocess.run(
        [BIN / "python", "-m", "stages.repro"], cwd=repo, env=env(**extra),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_a_run_without_credentials_stops_with_one_error_line(server, tmp_path):
    """``stages.repro`` asks the server once before any stage: no credentials, or a wrong
    password, is one ``error:`` line (what is set, never a value), status 2, no traceback."""
    repo = copy_repo(tmp_path / "repo", variants={"eps_fixed_mse"})
    wrong = credentials("ddpm-test", "not-the-password")
    for extra, why in (({}, "no credentials given"), (wrong, "were not accepted")):
        run = repro(repo, {"MLFLOW_TRACKING_URI": server.uri, **extra})
        out = run.stdout + run.stderr
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert run.returncode == 2 and len(errors) == 1, out[-3000:]
        assert "HTTP 401" in errors[0] and why in errors[0], errors
        assert server.uri in errors[0] and "MLFLOW_TRACKING_USERNAME" in errors[0]
        assert "Traceback" not in out and "Running stage" not in out
        assert "not-the-password" not in out
        assert not (repo / "data").exists()


def test_a_stage_refused_by_the_server_is_one_line(project, server, monkeypatch, capsys):
    """entry_point: a 401 anywhere in a stage (here the store's setup) and a 403 (the user may
    only read the admin's experiment) are one ``error:`` line each, exit status 2."""
    cfg = load_config(scale="tiny")

    @entry_point
    def stage(argv: list[str] | None = None) -> None:
        tracking.start_variant_run(cfg, cfg.variant("eps_fixed_mse"))

    with pytest.raises(SystemExit) as stopped:
        stage([])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "HTTP 401" in err and "Traceback" not in err, err

    as_user(monkeypatch, server.admin)
    mlflow.create_experiment("admin-only")
    cfg = dataclasses.replace(cfg, mlflow=dataclasses.replace(cfg.mlflow, experiment="admin-only"))
    as_user(monkeypatch, server.user)
    with pytest.raises(SystemExit) as stopped:
        stage([])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "HTTP 403" in err and "ddpm-test may not" in err, err
