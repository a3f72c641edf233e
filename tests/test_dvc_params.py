"""DVC knows every resolved setting a stage reads (stage ``config``, params.resolved.yaml): real
DVC in a temporary copy of the project at the tiny scale (one variant).

Most tests need every stage recorded in dvc.lock but none of their work: ``config`` runs for
real, the other stages' outputs are stand-in files recorded with ``dvc commit`` (no stage runs),
so ``dvc status`` names exactly the stages a change reaches. One test runs ``prepare`` for real:
one ``dvc repro`` runs ``config`` and then the stage that reads the new value.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from repo_copy import PARAMS, committed, copy_repo, env

from pipeline.config import DataConfig, TrainConfig, load_config
from stages.config import config_code, render, resolved

VARIANT = "eps_fixed_mse"
RESOLVED = "params.resolved.yaml"


def dvc(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["dvc", *args], cwd=repo, env=env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def stale(repo: Path) -> set[str]:
    """The stages `dvc status` calls changed."""
    return set(json.loads(dvc(repo, "status", "--json")))


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True
    )


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path}: {old!r}"
    path.write_text(text.replace(old, new))


def stand_in_outputs(repo: Path) -> list[str]:
    """A placeholder for every output of every stage but config; returns the stage names."""
    from dvc.repo import Repo

    names = []
    with Repo(str(repo)) as project:
        for stage in project.index.stages:
            names.append(stage.addressing.split(":")[-1])
            for out in stage.outs if stage.name != "config" else ():
                path = repo / out.def_path
                if path.suffix in (".json", ".csv", ".md"):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("{}\n")
                else:
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "stand-in.txt").write_text(f"{out.def_path}\n")
    return names


def test_the_committed_resolved_file_is_what_the_code_resolves():
    """params.resolved.yaml in git (what `dvc params diff` compares with) is current."""
    path = committed() / RESOLVED
    fix = f"run `python -m stages.config --write {RESOLVED}` and commit it"
    assert path.is_file(), f"{RESOLVED} is not committed; {fix}"
    assert path.read_text() == render(resolved(load_config(PARAMS))), f"{RESOLVED} is stale; {fix}"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> tuple[Path, set[str]]:
    """The copy with config run, every other stage recorded on stand-in outputs, committed."""
    repo = copy_repo(tmp_path_factory.mktemp("dvc-params") / "repo", variants={VARIANT})
    dvc(repo, "repro", "config")
    names = set(stand_in_outputs(repo))
    dvc(repo, "commit", "--force", "--quiet")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "recorded")
    assert stale(repo) == set()
    return repo, names


@pytest.fixture
def repo(recorded, tmp_path) -> Path:
    return Path(shutil.copytree(recorded[0], tmp_path / "repo", symlinks=True))


def test_a_default_changed_in_code_reruns_exactly_the_stages_that_read_it(repo):
    """eval.fid_bootstrap (the tiny preset leaves it out): the stages that list eval."""
    edit(repo / "pipeline" / "config.py", "fid_bootstrap: int = 100", "fid_bootstrap: int = 50")
    assert stale(repo) == {"config"}  # the resolved file changes when config runs
    dvc(repo, "repro", "config")
    assert stale(repo) == {"reference", "train_reference", f"evaluate@{VARIANT}", "report"}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    # what the stages will record: the new value (they have not run: dvc.lock has the old one)
    assert yaml.safe_load((repo / RESOLVED).read_text())["eval"]["fid_bootstrap"] == 50
    assert lock[f"evaluate@{VARIANT}"]["params"][RESOLVED]["eval"]["fid_bootstrap"] == 100


def recorded_names(repo: Path) -> set[str]:
    return set(yaml.safe_load((repo / "dvc.lock").read_text())["stages"])


def test_a_derived_default_and_a_rule_in_config_py_rerun_every_stage(repo):
    """data.random_flip follows flip_source's list of datasets trained without flips: the
    resolved value changes, and so does config_code (the list is logic, not a default)."""
    path = repo / "pipeline" / "config.py"
    before = config_code(path)
    edit(path, '"official": ("lsun_cat",)', '"official": ("synthetic",)')
    assert config_code(path) != before
    dvc(repo, "repro", "config")
    assert yaml.safe_load((repo / RESOLVED).read_text())["data"]["random_flip"] is False
    assert stale(repo) == recorded_names(repo) - {"config"}


def test_a_comment_and_a_preset_key_set_to_its_default_rerun_only_config(repo):
    """Nothing real changed: config reruns, its output is the same bytes, no other stage."""
    path = repo / "pipeline" / "config.py"
    edit(path, "\ndef load_config(", "\n# a comment\ndef load_config(")
    edit(path, '"""The forward process: a linear', '"""The forward process, a linear')
    params = yaml.safe_load((repo / "params.yaml").read_text())
    tiny = params["presets"]["tiny"]
    assert "fid_bootstrap" not in tiny["eval"] and "grad_clip" not in tiny["train"]
    tiny["eval"]["fid_bootstrap"] = 100
    tiny["train"]["grad_clip"] = 1.0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stale(repo) == {"config"}
    dvc(repo, "repro", "config")
    assert stale(repo) == set()


def test_an_edit_to_a_data_module_makes_prepare_and_train_stale(repo):
    loaders = repo / "pipeline" / "data" / "loaders.py"
    loaders.write_text(loaders.read_text() + "# an edit\n")
    found = stale(repo)
    assert {"prepare", f"train@{VARIANT}"} <= found and "config" not in found


def test_dvc_lock_holds_resolved_values_params_yaml_leaves_out(recorded):
    repo, _ = recorded
    tiny = yaml.safe_load((repo / "params.yaml").read_text())["presets"]["tiny"]
    assert "grad_clip" not in tiny["train"] and "random_flip" not in tiny["data"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    train = lock[f"train@{VARIANT}"]["params"][RESOLVED]
    assert train["train"]["grad_clip"] == TrainConfig().grad_clip
    assert train["train"]["steps"] == tiny["train"]["steps"]  # what the preset sets
    want = {"mean_type": "eps", "var_type": "fixedlarge", "loss_type": "mse"}
    assert train[f"variants.{VARIANT}"] == want  # a key: DVC records it dotted
    assert train["config_code"] == config_code(repo / "pipeline" / "config.py")
    prepare = lock["prepare"]["params"][RESOLVED]
    assert prepare["data"]["random_flip"] is True  # derived: synthetic data is flipped
    assert prepare["data"]["shard_size"] == DataConfig().shard_size
    featurenet = lock["featurenet"]["params"][RESOLVED]  # keys, not the eval section
    assert set(featurenet) == {"config_code", "scale", "eval.inception_weights",
                               "eval.classifier_epochs", "eval.seed"}  # fmt: skip


def test_exp_run_set_and_params_diff_work_on_params_yaml(repo):
    """`dvc exp run -S` sets params.yaml's key (``+``: one the preset leaves out); `dvc params
    diff` shows it and what it resolves to, and nothing else."""
    dvc(repo, "exp", "run", "config", "-S", "+presets.tiny.eval.fid_bootstrap=7")
    diff = json.loads(dvc(repo, "params", "diff", "--json"))
    assert diff == {
        "params.yaml": {"presets.tiny.eval.fid_bootstrap": {"old": None, "new": 7}},
        RESOLVED: {"eval.fid_bootstrap": {"old": 100, "new": 7, "diff": -93}},
    }


def test_one_repro_runs_config_then_the_stage_that_reads_the_new_default(tmp_path):
    """prepare for real: DVC reads the resolved params again after config ran."""
    repo = copy_repo(tmp_path / "repo", variants={VARIANT})
    first = dvc(repo, "repro", "prepare")
    assert "Running stage 'config'" in first and "Running stage 'prepare'" in first
    edit(repo / "pipeline" / "config.py", "shard_size: int = 10_000", "shard_size: int = 5_000")
    again = dvc(repo, "repro", "prepare")
    assert re.search(r"Running stage 'config'.*Running stage 'prepare'", again, re.S), again
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert lock["prepare"]["params"][RESOLVED]["data"]["shard_size"] == 5000
    assert "Running stage" not in dvc(repo, "repro", "prepare")
