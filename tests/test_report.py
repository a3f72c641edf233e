"""The report stage: the paper's tables beside ours, read back from a real MLflow store."""

from __future__ import annotations

import dataclasses
import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from repo_copy import PARAMS

from pipeline.config import STAND_IN_NOTE, load_config
from pipeline.report import tables, tracking
from stages import report

ROOT = Path(__file__).resolve().parents[1]
TAG = tracking.TAG_RUN
OURS = {"fid_train": 30.5, "fid_test": 31.25, "is_mean": 1.5, "is_std": 0.25, "nll_bpd": 5.5}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder with the repo's params at the tiny scale and a SQLite MLflow store."""
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = load_config(scale="tiny")
    ids = {}
    for name, variant in cfg.variants.items():
        # as the train stage leaves it: the run tagged with the name model.json keeps
        ids[name] = run_id = tracking.start_variant_run(cfg, variant, tags={TAG: f"{name}-r"})
        if name != "xprev_learned_kl":  # one variant has no metrics yet
            client = mlflow.MlflowClient()
            for key, value in OURS.items():
                client.log_metric(run_id, key, value)
            for n, rate, rmse in ((20, 1.25, 2.0), (10, 0.5, 40.0)):
                client.log_metric(run_id, tables.rd_metric("rate_bpd", n), rate)
                client.log_metric(run_id, tables.rd_metric("rmse_per_image", n), rmse)
                client.log_metric(run_id, tables.rd_metric("rmse", n), rmse + 0.5)
        if name == "eps_fixed_mse":  # trained with train.select: best_fid
            note = "checkpoint of step 8 selected (lowest FID 2.5 of 3 evaluated during training)"
            mlflow.MlflowClient().set_tag(run_id, tables.TAG_SELECTION, note)
        folder = tmp_path / "models" / name
        folder.mkdir(parents=True)
        (folder / "model.json").write_text(json.dumps({"variant": name, "run_name": f"{name}-r"}))
    (tmp_path / "run_ids.json").write_text(json.dumps(ids))
    return tmp_path


def run_id_of(project: Path, name: str) -> str:
    return json.loads((project / "run_ids.json").read_text())[name]


def test_tables_put_paper_ours_and_difference_side_by_side(project):
    report.main(["--scale", "tiny"])
    names = {p.name for p in (project / "reports").iterdir()}  # CIFAR10-like: no Table 3
    tables_ = {f"table{n}.{x}" for n in (1, 2, 4) for x in ("md", "csv")}
    assert names == tables_ | {"index.html", "verdict.md"}
    t2 = pd.read_csv(project / "reports" / "table2.csv").set_index("variant")
    row = t2.loc["eps_fixed_mse"]
    assert row["FID paper"] == 3.17 and row["FID ours"] == 30.5
    assert row["FID diff"] == pytest.approx(30.5 - 3.17)
    assert row["IS diff"] == pytest.approx(1.5 - 9.46)
    assert STAND_IN_NOTE in row["note"]
    assert "step 8 selected (lowest FID 2.5 of 3 evaluated during training)" in row["note"]
    unstable = t2.loc["xprev_fixed_mse"]
    assert pd.isna(unstable["FID paper"]) and "training unstable" in unstable["note"]
    assert pd.isna(t2.loc["xprev_learned_kl", "FID ours"])  # not evaluated: left empty

    t1 = pd.read_csv(project / "reports" / "table1.csv").set_index("variant")
    assert t1.loc["eps_fixed_mse", "FID test paper"] == 5.24
    assert t1.loc["eps_fixed_mse", "NLL test bpd diff"] == pytest.approx(5.5 - 3.75)

    t4 = pd.read_csv(project / "reports" / "table4.csv")
    # T = 20: our 20 and 10 steps sit beside the paper's 1000 and 500.
    assert list(t4["rate bpd paper"]) == [1.77581, 0.00716]
    assert list(t4["RMSE ours"]) == [2.0, 40.0]  # the mean of per-image RMSEs is compared
    assert list(t4["RMSE (RMS) ours"]) == [2.5, 40.5] and "RMSE (RMS) diff" not in t4
    assert "T = 20" in t4["note"][0]

    md = (project / "reports" / "table2.md").read_text()
    assert "| eps prediction | \\|\\|eps - eps_theta\\|\\|^2 (L_simple) |" in md
    assert "Rows noted stand-in are not comparable to published numbers" in md

    # dvc.lock hashes reports/: a second report writes the same bytes (the page holds no time
    # of writing, nor run ids)
    first = {p.name: p.read_bytes() for p in (project / "reports").iterdir()}
    report.main(["--scale", "tiny"])
    assert {p.name: p.read_bytes() for p in (project / "reports").iterdir()} == first
    page = first["index.html"].decode()
    assert not re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", page)
    run_ids = json.loads((project / "run_ids.json").read_text()).values()
    assert not any(run_id in page for run_id in run_ids)


