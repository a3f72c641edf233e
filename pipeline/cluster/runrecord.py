"""A model's MLflow run, found from its ``models/<key>/model.json``'s ``run_name``.

model.json holds no MLflow run id: DVC records the hash of ``models/<key>/`` in dvc.lock, and two
runs of the same params, serial or side by side on a cluster, must record the same hash
(pipeline.training.export). The train stage keeps the id in its Ray run folder
(``checkpoints/<key>/<run_name>/mlflow_run.json``, in cluster storage when ``cluster.storage``
is set) and tags the MLflow run ``ddpm.ray_run`` = ``run_name``; importing published weights
tags its run the same way. The sample, evaluate and report stages find the run:

1. the run folder's record, where it names the tracking store in use and the run is there (the
   run the train stage logged into; the project folder, a storage folder, or one read of a
   bucket);
2. else the newest run of the experiment tagged with the run name and the variant (e.g. a fresh
   clone after ``dvc pull``, no checkpoints, MLFLOW_TRACKING_URI at the store the runs are in);
3. else :class:`~pipeline.errors.DataError`, one line: this store has no such run.

A model.json of an earlier version that still names ``mlflow_run_id`` is taken at its word.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.cluster.storage import MIRROR, storage_root
from pipeline.config import Config
from pipeline.errors import DataError
from pipeline.layout import checkpoint_dir, model_dir
from pipeline.report import tracking
from pipeline.uri import redact_uri

MLFLOW_RECORD = "mlflow_run.json"  # in the Ray run folder: {"tracking_uri", "run_id"}


def read_record(cfg: Config, root: Path, key: str, run_name: str) -> dict[str, Any] | None:
    """The run folder's MLflow record, read where the train stage wrote it (nothing created):
    the project folder, the storage folder, or a bucket (its local mirror first)."""
    rel = checkpoint_dir(key) / run_name / MLFLOW_RECORD
    store = storage_root(cfg)
    try:
        if store is None or store.is_local:
            path = root / rel if store is None else store.local_path(rel)
            text = path.read_text() if path.is_file() else None
        elif (root / MIRROR / rel).is_file():
            text = (root / MIRROR / rel).read_text()
        else:
            text = store.read_text(rel) if store.exists(rel) else None
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None  # unreadable: the MLflow search below decides


def _live(client: Any, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage != "deleted"
    except MlflowException:
        return False


def search_run(client: Any, experiment: str, variant: str | None, run_name: str) -> str | None:
    """The newest live run of ``experiment`` tagged ``ddpm.ray_run`` = ``run_name`` (and
    ``ddpm.variant`` = ``variant``), or None."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    where = f"tags.`{tracking.TAG_RUN}` = '{run_name}'"
    if variant:
        where += f" and tags.`{tracking.TAG_VARIANT}` = '{variant}'"
    runs = client.search_runs(
        [found.experiment_id], where, order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0].info.run_id if runs else None


def model_run_id(cfg: Config, key: str, meta: dict[str, Any], root: Path = Path(".")) -> str | None:
    """The MLflow run of ``models/<key>/``'s model.json ``meta`` (see the module docstring);
    None when it names no run (no ``run_name``: nothing to log into), DataError when the store
    has none."""
    if meta.get("mlflow_run_id"):  # an earlier version's model.json
        return str(meta["mlflow_run_id"])
    name = meta.get("run_name")
    if not name:
        return None
    from mlflow import MlflowClient

    uri = tracking.tracking_uri(cfg, root)
    client = MlflowClient(uri)
    record = read_record(cfg, root, key, name)
    if record and record.get("tracking_uri") == redact_uri(uri) and _live(client, record["run_id"]):
        return str(record["run_id"])
    found = search_run(client, cfg.mlflow.experiment, meta.get("variant"), name)
    if found is None:
        raise DataError(
            f"{model_dir(key) / 'model.json'}: no MLflow run of {name} (tag "
            f"{tracking.TAG_RUN}) in {redact_uri(uri)}, experiment {cfg.mlflow.experiment}; point "
            "MLFLOW_TRACKING_URI at the store the train stage used, or rerun it"
        )
    return found
