"""``dvc repro`` of the whole pipeline at the tiny scale (two variants) in a temporary git repo,
then ``dvc metrics show`` and ``dvc plots show`` as users call them. Slow (minutes): every
stage is a real process; they join the session's Ray instance (RAY_ADDRESS) to skip its start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from eval_project import ROOT
from repo_copy import PARAMS

VARIANTS = ("eps_fixed_mse", "xprev_learned_kl")  # 3 and 6 output channels


def dvc(repo: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    cmd = [shutil.which("dvc") or "dvc", *args]
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=1500)


@pytest.fixture(scope="module")
def repo(ray_session, tmp_path_factory):
    repo = tmp_path_factory.mktemp("dvcrepo")
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=ignore)
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load(PARAMS.read_text())
    params["scale"] = "tiny"
    params["variants"] = {v: params["variants"][v] for v in VARIANTS}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DDPM_"))}
    address = ray_session.get_runtime_context().gcs_address
    env.update(PYTHONPATH=str(repo), RAY_ADDRESS=address, DVC_NO_ANALYTICS="1")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True)
    run = dvc(repo, env, "repro")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return repo, env


@pytest.mark.slow
def test_metrics_show_lists_every_variant(repo):
    root, env = repo
    shown = dvc(root, env, "metrics", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    (workspace,) = json.loads(shown.stdout).values()  # keyed by revision: "" is the workspace
    data = workspace["data"]
    for v in VARIANTS:
        m = data[f"metrics/{v}.json"]["data"]
        assert m["stand_in"] is True and m["fid_test"] is not None and m["nll_bpd"] > 0


@pytest.mark.slow
def test_plots_show_draws_every_variant(repo):
    root, env = repo
    shown = dvc(root, env, "plots", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)["data"]
    for v in VARIANTS:
        (plot,) = data[f"plots/{v}/rate_distortion.csv"]
        assert len(plot["content"]["data"]["values"]) == 20  # one row per t, T = 20
    for name in ("distortion_vs_steps", "rate_vs_steps"):
        values = data[name][0]["content"]["data"]["values"]
        assert len(values) == 20 * len(VARIANTS)  # the default variants not run here are absent


@pytest.mark.slow
def test_second_repro_is_up_to_date_and_the_report_has_our_numbers(repo):
    root, env = repo
    again = dvc(root, env, "status")
    assert again.returncode == 0 and "changed" not in again.stdout, again.stdout
    table = (root / "reports" / "table1.md").read_text()
    assert "stand-in" in table
