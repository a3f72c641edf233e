"""A training run's identity: its name, where Ray Train stores it, and its MLflow run.

The run name is ``<variant>-<hash>``, the hash taken over everything that changes the trained
weights: the training images (the train split's checksums) and the flip setting, the model and
diffusion sections, the train section less the keys that only shape the cluster or the logging
(:data:`NOT_IN_IDENTITY`: the number of workers, or their elastic range, among them, so a run
resumes on any allowed number of workers), and the variant. ``train.backend`` does not change the
weights (a one-worker run is bit-identical through Ray Train and in process) but names the run
when it is not ``ray``: each backend resumes only from its own checkpoints, so each has its own
run folder. Ray Train stores the run in ``checkpoints/<variant>/<name>/``; the same name and
folder make ``fit()`` resume from the run's last checkpoint, so the same params after a crash
continue, and changed params start a new run (they never continue stale weights). The MLflow run
id lives in that folder too (``mlflow_run.json``), so a resumed run logs into the same MLflow
run, and the later stages find it there (pipeline.cluster.runrecord: model.json keeps only the
run's name).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pipeline.atomic import write_json
from pipeline.cluster.runrecord import MLFLOW_RECORD
from pipeline.config import Config, Variant, config_hash
from pipeline.data import read_manifest
from pipeline.uri import redact_uri

# Train keys that do not change the weights (beyond float rounding): the cluster's shape,
# threads and memory layout, retries, logging and checkpoint cadence, evaluation during training
# and checkpoint selection (turning them on for a finished run evaluates its kept checkpoints).
NOT_IN_IDENTITY = (
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "num_workers",  # a number or an elastic range: a run resumes on any allowed W
    "elastic_resize_s",
    "use_gpu",
    "cpus_per_worker",
    "gpus_per_worker",
    "torch_threads",
    "channels_last",
    "compile",
    "max_failures",
    "eval_every",
    "eval_samples",
    "select",
    "variants",
)
IDENTITY_RECORD = "identity.json"


def identity_payload(cfg: Config, variant: Variant, data_dir: str | Path) -> dict[str, Any]:
    """What the run name hashes (JSON-able)."""
    train_split = read_manifest(data_dir)["splits"].get("train", {})
    train = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in NOT_IN_IDENTITY}
    if train["backend"] == "ray":  # Ray Train runs keep their names; another backend's run
        del train["backend"]  # folder is its own (its checkpoints are not in Ray Train's records)
    sections = cfg.section_dict("model", "diffusion")
    if sections["model"]["precision"] == "fp32":  # the default: fp32 runs keep their names
        del sections["model"]["precision"]
    return {
        "data": {
            "train_files": [f.get("sha256") for f in train_split.get("files", [])],
            "resolution": cfg.data.resolution,
            "random_flip": cfg.data.random_flip,
        },
        **sections,
        "train": train,
        "variant": dataclasses.asdict(variant),
    }


def run_identity(cfg: Config, variant: Variant, data_dir: str | Path) -> dict[str, str]:
    """``{"name": "<variant>-<hash>", "config_hash": "<hash>"}``."""
    digest = config_hash(identity_payload(cfg, variant, data_dir))
    return {"name": f"{variant.name}-{digest}", "config_hash": digest}


def write_identity(run_dir: Path, cfg: Config, variant: Variant, data_dir: str | Path) -> None:
    """Record what the run's name stands for (for people reading the storage folder)."""
    write_json(run_dir / IDENTITY_RECORD, identity_payload(cfg, variant, data_dir))


def recorded_mlflow_run(run_dir: Path, tracking_uri: str) -> str | None:
    """The MLflow run id recorded for this Ray run in this tracking store, if any (the store
    compared without credentials: the record holds none)."""
    path = run_dir / MLFLOW_RECORD
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record["run_id"] if record.get("tracking_uri") == redact_uri(tracking_uri) else None


def record_mlflow_run(run_dir: Path, tracking_uri: str, run_id: str) -> None:
    """Record the run id and the store (its URI without credentials: pipeline.uri)."""
    record = {"tracking_uri": redact_uri(tracking_uri), "run_id": run_id}
    write_json(run_dir / MLFLOW_RECORD, record)