def test_a_run_missing_from_the_store_is_one_clear_line(project, monkeypatch, capsys):
    """model.json names a run this store does not hold (another MLFLOW_TRACKING_URI)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'other.db'}")
    with pytest.raises(SystemExit) as stop:
        report.main(["--scale", "tiny"])
    [line] = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2 and line.startswith(
        "error: models/xprev_learned_kl/model.json: no MLflow run of xprev_learned_kl-r (tag "
        "ddpm.ray_run) in sqlite:///"
    )
    assert not (project / "reports").exists()


def test_lsun_report_is_table3_with_no_cifar10_number(project):
    """An LSUN scale's FID sits beside the paper's FID of that LSUN dataset, nothing else."""
    report.main(["--scale", "paper_lsun_church"])
    names = sorted(p.name for p in (project / "reports").iterdir())
    assert names == ["index.html", "table3.csv", "table3.md", "verdict.md"]
    t3 = pd.read_csv(project / "reports" / "table3.csv").set_index("variant")
    row = t3.loc["eps_fixed_mse"]
    assert row["FID paper"] == 7.89 and row["FID ours"] == 30.5
    assert row["FID diff"] == pytest.approx(30.5 - 7.89)
    text = (project / "reports" / "table3.md").read_text()
    cifar10 = [3.17, 5.24, 9.46, 13.51, 13.22, 23.69, 3.75, 1.77581]
    assert not any(f"{x:.3f}" in text or str(x) in text for x in cifar10)
    assert set(t3["FID paper"]) == {7.89}


def test_parent_run_holds_the_tables_and_nests_the_variants(project):
    report.main(["--scale", "tiny"])
    runs = mlflow.search_runs(experiment_names=["ddpm-repro"])
    parent = runs[runs["tags.ddpm.role"] == "reproduction"]
    assert len(parent) == 1
    parent_id = parent["run_id"].iloc[0]
    variants = runs[runs["tags.ddpm.variant"].notna()]
    assert len(variants) == 6 and set(variants["tags.mlflow.parentRunId"]) == {parent_id}
    assert set(variants["tags.ddpm.seed"]) == {"0"}  # train.seed
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(parent_id, "tables")}
    assert "tables/table2.md" in names and "tables/table4.csv" in names
    top = {a.path for a in mlflow.MlflowClient().list_artifacts(parent_id)}
    assert "index.html" in top  # the one-page report beside the tables
    # the description (rendered as Markdown by the UI) is Table 2, as in reports/table2.md
    note = parent[f"tags.{tracking.TAG_NOTE}"].iloc[0]
    assert note == (project / "reports" / "table2.md").read_text()
    # MLflow 3 opens a model-training experiment on its runs, not on the GenAI overview
    experiment = mlflow.get_experiment_by_name("ddpm-repro")
    assert experiment.tags[tracking.TAG_EXPERIMENT_KIND] == tracking.MODEL_TRAINING


def test_an_experiment_created_by_another_stage_meanwhile_is_used(tmp_path, monkeypatch):
    """Two stages side by side on a fresh store (the first trainings of a cluster run): both
    look the experiment up, find none, and create it; the second gets RESOURCE_ALREADY_EXISTS
    (seen in a real two-node run: the train stage exited 1) and must use the first one's."""
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = load_config(PARAMS, "tiny")
    mlflow.set_tracking_uri(uri)
    created = mlflow.create_experiment(cfg.mlflow.experiment)  # the other stage, just now
    real = mlflow.get_experiment_by_name
    lookups = []

    def not_there_yet(name):  # this stage's lookup ran before the other stage's create
        lookups.append(name)
        return None if len(lookups) == 1 else real(name)

    monkeypatch.setattr(mlflow, "get_experiment_by_name", not_there_yet)
    assert tracking.setup(cfg) == created
    assert len(lookups) == 2


