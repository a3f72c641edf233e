"""Independent stages side by side (pipeline.cluster.parallel) on a small DVC project of its
own (no Ray, no git: ``dvc init --no-scm``): the stages overlap in time, dvc.lock equals what a
serial ``dvc repro`` writes, a rerun runs nothing, a failed stage leaves the others recorded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import config_from_dict, default_params_path
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
ITEMS = ["a", "b", "c"]

STEP = """
import json, os, sys, time
from pathlib import Path
item = sys.argv[1]
begin = time.time()
time.sleep(2.0)
if os.environ.get("FAIL_ITEM") == item:
    sys.exit(3)
out = Path("work") / item
out.mkdir(parents=True)
(out / "x.txt").write_text(Path("prep/seed.txt").read_text() + item)
spans = Path(os.environ["SPANS"])
spans.mkdir(exist_ok=True)
(spans / f"{item}-{begin}.json").write_text(json.dumps([begin, time.time()]))
"""

MAKE = """
import sys
from pathlib import Path
out, source = Path(sys.argv[1]), sys.argv[2]
out.parent.mkdir(parents=True)
out.write_text(Path(source).read_text() * 2 if Path(source).is_file() else source)
"""

DVC_YAML = {
    "stages": {
        "prep": {
            "cmd": "python make.py prep/seed.txt s",
            "outs": ["prep"],
        },
        "work": {
            "foreach": ITEMS,
            "do": {
                "cmd": "python step.py ${item}",
                "deps": ["prep", "step.py"],
                "outs": ["work/${item}"],
            },
        },
        "summary": {
            "foreach": ITEMS,
            "do": {
                "cmd": "python make.py summary/${item}/s.txt work/${item}/x.txt",
                "deps": ["work/${item}"],
                "outs": ["summary/${item}"],
            },
        },
    }
}


def _env(spans: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "SPANS": str(spans), **extra}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _project(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "step.py").write_text(STEP)
    (root / "make.py").write_text(MAKE)
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=root, check=True, env=_env(root))
    return root


def _parallel(root: Path, spans: Path, n: int = 3, **extra: str) -> subprocess.CompletedProcess:
    code = f"from pipeline.cluster.parallel import run_parallel; run_parallel({n})"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=_env(spans, **extra), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow  # ~40-90 s: about twenty dvc commands at load average 5-20
def test_side_by_side_records_what_a_serial_repro_records(tmp_path):
    serial, parallel = _project(tmp_path / "serial"), _project(tmp_path / "parallel")
    done = subprocess.run(
        ["dvc", "repro", "-q"], cwd=serial, env=_env(tmp_path / "spans-serial"), capture_output=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    run = _parallel(parallel, tmp_path / "spans")
    assert run.returncode == 0, run.stderr[-3000:]
    # dvc.lock: the same text (hashes, params, the stages' order) as the serial run's
    assert (parallel / "dvc.lock").read_text() == (serial / "dvc.lock").read_text()
    # the three `work` stages ran at the same time
    spans = [json.loads(p.read_text()) for p in (tmp_path / "spans").iterdir()]
    assert len(spans) == 3
    assert max(begin for begin, _ in spans) < min(end for _, end in spans), spans
    # a rerun runs nothing and leaves dvc.lock as it was
    lock = (parallel / "dvc.lock").read_text()
    again = _parallel(parallel, tmp_path / "spans")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Running stage" not in again.stdout and len(list((tmp_path / "spans").iterdir())) == 3
    assert (parallel / "dvc.lock").read_text() == lock
    status = subprocess.run(["dvc", "status", "--json"], cwd=parallel, capture_output=True)
    assert json.loads(status.stdout) == {}


@pytest.mark.slow  # ~30-60 s
def test_a_failed_stage_leaves_the_finished_ones_recorded(tmp_path):
    root = _project(tmp_path / "p")
    run = _parallel(root, tmp_path / "spans", FAIL_ITEM="b")
    assert run.returncode == 3, run.stderr[-3000:]
    assert "stage 'work@b' failed (status 3)" in run.stderr
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert {"prep", "work@a", "work@c"} <= set(lock) and "work@b" not in lock
    again = _parallel(root, tmp_path / "spans")
    assert again.returncode == 0, again.stderr[-3000:]
    ran = {line.split("'")[1] for line in again.stdout.splitlines() if "Running stage" in line}
    assert "work@b" in ran and not {"prep", "work@a", "work@c"} & ran
    shutil.rmtree(tmp_path / "spans")


def test_max_parallel_stages_below_one_is_one_config_error():
    raw = yaml.safe_load(default_params_path().read_text())
    raw["cluster"] = {"max_parallel_stages": 0}
    with pytest.raises(ConfigError, match=r"cluster\.max_parallel_stages must be at least 1"):
        config_from_dict(raw, "tiny")


def test_default_parallelism_is_one_on_a_node_and_what_fits_on_a_cluster(monkeypatch):
    import ray

    from pipeline.cluster.parallel import max_parallel_stages

    raw = yaml.safe_load(default_params_path().read_text())
    paper = config_from_dict(raw, "paper")  # 8 training workers of one GPU
    monkeypatch.setattr(ray, "init", lambda **kw: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 200.0, "GPU": 20.0})
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert max_parallel_stages(paper, on_cluster=True) == 2  # 20 GPUs hold two trainings
    assert max_parallel_stages(paper, on_cluster=False) == 1  # make repro: unchanged
    monkeypatch.delenv("RAY_ADDRESS")
    assert max_parallel_stages(paper, on_cluster=True) == 1  # no cluster to ask
    raw["cluster"] = {"max_parallel_stages": 6}
    assert max_parallel_stages(config_from_dict(raw, "paper"), on_cluster=False) == 6


def test_an_upstream_rerun_that_changes_nothing_reruns_nothing_downstream(tmp_path):
    """The first ``dvc status`` is stale once an upstream stage reran: a resubmitted job whose
    checkout held another params.resolved.yaml reran `config`, which wrote back what dvc.lock
    holds, and then every stage (the first status had called them all changed)."""
    root = _project(tmp_path / "p")
    done = subprocess.run(["dvc", "repro", "-q"], cwd=root, env=_env(tmp_path / "s0"))
    assert done.returncode == 0
    (root / "prep" / "seed.txt").write_text("another")  # prep and all of work@* now changed
    run = _parallel(root, tmp_path / "spans")
    assert run.returncode == 0, run.stderr[-3000:]
    ran = [line.split("'")[1] for line in run.stdout.splitlines() if "Running stage" in line]
    assert ran == ["prep"], run.stdout[-3000:]  # prep wrote "s" again: the rest is unchanged
    assert not (tmp_path / "spans").exists()
