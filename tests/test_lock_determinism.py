"""dvc.lock is a function of params, code and inputs: two ``dvc repro`` from scratch of the same
params, in two copies of the project, record the same hashes (issue 24: side by side on a
cluster equals serial because every run of the same params writes the same).

The cheap stages only (config, prepare and the feature network, ~10 s a copy): the later ones are
covered at their own level (tests/test_train_ray.py: two trainings write the same models/
bytes; tests/test_report.py: a report written twice is the same bytes; tests/test_sampling.py:
the samples manifest names no run) and end to end by tests/test_cluster_parallel.py (slow).
"""

from __future__ import annotations

import json
import subprocess

import yaml
from repo_copy import copy_repo, env

STAGES = ("config", "prepare", "featurenet")


def repro(repo) -> dict:
    done = subprocess.run(
        ["dvc", "repro", STAGES[-1]], cwd=repo, env=env(), capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


def test_two_runs_of_the_same_params_record_the_same_hashes(tmp_path):
    locks = [repro(copy_repo(tmp_path / name, variants={"eps_fixed_mse"})) for name in "ab"]
    assert sorted(locks[0]) == sorted(STAGES)
    for stage in STAGES:
        assert locks[0][stage] == locks[1][stage], stage
    manifest = json.loads((tmp_path / "a" / "featurenet" / "tiny" / "manifest.json").read_text())
    assert manifest["used"] and not any("seconds" in k for k in manifest)  # the stage line's
