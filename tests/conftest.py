"""Shared test setup: quiet, deterministic, offline."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import quiet_environment

quiet_environment()

# A suite started in the background of a script (`make test-slow &`, nohup) inherits SIGINT
# ignored, and so would every stage process a test starts: the tests that stop a stage with
# SIGINT (Ctrl-C) would find it ignored. A handled signal is reset to the default in a child, and
# Python then installs KeyboardInterrupt there, as in a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same RNG state and one torch thread."""
    torch.manual_seed(0)
    np.random.seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _restore_tracking_uri(before: str | None) -> None:
    if os.environ.get("MLFLOW_TRACKING_URI") != before:
        import mlflow

        mlflow.set_tracking_uri(before)  # None unsets the variable


@pytest.fixture(autouse=True)
def _no_tracking_store_leak():
    """``mlflow.set_tracking_uri`` (``tracking.setup`` calls it) also sets MLFLOW_TRACKING_URI in
    os.environ, where the project reads it first: a test must not hand its store to the next."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    _restore_tracking_uri(before)


@pytest.fixture(autouse=True, scope="module")
def _no_module_tracking_store_leak():
    """The same for a module-scoped fixture that sets the store (test_compare's): autouse
    module fixtures start before the module's other fixtures and end after them."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    _restore_tracking_uri(before)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (2 CPUs) shared by every test that needs Ray (ray.init costs ~5 s)."""
    import ray

    from pipeline.cluster.raycluster import init_local

    # a connection an earlier test left behind points at a cluster it has stopped (seen: the
    # simulated cluster of test_cluster_parallel, then test_evaluate_dvc's stages could not
    # reach its GCS): always our own head, on 127.0.0.1, with a token, as a stage starts one
    if ray.is_initialized():
        ray.shutdown()
    init_local(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# What `make repro` leaves in a checkout (see .gitignore): the suite must neither read these as if
# fresh (tests/repo_copy.py builds test repos from the committed project) nor write them.
CHECKOUT = Path(__file__).resolve().parents[1]
RUN_STATE = ("data", "models", "checkpoints", "samples", "metrics", "plots", "figures", "reports",
             "reference", "featurenet", "work", "mlflow.db", "mlruns", "mlartifacts", "dvc.lock",
             "params.resolved.yaml",
             "params.yaml")  # fmt: skip


def _run_state() -> dict[str, tuple[int, int]]:
    """Every file of the checkout's run state: its modification time (ns) and size."""
    stamps = {}
    for name in RUN_STATE:
        top = CHECKOUT / name
        paths = [top] if top.is_file() else [p for p in top.rglob("*") if p.is_file()]
        for path in paths:
            st = path.stat()
            stamps[str(path.relative_to(CHECKOUT))] = (st.st_mtime_ns, st.st_size)
    return stamps


@pytest.fixture(autouse=True, scope="session")
def _checkout_left_as_it_was():
    """The suite runs the same on a fresh clone and after `make repro` (issue 42): it fails
    here if any test wrote into the checkout's outputs, MLflow store, dvc.lock or params."""
    before = _run_state()
    yield
    after = _run_state()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the test session wrote into the checkout: {changed[:10]}"
