"""MLflow's UI in a real browser: the link the report stage prints opens the experiment on its
training runs (not on the GenAI overview), the reproduction run and its variants counted.

Slow (``make test-slow``): ``mlflow server`` takes 20 s to 2 min to start on a loaded 2-core
machine, and the UI's scripts need a few seconds of (virtual) time in headless Chromium.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from repo_copy import PARAMS
from test_report_page import chromium, render

from pipeline.cluster.raycluster import free_port
from pipeline.config import load_config
from pipeline.report import tracking

ROOT = Path(__file__).resolve().parents[1]


def _wait_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-2000:]
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"mlflow server not up after {timeout} s: {log.read_text()[-2000:]}")


@pytest.mark.slow
def test_the_experiment_opens_on_its_runs(tmp_path, monkeypatch):
    browser = chromium()
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db)
    cfg = load_config(scale="tiny")
    variants = list(cfg.variants)[:3]
    run_ids = {v: tracking.start_variant_run(cfg, cfg.variant(v)) for v in variants}
    tracking.log_reproduction(cfg, run_ids, [], None, "## Table 2 (tiny scale)")
    experiment = tracking.setup(cfg)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [Path(sys.executable).parent / "mlflow", "server", "--backend-store-uri", db,
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        _wait_up(url, server, log)
        link = tracking.ui_link(cfg, experiment).replace("http://127.0.0.1:5000", url)
        done = render(browser, _Url(link), "--dump-dom", budget_ms=30000)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", done.stdout))
    assert "tiny/reproduction" in text, text[-3000:]
    # the runs table, every run counted (the variants nested under the reproduction run)
    assert re.search(rf"\b{len(variants) + 1} matching runs", text), text[-3000:]
    assert "No data available" not in text  # not the GenAI overview of traces


class _Url:
    """What ``render`` takes (``.as_uri()``) for an http URL."""

    def __init__(self, url: str):
        self.url = url

    def as_uri(self) -> str:
        return self.url
