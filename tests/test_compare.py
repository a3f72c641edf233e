"""stages.compare: two crafted reproductions in a SQLite MLflow store, side by side."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from pipeline.report import compare
from stages import compare as stage

ROOT = Path(__file__).resolve().parents[1]

# variant -> metrics of reproductions A and B (FID 3.2 +- 0.05 vs 3.3 +- 0.05: within
# 2 x 0.0707; IS 9.0 +- 0.1 vs 9.5 +- 0.1: not; B alone has an NLL)
A = {"eps_fixed_mse": {"fid_train": 3.2, "fid_train_se": 0.05, "n_samples": 50000}}
A["eps_fixed_mse"] |= {"is_mean": 9.0, "is_std": 0.1, "is_splits": 10}
A["eps_fixed_kl"] = {"fid_train": 13.0, "fid_train_se": 0.1, "n_samples": 50000}
B = {"eps_fixed_mse": {"fid_train": 3.3, "fid_train_se": 0.05, "n_samples": 50000}}
B["eps_fixed_mse"] |= {"is_mean": 9.5, "is_std": 0.1, "is_splits": 10, "nll_bpd": 3.7}
B["eps_fixed_mse"] |= {"nll_bpd_se": 0.01, "nll_images": 10000}


def reproduction(client, experiment: str, variants: dict, verdict: str) -> str:
    """A parent run (ddpm.role reproduction) with one nested run per variant."""
    exp_id = client.create_experiment(experiment)
    parent = client.create_run(exp_id, run_name="paper/reproduction").info.run_id
    for key, value in {"ddpm.role": "reproduction", "ddpm.scale": "paper"}.items():
        client.set_tag(parent, key, value)
    client.set_tag(parent, "ddpm.verdict", verdict)
    for name, metrics in variants.items():
        run = client.create_run(exp_id, tags={"ddpm.variant": name}).info.run_id
        client.set_tag(run, "mlflow.parentRunId", parent)
        for key, value in metrics.items():
            client.log_metric(run, key, value)
    return parent


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    a = reproduction(client, "exp-a", A, "reproduced 1")
    b = reproduction(client, "exp-b", B, "not reproduced 1")
    return uri, a, b


def test_side_by_side_differences_and_errors(store):
    uri, _a, b = store
    mlflow.set_tracking_uri(uri)
    table = compare.side_by_side(compare.resolve("exp-a"), compare.resolve(b))
    rows = table.set_index(["variant", "figure"])
    fid = rows.loc[("eps_fixed_mse", "FID train")]
    assert fid["A"] == "3.200 ± 0.050 (50000)" and fid["B"] == "3.300 ± 0.050 (50000)"
    assert fid["B - A"] == "+0.100" and fid["combined error"] == f"{math.hypot(0.05, 0.05):.3f}"
    assert fid["within 2 errors"] == "yes"
    assert rows.loc[("eps_fixed_mse", "IS"), "within 2 errors"] == "no"  # 0.5 > 2 x 0.141
    nll = rows.loc[("eps_fixed_mse", "NLL test bpd")]
    assert nll["A"] == "—" and nll["within 2 errors"] == "—"
    kl = rows.loc[("eps_fixed_kl", "FID train")]  # only A ran it
    assert kl["B"] == "—" and kl["B - A"] == "—"
    assert ("eps_fixed_kl", "IS") not in rows.index  # measured by neither


def test_command_prints_both_from_a_run_id_or_an_experiment(store, capsys):
    uri, a, b = store
    stage.main([a, "exp-b", "--tracking-uri", uri])
    out = capsys.readouterr().out
    assert out.startswith(f"A: exp-a/paper/reproduction {a[:8]}, paper scale\nB: exp-b/")
    assert "verdict A: reproduced 1" in out and "verdict B: not reproduced 1" in out
    assert "| eps_fixed_mse | FID train | 3.200 ± 0.050 (50000) | 3.300 ± 0.050 (50000) |" in out
    child = mlflow.search_runs(
        experiment_names=["exp-a"], filter_string="tags.`ddpm.variant` = 'eps_fixed_kl'"
    )
    stage.main([child["run_id"].iloc[0], b, "--tracking-uri", uri])  # a variant run: its parent
    assert capsys.readouterr().out.startswith(f"A: exp-a/paper/reproduction {a[:8]}")


def test_bad_input_is_one_error_line(store, capsys):
    """A name that is neither a run nor an experiment, as a program (exit 2, one line); an
    experiment without a reproduction run, in process."""
    uri, _a, _b = store
    done = subprocess.run(
        [sys.executable, "-m", "stages.compare", "nope", "exp-a", "--tracking-uri", uri],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: 'nope': neither a run id nor an experiment in {uri}"
    ]
    mlflow.set_tracking_uri(uri)
    mlflow.MlflowClient().create_experiment("empty")
    with pytest.raises(SystemExit) as stop:
        stage.main(["exp-a", "empty", "--tracking-uri", uri])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        "error: experiment 'empty' has no reproduction run (run the report stage)\n"
    )


def test_no_store_in_the_working_directory_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit) as stop:
        stage.main(["a", "b"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no MLflow store here" in err and err.count("\n") == 1
