"""Stage train_reference (pipeline.training.reference_gate): a changed reference reruns the
training of a preset that selects its checkpoint by FID, never the smoke preset's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from repo_copy import PARAMS

from pipeline.config import load_config
from pipeline.training.reference_gate import NOT_READ, gate_content, gate_path

ROOT = Path(__file__).resolve().parents[1]


def project(tmp_path: Path, eval_every: int) -> Path:
    """params.yaml at the tiny scale (eval_every as given) and reference/tiny/train-stats.pt."""
    params = yaml.safe_load(PARAMS.read_text())
    params["scale"] = "tiny"
    if eval_every:
        params["presets"]["tiny"]["train"].update(
            eval_every=eval_every, eval_samples=4, select="best_fid"
        )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "reference" / "tiny").mkdir(parents=True)
    (tmp_path / "reference" / "tiny" / "train-stats.pt").write_bytes(b"statistics v1")
    return tmp_path


def test_dvc_yaml_train_depends_on_the_gate_and_the_gate_on_the_reference():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    gate = str(gate_path("${scale}"))
    assert gate in stages["train"]["do"]["deps"]
    assert "reference/${scale}" not in stages["train"]["do"]["deps"]  # only through the gate
    assert "reference/${scale}" in stages["train_reference"]["deps"]
    assert [gate] == [next(iter(o)) for o in stages["train_reference"]["outs"]]
    [resolved] = stages["train_reference"]["params"]  # the resolved params (stage config)
    assert {"train", "sample", "eval"} <= set(resolved["params.resolved.yaml"])


@pytest.mark.parametrize("eval_every, changes", [(4, True), (0, False)])
def test_the_gate_changes_with_the_reference_only_where_training_reads_it(
    tmp_path, eval_every, changes
):
    root = project(tmp_path, eval_every)
    cfg = load_config(root / "params.yaml")
    before = gate_content(cfg, root)
    (root / "reference" / "tiny" / "train-stats.pt").write_bytes(b"statistics v2")
    assert (gate_content(cfg, root) != before) is changes
    if not changes:
        assert before == NOT_READ


@pytest.mark.slow  # ~1 min: DVC runs the stage three times in a temporary project
@pytest.mark.parametrize("eval_every", [4, 0])
def test_dvc_status_of_train_after_the_reference_changes(tmp_path, eval_every):
    """In a DVC project of train_reference and a stand-in train stage (same deps as dvc.yaml's
    train@V): editing the reference makes `dvc status` list train as changed with eval_every > 0
    and leaves it up to date with eval_every = 0."""
    root = project(tmp_path, eval_every)
    for folder in ("pipeline", "stages"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    train = {"cmd": "echo trained > trained.txt", "deps": [str(gate_path("${scale}"))]}
    train["outs"] = [{"trained.txt": {"cache": False}}]
    keep = {"config": stages["config"], "train_reference": stages["train_reference"]}
    dvc_yaml = {"stages": {**keep, "train": train}}
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(root), "DVC_NO_ANALYTICS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"

    def dvc(*args: str) -> str:
        done = subprocess.run(
            ["dvc", *args], cwd=root, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    dvc("init", "--no-scm", "-q")
    dvc("repro", "-q")
    (root / "reference" / "tiny" / "train-stats.pt").write_bytes(b"statistics v2")
    dvc("repro", "-q", "train_reference")
    status = json.loads(dvc("status", "--json", "train"))
    assert ("train" in status) is (eval_every > 0), status
