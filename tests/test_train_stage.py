"""The train stage as users run it: ``dvc repro``, a killed run that resumes, a finished rerun.

Slow (each stage run starts its own local Ray cluster): run with ``make test-slow``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from train_project import ROOT, VARIANT, registered, tiny_params

from pipeline.model.weights import load_weights
from pipeline.training import faults

pytestmark = pytest.mark.slow


def environment(pythonpath: Path, **extra: str) -> dict[str, str]:
    """A user's shell: this venv first on PATH, the project on PYTHONPATH, no test hooks."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "PATH": path, "DVC_NO_ANALYTICS": "1"}
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", faults.ENV):
        env.pop(key, None)
    return {**env, **extra}


def make_repo(repo: Path) -> Path:
    """A DVC project with this project's code, the tiny params and dvc.yaml's prepare + train."""
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("pipeline", "stages"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=ignore)
    shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    keep = {k: stages[k] for k in ("config", "prepare", "train")}
    # tiny does not evaluate during training: train_reference (and the reference) left out
    keep["train"]["do"]["deps"].remove("work/train-reference/${scale}.json")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": keep}, sort_keys=False))
    run(["dvc", "init", "--no-scm", "-q"], repo)
    return repo


def run(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        command, cwd=cwd, env=environment(cwd, **env), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def stage(repo: Path, **env: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "stages.train", "--variant", VARIANT], repo, **env)


def model_json(repo: Path) -> dict:
    return json.loads((repo / "models" / VARIANT / "model.json").read_text())


def wait_for_group_exit(pgid: int, timeout: float = 30) -> None:
    """No process of the killed stage's group (Ray's included) is left behind."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise AssertionError(f"processes of group {pgid} survived the kill")


def ema(repo: Path) -> dict[str, torch.Tensor]:
    return load_weights(repo / "models" / VARIANT / "ema.pt")[0].state_dict()


def wait_for(predicate, what: str, process: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, f"the stage exited ({process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_killed_stage_resumes_and_ends_with_the_same_weights(tmp_path):
    reference = make_repo(tmp_path / "reference")
    out = run(["dvc", "repro", f"train@{VARIANT}"], reference).stdout
    assert "Running stage 'prepare'" in out and f"Running stage 'train@{VARIANT}'" in out
    assert f"trained {VARIANT} (from scratch): 12 steps" in out

    repo = make_repo(tmp_path / "killed")
    run(["dvc", "repro", "prepare"], repo)
    hang = "hang:0:6"  # rank 0 stops before step 6, after the checkpoint at step 4
    with (tmp_path / "log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "stages.train", "--variant", VARIANT],
            cwd=repo,
            env=environment(repo, **{faults.ENV: hang}),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            runs = repo / "checkpoints" / VARIANT
            wait_for(lambda: list(runs.glob("*/.test-fault-hang-0-6")), "the hang", process)
            # Ray Train's controller writes its snapshot after the hang may have begun
            wait_for(lambda: registered(runs, "checkpoint_000000004"), "step 4", process)
        finally:
            os.killpg(process.pid, signal.SIGKILL)  # the driver, its Ray cluster and workers
            process.wait()
    assert not (repo / "models").exists()
    wait_for_group_exit(process.pid)

    resumed = stage(repo, **{faults.ENV: hang})  # the same command again
    assert f"trained {VARIANT} (resumed at step 4): 12 steps" in resumed.stdout
    assert "resumed from the checkpoint at step 4" in resumed.stderr
    a, b = ema(reference), ema(repo)
    assert all(torch.equal(a[k], b[k]) for k in a)
    first = model_json(repo)
    assert first["ema_sha256"] == model_json(reference)["ema_sha256"]  # the same bytes

    again = stage(repo)  # a finished run: nothing to train, the same output and MLflow run
    assert f"trained {VARIANT} (resumed at step 12): 12 steps" in again.stdout
    assert model_json(repo) == first
