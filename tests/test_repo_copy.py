"""The test repos are the project as committed, never the state of the checkout (issue 42).

A checkout after ``make repro`` holds a staged dvc.lock (``core.autostage``), run outputs and an
MLflow store, and perhaps a params.yaml edited by ``dvc exp run -S``: none of it may reach the
repos the tests run the pipeline in. The working tree's edits to code do (tests/repo_copy.py
says why).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from repo_copy import PARAMS, ROOT, copy_repo

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        [*GIT, *args], cwd=repo, capture_output=True, text=True, check=True
    ).stdout


@pytest.fixture
def used_checkout(tmp_path: Path) -> Path:
    """A throwaway clone of this project in the state a finished ``make repro`` leaves, and
    then some: a staged dvc.lock, an edited params.yaml, run outputs, an MLflow store, an
    untracked file, and an uncommitted edit to a module."""
    clone = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    (clone / "dvc.lock").write_text("schema: '2.0'\nstages:\n  stale:\n    cmd: echo stale\n")
    git(clone, "add", "dvc.lock")
    params = clone / "params.yaml"
    params.write_text(params.read_text() + "\nedited_by_exp_run: 1\n")
    for output in ("models/eps_fixed_mse/ema.pt", "reports/index.html", "mlflow.db", "notes.txt"):
        (clone / output).parent.mkdir(parents=True, exist_ok=True)
        (clone / output).write_text("run output")
    module = clone / "pipeline" / "__init__.py"
    module.write_text(module.read_text() + "\n# an uncommitted edit under test\n")
    return clone


def test_a_test_repo_takes_nothing_from_a_used_checkout(used_checkout: Path, tmp_path: Path):
    repo = copy_repo(tmp_path / "repo", variants={"eps_fixed_mse"}, root=used_checkout)
    assert not (repo / "dvc.lock").exists()  # staged by autostage: a run record, not the project
    committed = yaml.safe_load(git(used_checkout, "show", "HEAD:params.yaml"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert "edited_by_exp_run" not in params
    assert params["presets"] == committed["presets"] and params["scale"] == "tiny"
    for output in ("models", "reports", "mlflow.db", "notes.txt"):
        assert not (repo / output).exists(), output
    # the code under test is the working tree's, as in the in-process tests
    assert (repo / "pipeline" / "__init__.py").read_text().endswith("under test\n")
    assert git(repo, "status", "--porcelain") == ""


def test_a_committed_run_record_stays_out_too(used_checkout: Path, tmp_path: Path):
    """A fork that commits its dvc.lock (as DVC users may) still gives lock-free test repos."""
    git(used_checkout, "commit", "-qm", "a reproduction's record")
    (used_checkout / "pipeline" / "layout.py").unlink()  # a deleted module is deleted there too
    repo = copy_repo(tmp_path / "repo", root=used_checkout)
    assert not (repo / "dvc.lock").exists()
    assert not (repo / "pipeline" / "layout.py").exists()


def test_params_of_the_in_process_tests_are_the_committed_ones():
    assert (
        PARAMS.read_bytes()
        == subprocess.run(
            ["git", "show", "HEAD:params.yaml"], cwd=ROOT, capture_output=True, check=True
        ).stdout
    )