def test_a_store_made_before_the_experiment_kind_gets_it(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'old.db'}"
    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.create_experiment("old", artifact_location=tmp_path.as_uri())
    assert tracking.TAG_EXPERIMENT_KIND not in mlflow.get_experiment(experiment_id).tags
    cfg = load_config(PARAMS, "tiny")
    cfg = dataclasses.replace(cfg, mlflow=dataclasses.replace(cfg.mlflow, experiment="old"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking.setup(cfg) == experiment_id
    kind = mlflow.get_experiment(experiment_id).tags[tracking.TAG_EXPERIMENT_KIND]
    assert kind == "custom_model_development"


def test_missing_model_is_one_clear_line(project):
    shutil.rmtree(project / "models" / "eps_fixed_kl")
    done = subprocess.run(
        [sys.executable, "-m", "stages.report", "--scale", "tiny"],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: models/eps_fixed_kl/model.json: missing; run the pipeline first (dvc repro)"
    ]
    assert not (project / "reports").exists()


def test_real_data_row_and_classifier_confidence(project):
    real = {"images": "test", "count": 16, "fid_train": 2.5, "is_mean": 6.0, "is_std": 0.5}
    real["classifier_confidence"] = 0.75
    manifest = {"stand_in": True, "stand_in_note": STAND_IN_NOTE, "real_data": real}
    manifest["stand_in_reasons"] = ["synthetic data"]
    (project / "reference" / "tiny").mkdir(parents=True)
    (project / "reference" / "tiny" / "manifest.json").write_text(json.dumps(manifest))
    mlflow.MlflowClient().log_metric(
        run_id_of(project, "eps_fixed_mse"), "classifier_confidence", 0.5
    )
    report.main(["--scale", "tiny"])
    t2 = pd.read_csv(project / "reports" / "table2.csv")
    row = t2[t2["mean"] == tables.REAL_DATA].iloc[0]
    assert row["variant"] == "test split" and row["FID ours"] == 2.5 and row["IS ours"] == 6.0
    assert row["classifier confidence"] == 0.75 and pd.isna(row["FID paper"])
    assert "16 real test images" in row["note"] and STAND_IN_NOTE in row["note"]
    by_variant = t2.set_index("variant")
    assert by_variant.loc["eps_fixed_mse", "classifier confidence"] == 0.5
    assert pd.isna(by_variant.loc["xprev_learned_kl", "classifier confidence"])
    t1 = pd.read_csv(project / "reports" / "table1.csv")
    row = t1[t1["model"] == tables.REAL_DATA].iloc[0]
    assert row["FID train ours"] == 2.5 and row["IS ours"] == 6.0 and pd.isna(row["FID test ours"])
    assert "real data" in (project / "reports" / "table2.md").read_text()


def test_errors_and_verdicts_in_tables_verdict_md_and_parent_tags(project):
    """eps_fixed_mse made comparable (stand_in false) with errors: FID 3.2 +- 0.05 reproduces
    3.17 (margin 10 %), IS 9.0 +- 0.1 misses 9.46 +- 0.11 by more than 0.3, NLL 3.9 +- 0.5 is
    too noisy; the other variants stay stand-in (n/a). The cells show value +- error (n), the
    verdicts their margins, in the tables, the page, verdict.md and the parent run's tags."""
    run_id = run_id_of(project, "eps_fixed_mse")
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "stand_in", "false")
    logged = {"fid_train": 3.2, "fid_train_se": 0.05, "n_samples": 50000, "is_mean": 9.0}
    logged |= {"is_std": 0.1, "is_splits": 10, "nll_bpd": 3.9, "nll_bpd_se": 0.5}
    logged |= {"nll_images": 10000, "fid_test": 5.0, "fid_test_se": 0.06}
    for key, value in logged.items():
        client.log_metric(run_id, key, value)
    report.main(["--scale", "tiny"])
    t1 = pd.read_csv(project / "reports" / "table1.csv").set_index("variant")
    row = t1.loc["eps_fixed_mse"]
    assert row["FID train verdict"] == "reproduced" and row["FID train ours err"] == 0.05
    assert row["IS verdict"] == "not reproduced" and row["IS paper err"] == 0.11
    assert row["NLL test bpd verdict"] == "inconclusive"
    assert row["FID test verdict"] == "reproduced"  # 5.0 +- 0.06 within 10 % of 5.24
    assert row["FID train margin"] == pytest.approx(0.317) and row["IS margin"] == 0.3
    assert row["NLL train bpd verdict"] == "inconclusive"  # no value of ours
    assert t1.loc["eps_fixed_kl", "FID train verdict"] == "n/a (stand-in)"
    md = (project / "reports" / "table1.md").read_text()
    assert "3.200 ± 0.050 (50000)" in md and "9.460 ± 0.110" in md
    assert "FID train ours err" not in md  # merged into the cell
    assert "| reproduced; ± 0.317 |" in md and "| n/a (stand-in); ± 1.35 |" in md
    page = html.unescape((project / "reports" / "index.html").read_text())  # &#177;: ±
    assert "reproduced; ± 0.317" in page and "n/a (stand-in); ± 1.35" in page
    text = (project / "reports" / "verdict.md").read_text()
    assert "| table1 | eps_fixed_mse | IS | not reproduced | ± 0.3 | one training seed" in text
    assert "| table2 | eps_fixed_kl | FID | n/a (stand-in) | ± 1.35 |" in text
    assert "margins fid 10%, inception_score 0.3, nll 0.05, rate 0.05, distortion 10%" in text
    parent = mlflow.search_runs(
        experiment_names=["ddpm-repro"], filter_string="tags.`ddpm.role` = 'reproduction'"
    ).iloc[0]
    assert parent["tags.ddpm.verdict.table1.eps_fixed_mse.FID_train"] == "reproduced"
    assert parent["tags.ddpm.verdict.table2.eps_fixed_mse.IS"] == "not reproduced"
    assert "reproduced 3" in parent["tags.ddpm.verdict"]
    assert parent["tags.ddpm.margin.table1.eps_fixed_mse.FID_train"] == "± 0.317"
    assert parent["tags.ddpm.margin"].startswith("margins fid 10%")
