"""The ``prepare`` stage as users run it: the CLI (one error line, exit 2, no output) and DVC."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import data_formats
import pytest
import yaml
from data_formats import make_cifar_archive
from repo_copy import PARAMS

ROOT = Path(__file__).resolve().parents[1]


def environment(pythonpath: Path) -> dict[str, str]:
    """The environment of a user's shell: this venv first on PATH, bytecode written."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "PATH": path, "DVC_NO_ANALYTICS": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run_stage(cwd: Path, *args: str, params: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m stages.prepare`` in ``cwd`` with ``params`` as its params file (DDPM_PARAMS)."""
    env = environment(ROOT)
    if params is not None:
        (cwd / "custom.yaml").write_text(yaml.safe_dump(params))
        env["DDPM_PARAMS"] = str(cwd / "custom.yaml")
    command = [sys.executable, "-m", "stages.prepare", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def one_preset(data: dict) -> dict:
    return data_formats.one_preset(data, "mine")


def test_prepares_the_tiny_scale(tmp_path):
    shutil.copy(PARAMS, tmp_path)
    run = run_stage(tmp_path, "--scale", "tiny")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("prepared synthetic in data/tiny: train 64 x 8x8x3, test 32 x")
    assert "stand-in" in run.stdout
    assert (tmp_path / "data" / "tiny" / "manifest.json").is_file()


def assert_one_error_line(run: subprocess.CompletedProcess, cwd: Path, pattern: str) -> None:
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert pattern in lines[0]
    assert not (cwd / "data").exists() or not list((cwd / "data").iterdir())


def test_wrong_checksum(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    md5, _ = make_cifar_archive(archive, per_batch=4, n_test=4)
    params = one_preset({"dataset": "cifar10", "source": str(archive), "md5": "f" * 32})
    run = run_stage(tmp_path, params=params)
    assert_one_error_line(run, tmp_path, f"md5 {md5} does not match the expected {'f' * 32}")


def test_missing_archive(tmp_path):
    params = one_preset({"dataset": "cifar10", "source": "nowhere/cifar-10-python.tar.gz"})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    run = run_stage(tmp_path, "--params", "p.yaml")
    assert_one_error_line(run, tmp_path, "no such file; set presets.mine.data.source")


def test_lsun_without_a_source(tmp_path):
    run = run_stage(tmp_path, params=one_preset({"dataset": "lsun_cat", "resolution": 256}))
    assert_one_error_line(run, tmp_path, "download it from the LSUN project")


def test_corrupt_archive(tmp_path):
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 64)  # a gzip header, then nothing valid
    md5 = hashlib.md5(bad.read_bytes()).hexdigest()
    params = one_preset({"dataset": "cifar10", "source": str(bad), "md5": md5})
    run = run_stage(tmp_path, params=params)
    assert_one_error_line(run, tmp_path, "not a readable cifar-10-python.tar.gz")


def dvc(repo: Path, *args: str) -> str:
    run = subprocess.run(
        ["dvc", *args], cwd=repo, env=environment(repo), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def set_param(repo: Path, keys: str, value: object) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    *path, last = keys.split(".")
    node = params
    for key in path:
        node = node[key]
    node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def repo(tmp_path) -> Path:
    """A DVC project with this project's code, params.yaml and dvc.yaml's config and prepare
    stages (config resolves the params prepare reads)."""
    repo = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("pipeline", "stages"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=ignore)
    for name in ("params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    keep = {name: stages[name] for name in ("config", "prepare")}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": keep}, sort_keys=False))
    set_param(repo, "scale", "tiny")
    dvc(repo, "init", "--no-scm", "-q")
    return repo


def test_dvc_repro_reruns_prepare_only_when_its_params_change(repo):
    manifest = repo / "data" / "tiny" / "manifest.json"
    assert "Running stage 'prepare'" in dvc(repo, "repro", "prepare")
    first = manifest.stat().st_mtime_ns
    assert "Running stage" not in dvc(repo, "repro", "prepare")
    stamp = os.stat(repo / "pipeline" / "data" / "lsun.py").st_mtime_ns + 10**9
    os.utime(repo / "pipeline" / "data" / "lsun.py", ns=(stamp, stamp))  # as a git checkout does
    subprocess.run([sys.executable, "-c", "import pipeline.data"], cwd=repo, env=environment(repo))
    assert "Running stage" not in dvc(repo, "repro", "prepare")  # new bytecode is not a change
    set_param(repo, "presets.tiny.train.lr", 0.5)  # reruns config, whose output prepare reads
    assert "Running stage 'prepare'" not in dvc(repo, "repro", "prepare")
    assert manifest.stat().st_mtime_ns == first
    set_param(repo, "presets.tiny.data.seed", 1)
    assert "Running stage 'prepare'" in dvc(repo, "repro", "prepare")
    assert manifest.stat().st_mtime_ns != first
    # disk once: the prepared data is not copied into DVC's cache, its checksum is in dvc.lock
    cached = [p for p in (repo / ".dvc" / "cache").rglob("*") if p.is_file()]
    assert cached == [], cached
    [out] = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["prepare"]["outs"]
    assert out["path"] == "data/tiny" and out["md5"].endswith(".dir")
