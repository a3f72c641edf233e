"""The tiny preset end to end: dvc repro in a copy of the repo (the Ray job: test_two_node.py).

Real components only: DVC, a private Ray head started by ``ray start --head``, Ray Train,
torch-fidelity (stand-in weights). Every variant must reach MLflow with its metrics, and the
report must write the three tables. The same as ``ray job submit`` on a two-node cluster with
a real ``mlflow server`` is tests/test_two_node.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import pytest
from repo_copy import BIN, ROOT, copy_repo, env

from pipeline.config import load_config

METRICS = ("fid_train", "fid_test", "is_mean", "is_std", "nll_bpd")
ALL_VARIANTS = set(load_config(ROOT / "params.yaml", "tiny").variants)


def ray_sessions() -> set[Path]:
    """Session folders of local clusters started with Ray's default temp dir."""
    return set(Path("/tmp/ray").glob("session_2*"))


def head_processes(known: set[Path]) -> list[psutil.Process]:
    """Processes of private Ray heads (``/tmp/ddpm-ray-*`` on the command line) not in ``known``."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        args = [a for a in p.info["cmdline"] or () if "/tmp/ddpm-ray-" in a]
        if args and not any(str(k) in a for k in known for a in args):
            found.append(p)
    return found


def variant_runs(tracking_uri: str) -> pd.DataFrame:
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(experiment_names=["ddpm-repro"])
    return runs[runs["tags.ddpm.variant"].notna()].set_index("tags.ddpm.variant")


def check_results(
    runs: pd.DataFrame, tables: dict[str, pd.DataFrame], variants: set[str] = ALL_VARIANTS
) -> None:
    """Every variant run has its metrics in MLflow; the tables show them beside the paper's."""
    assert set(runs.index) == variants
    for metric in METRICS:
        assert runs[f"metrics.{metric}"].notna().all(), metric
    assert (runs["tags.stand_in"] == "true").all()
    t2 = tables["table2"]
    real = t2[t2["mean"] == "real data"]  # real test images against train, same extractor
    assert len(real) == 1 and real["FID ours"].notna().all() and real["IS ours"].notna().all()
    t2 = t2[t2["mean"] != "real data"].set_index("variant")
    assert set(t2.index) == ALL_VARIANTS  # Table 2 has every row; variants not run say so
    assert all("not run" in t2.loc[name, "note"] for name in ALL_VARIANTS - variants)
    for name in variants:
        assert t2.loc[name, "FID ours"] == pytest.approx(runs.loc[name, "metrics.fid_train"])
    assert len(tables["table1"]) == 3 and len(tables["table4"]) == 2  # 2 rows and real data


@pytest.mark.e2e
def test_make_repro_path_tiny_in_a_copy_of_the_repo(tmp_path):
    """What `make repro` runs (dvc repro, every stage on one local Ray head), all six variants."""
    repo = copy_repo(tmp_path / "repo")
    sessions, heads = ray_sessions(), set(Path("/tmp").glob("ddpm-ray-*"))
    run = subprocess.run(
        [BIN / "python", "-m", "stages.repro", "--local-ray"],
        cwd=repo, env=env(), capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert ray_sessions() == sessions  # every stage joined the private head: no local clusters
    assert set(Path("/tmp").glob("ddpm-ray-*")) == heads  # and the head is gone
    assert not head_processes(heads)  # none of its processes is left
    tables = {t: pd.read_csv(repo / "reports" / f"{t}.csv") for t in ("table1", "table2", "table4")}
    check_results(variant_runs(f"sqlite:///{repo / 'mlflow.db'}"), tables)
    for t in tables:
        assert (repo / "reports" / f"{t}.md").read_text().count("stand-in") >= 1
    shown = subprocess.run(
        ["dvc", "metrics", "show", "--json"], cwd=repo, env=env(), capture_output=True, text=True
    )
    metrics = next(iter(json.loads(shown.stdout).values()))["data"]
    assert len(metrics) == 6 and all(m["data"]["stand_in"] is True for m in metrics.values())
    again = subprocess.run(["dvc", "status"], cwd=repo, env=env(), capture_output=True, text=True)
    assert "up to date" in again.stdout  # a second repro would do nothing
