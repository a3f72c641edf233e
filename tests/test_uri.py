"""Credentials in a URI never reach a report, a record file, an MLflow param or a message.

pipeline.uri.redact_uri on its own, then the writers: mlflow_run.json (the Ray run folder's
record), the variant run's params in a real SQLite store, the page's facts (reports/index.html)
and the MLflow UI link, with credentials in the tracking URI, params' ``mlflow.tracking_uri``
and ``ray.address``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from pipeline.cluster.runrecord import MLFLOW_RECORD
from pipeline.config import load_config
from pipeline.report import html, page, tracking
from pipeline.training.identity import record_mlflow_run, recorded_mlflow_run
from pipeline.uri import redact_uri

ROOT = Path(__file__).resolve().parents[1]
SECRETS = ("alice", "s3cret", "t0ken", "S1GNATURE")


@pytest.mark.parametrize(
    ("uri", "redacted"),
    [
        ("https://alice:s3cret@mlflow.example.com", "https://***@mlflow.example.com"),
        ("https://alice@mlflow.example.com:8443/x", "https://***@mlflow.example.com:8443/x"),
        ("postgresql://alice:s3cret@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        ("ray://alice:s3cret@head:10001", "ray://***@head:10001"),
        ("http://h/api?token=t0ken&page=2", "http://h/api?token=***&page=2"),
        (
            "s3://b/k?X-Amz-Credential=AK%2F1&X-Amz-Signature=S1GNATURE&X-Amz-Date=20261207",
            "s3://b/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Date=20261207",
        ),
        ("https://h/p?sig=S1GNATURE&monkey=1#top", "https://h/p?sig=***&monkey=1#top"),
        (
            "https://h/p?api_key=t0ken&access_token=t0ken",
            "https://h/p?api_key=***&access_token=***",
        ),
        # nothing to hide: unchanged
        ("sqlite:////work/mlflow.db", "sqlite:////work/mlflow.db"),
        ("s3://bucket/ddpm/state", "s3://bucket/ddpm/state"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("127.0.0.1:6379", "127.0.0.1:6379"),
        ("/var/tmp/storage", "/var/tmp/storage"),
        ("", ""),
    ],
)
def test_a_uri_loses_its_credentials_and_nothing_else(uri, redacted):
    assert redact_uri(uri) == redacted
    assert redact_uri(redacted) == redacted  # twice is once


def test_uris_inside_a_message_are_redacted_too():
    text = (
        "API request to https://alice:s3cret@mlflow.example.com/api/2.0/mlflow/runs/get failed "
        "(401); the store 'postgresql://alice:s3cret@db/m' and s3://b/k?token=t0ken"
    )
    out = redact_uri(text)
    assert not any(s in out for s in SECRETS), out
    assert out.count("***@") == 2 and "token=***" in out
    assert "mlflow.example.com/api/2.0/mlflow/runs/get failed (401)" in out


WITH_CREDENTIALS = "https://alice:s3cret@mlflow.example.com/"


def test_the_run_record_holds_no_credentials_and_still_matches(tmp_path):
    """mlflow_run.json keeps the store without credentials; the same store reached with other
    credentials (or none) finds the record, another store does not."""
    record_mlflow_run(tmp_path, WITH_CREDENTIALS, "run-1")
    text = (tmp_path / MLFLOW_RECORD).read_text()
    assert not any(s in text for s in SECRETS), text
    assert json.loads(text)["tracking_uri"] == "https://***@mlflow.example.com/"
    assert recorded_mlflow_run(tmp_path, WITH_CREDENTIALS) == "run-1"
    assert recorded_mlflow_run(tmp_path, "https://bob:other@mlflow.example.com/") == "run-1"
    assert recorded_mlflow_run(tmp_path, "https://mlflow.example.org/") is None


@pytest.fixture
def project(tmp_path, monkeypatch):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def test_the_variant_runs_params_hold_no_credentials(project):
    """params' mlflow.tracking_uri and ray.address with credentials: the run's params (a real
    SQLite store) show the URIs without them."""
    cfg = load_config(scale="tiny")
    cfg = dataclasses.replace(
        cfg,
        ray=dataclasses.replace(cfg.ray, address="ray://alice:s3cret@head:10001"),
        mlflow=dataclasses.replace(cfg.mlflow, tracking_uri=WITH_CREDENTIALS + "?token=t0ken"),
    )
    run_id = tracking.start_variant_run(cfg, cfg.variant("eps_fixed_mse"))
    params = mlflow.MlflowClient().get_run(run_id).data.params
    assert not [(k, v) for k, v in params.items() if any(s in v for s in SECRETS)], params
    assert params["ray.address"] == "ray://***@head:10001"
    assert params["mlflow.tracking_uri"] == "https://***@mlflow.example.com/?token=***"


def test_the_page_and_the_ui_link_show_the_store_without_credentials(project, monkeypatch):
    cfg = load_config(scale="tiny")
    built = page.build_page(cfg, pd.DataFrame(), {}, [], WITH_CREDENTIALS)  # as given
    text = html.render_page(built)
    assert "https://***@mlflow.example.com/" in text
    monkeypatch.setenv("MLFLOW_TRACKING_URI", WITH_CREDENTIALS)  # what the stages read
    shown, link = tracking.shown_uri(cfg), tracking.ui_link(cfg, "1")
    assert shown == "https://***@mlflow.example.com/"
    assert link.startswith("https://***@mlflow.example.com/#/experiments/1/")
    assert not any(s in out for out in (text, shown, link) for s in SECRETS)


def test_storage_messages_show_a_bucket_without_its_credentials():
    """The lease, restore and upload messages name storage through ``Store.shown``."""
    from pipeline.cluster.storage_fs import Store

    store = Store("s3://AKIDEXAMPLE:s3cr3t@bucket/ddpm")
    assert store.shown("state/tiny/lease") == "s3://***@bucket/ddpm/state/tiny/lease"
    assert "s3cr3t" in store.uri("state")  # the address itself keeps them: it is used
