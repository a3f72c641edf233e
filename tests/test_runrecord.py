"""Finding a model's MLflow run from model.json's run name (pipeline.cluster.runrecord): the run
folder's record first, else the newest run tagged with the name; a real SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from repo_copy import PARAMS

from pipeline.cluster.runrecord import MLFLOW_RECORD, model_run_id
from pipeline.config import load_config
from pipeline.errors import DataError
from pipeline.report import tracking

ROOT = Path(__file__).resolve().parents[1]
KEY = "eps_fixed_mse"
NAME = f"{KEY}-0123abcd"


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DDPM_CLUSTER_STORAGE", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = load_config(PARAMS, "tiny")
    return cfg, uri


def record(root, uri: str, run_id: str) -> None:
    folder = root / "checkpoints" / KEY / NAME
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MLFLOW_RECORD).write_text(json.dumps({"tracking_uri": uri, "run_id": run_id}))


def test_the_record_wins_else_the_newest_run_of_that_name(store, tmp_path):
    cfg, uri = store
    variant = cfg.variant(KEY)
    meta = {"variant": KEY, "run_name": NAME}
    older = tracking.start_variant_run(cfg, variant, tags={tracking.TAG_RUN: NAME})
    newer = tracking.start_variant_run(cfg, variant, tags={tracking.TAG_RUN: NAME})
    tracking.start_variant_run(cfg, variant, tags={tracking.TAG_RUN: f"{KEY}-other"})
    assert model_run_id(cfg, KEY, meta, tmp_path) == newer  # no record: the newest
    record(tmp_path, uri, older)
    assert model_run_id(cfg, KEY, meta, tmp_path) == older  # the run the train stage used
    record(tmp_path, "sqlite:///elsewhere.db", older)  # a record of another store: not this one
    assert model_run_id(cfg, KEY, meta, tmp_path) == newer
    record(tmp_path, uri, "0" * 32)  # a record of a run the store lost: the search decides
    assert model_run_id(cfg, KEY, meta, tmp_path) == newer
    # an earlier version's model.json names its run; no run name: nothing to log into
    assert model_run_id(cfg, KEY, {"mlflow_run_id": "abc", **meta}, tmp_path) == "abc"
    assert model_run_id(cfg, KEY, {"variant": KEY}, tmp_path) is None
    with pytest.raises(DataError, match=rf"models/{KEY}/model\.json: no MLflow run of {KEY}-x "):
        model_run_id(cfg, KEY, {"variant": KEY, "run_name": f"{KEY}-x"}, tmp_path)


def test_the_record_in_cluster_storage_is_read_in_place(store, tmp_path, monkeypatch):
    """cluster.storage a folder: the run folder (and its record) is there, not in the project."""
    cfg, uri = store
    storage = tmp_path / "storage"
    monkeypatch.setenv("DDPM_CLUSTER_STORAGE", str(storage))
    variant = cfg.variant(KEY)
    first = tracking.start_variant_run(cfg, variant, tags={tracking.TAG_RUN: NAME})
    tracking.start_variant_run(cfg, variant, tags={tracking.TAG_RUN: NAME})
    record(storage, uri, first)
    assert model_run_id(cfg, KEY, {"variant": KEY, "run_name": NAME}, tmp_path) == first
    assert not (tmp_path / "checkpoints").exists()  # nothing made in the project
