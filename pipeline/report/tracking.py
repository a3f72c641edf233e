"""MLflow tracking: one run per variant, shared by the train, sample and evaluate stages.

The store is MLFLOW_TRACKING_URI when set, else params' ``mlflow.tracking_uri``, else a SQLite
database ``mlflow.db`` in the project root with artifacts under ``mlartifacts/``. The train
stage creates the variant's run, tags it ``ddpm.ray_run`` with model.json's ``run_name`` and
records its id in the Ray run folder; later stages find it from there or by that tag
(pipeline.cluster.runrecord) and log into it. Runs carry tags ``ddpm.scale``, ``ddpm.variant``,
the variant's types, the git commit, the DVC experiment name and ``stand_in``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.cli import mlflow_refusal
from pipeline.config import Config, Variant
from pipeline.errors import UserError
from pipeline.uri import redact_uri

TAG_SCALE = "ddpm.scale"
TAG_VARIANT = "ddpm.variant"
TAG_STAND_IN = "stand_in"
TAG_SOURCE = "ddpm.source"  # trained | published weights
TAG_SEED = "ddpm.seed"
# the world sizes a run changed between, "STEP: FROM -> TO; ..." (pipeline.training.worldsize)
TAG_WORLD_SIZES = "ddpm.world_size_changes"
# the run's name: model.json's run_name (pipeline.training.identity: the Ray Train run's
# name; published weights: <variant>-published-<sha256[:12]>). Later stages find the MLflow run
# by it (pipeline.cluster.runrecord): model.json holds no run id, its hash is in dvc.lock
TAG_RUN = "ddpm.ray_run"
# MLflow 3's experiment kind (the UI's "Machine learning" type): its experiment page opens on
# the training runs, not on the GenAI overview (traces). Values: mlflow/server/js ExperimentKind.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
TAG_NOTE = "mlflow.note.content"  # a run's description, rendered as Markdown by the UI


def tracking_uri(cfg: Config, root: Path | None = None) -> str:
    """The tracking URI this project uses (see the module docstring)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    root = (root or Path.cwd()).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def shown_uri(cfg: Config, root: Path | None = None) -> str:
    """The tracking URI as reports/index.html and messages show it: credentials redacted
    (pipeline.uri), the default store relative to the project (its absolute path would make the
    page, and its hash in dvc.lock, depend on where the project folder is)."""
    uri = tracking_uri(cfg, root)
    default = f"sqlite:///{(root or Path.cwd()).resolve() / 'mlflow.db'}"
    return "sqlite:///mlflow.db (in the project folder)" if uri == default else redact_uri(uri)


def check_access(cfg: Config) -> None:
    """Before any work: a tracking server (http, https) that refuses this process (HTTP 401,
    403: credentials missing or wrong, pipeline.cli.mlflow_refusal) or cannot be reached is one
    UserError, not a failure of the first stage that logs. One read request."""
    uri = tracking_uri(cfg)
    if not uri.startswith(("http://", "https://")):
        return
    import mlflow

    try:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except mlflow.exceptions.MlflowException as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        unusable = f"the MLflow server {redact_uri(uri)} cannot be used: {redact_uri(why)}"
        raise UserError(mlflow_refusal(e) or unusable) from None


def setup(cfg: Config, root: Path | None = None) -> str:
    """Point mlflow at the store and make sure the experiment exists; returns its id."""
    import mlflow

    uri = tracking_uri(cfg, root)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is not None:
        if experiment.tags.get(TAG_EXPERIMENT_KIND) is None:  # a store made before the tag
            mlflow.MlflowClient().set_experiment_tag(
                experiment.experiment_id, TAG_EXPERIMENT_KIND, MODEL_TRAINING
            )
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:"):  # keep artifacts beside the database, not under the cwd
        location = ((root or Path.cwd()).resolve() / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(
            cfg.mlflow.experiment,
            artifact_location=location,
            tags={TAG_EXPERIMENT_KIND: MODEL_TRAINING},
        )
    except mlflow.exceptions.MlflowException as e:
        # Another stage created it since the lookup: stages run side by side on a cluster
        # (pipeline.cluster.parallel), and the first trainings reach a fresh store together.
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
        if experiment is None:
            raise
        return experiment.experiment_id


def git_commit(root: Path | None = None) -> str | None:
    """HEAD of the project's git repository (with a +dirty mark), or None outside git."""
    try:
        cwd = root or Path.cwd()
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10,
            check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "-uno"], cwd=cwd, capture_output=True, text=True,
            timeout=10, check=True,
        )  # fmt: skip
        return head + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_tags(cfg: Config, variant: Variant) -> dict[str, str]:
    """The tags every variant run carries."""
    tags = {
        TAG_SCALE: cfg.scale,
        TAG_VARIANT: variant.name,
        "ddpm.mean_type": variant.mean_type,
        "ddpm.var_type": variant.var_type,
        "ddpm.loss_type": variant.loss_type,
        "ddpm.dataset": cfg.data.dataset,
        TAG_SEED: str(cfg.train.seed),  # the training seed (seeds: docs/report-and-mlflow.md)
        TAG_STAND_IN: _stand_in(cfg),
        TAG_SOURCE: "published weights" if cfg.model.source == "checkpoint" else "trained",
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    exp_name = os.environ.get("DVC_EXP_NAME")
    if exp_name:
        tags["dvc.exp_name"] = exp_name
    if cfg.stand_in_reasons():
        tags["stand_in_reason"] = "; ".join(cfg.stand_in_reasons())
    return tags


def start_variant_run(
    cfg: Config, variant: Variant, root: Path | None = None, tags: dict[str, str] | None = None
) -> str:
    """Create the variant's run with its params and tags (and ``tags``); returns the run id.

    ``root`` is the project folder of the default store (default: the working directory).
    """
    import mlflow

    experiment_id = setup(cfg, root)
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=f"{cfg.scale}/{cfg.run_key(variant.name)}",  # <V>-s<k>: a further seed
        tags={**run_tags(cfg, variant), **(tags or {})},
    ) as run:
        params: dict[str, Any] = {k: _param(v) for k, v in cfg.flat().items()}
        params.update({f"variant.{k}": v for k, v in vars(variant).items()})
        # mlflow.tracking_uri, ray.address, cluster.storage: no credentials in a param
        mlflow.log_params({k: redact_uri(str(v)) for k, v in params.items()})
        return run.info.run_id


@contextlib.contextmanager
def variant_run(cfg: Config, run_id: str) -> Iterator[Any]:
    """Reopen a variant's run (made by the train stage) to log into it."""
    import mlflow

    setup(cfg)
    with mlflow.start_run(run_id=run_id) as run:
        yield run


def _param(value: Any) -> str:
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    return "null" if value is None else str(value)


def log_reproduction(
    cfg: Config,
    run_ids: dict[str, str],
    files: list[Path],
    index: Path | None = None,
    description: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> str:
    """A parent run for the whole reproduction: the tables as artifacts, the variants nested.

    Each variant run gets the ``mlflow.parentRunId`` tag, so the UI shows them under it.
    ``index`` (reports/index.html) is logged at the artifacts' top level; ``description`` (the
    headline table in Markdown) becomes the run's description (tag ``mlflow.note.content``).
    ``extra_tags`` (the verdicts, pipeline.report.verdict.tags) are set on the parent run.
    A rerun for the same variant runs updates their parent instead of making another one.
    Returns the parent run's id.
    """
    import mlflow

    experiment_id = setup(cfg)
    tags = {TAG_SCALE: cfg.scale, "ddpm.role": "reproduction", TAG_STAND_IN: _stand_in(cfg)}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    if description:
        tags[TAG_NOTE] = description
    tags.update(extra_tags or {})
    reuse = _previous_parent(run_ids)  # a rerun of the report: the same parent run, updated
    with mlflow.start_run(
        run_id=reuse,
        experiment_id=None if reuse else experiment_id,
        run_name=None if reuse else f"{cfg.scale}/reproduction",
        tags=tags,
    ) as parent:
        mlflow.log_param("variants", ",".join(run_ids))
        for path in files:
            mlflow.log_artifact(str(path), "tables")
        if index is not None:
            mlflow.log_artifact(str(index))
    client = mlflow.MlflowClient()
    for run_id in run_ids.values():
        client.set_tag(run_id, "mlflow.parentRunId", parent.info.run_id)
    return parent.info.run_id


def _previous_parent(run_ids: dict[str, str]) -> str | None:
    """The reproduction run the variant runs are all nested under, if it holds exactly them."""
    import mlflow

    client = mlflow.MlflowClient()
    parents = {client.get_run(r).data.tags.get("mlflow.parentRunId") for r in run_ids.values()}
    parent_id = parents.pop() if len(parents) == 1 else None
    if parent_id is None:
        return None
    parent = client.get_run(parent_id)
    if parent.data.tags.get("ddpm.role") != "reproduction":
        return None
    if parent.data.params.get("variants") != ",".join(run_ids):
        return None
    return parent.info.run_id


def ui_link(cfg: Config, experiment_id: str) -> str:
    """Where the experiment's runs are in MLflow's UI (``mlflow ui`` on a local store). MLflow
    3.17's UI shows what its GenAI / Model-training switch says, whatever the experiment's
    kind; ``workflowType=machine_learning`` sets the switch."""
    uri = redact_uri(tracking_uri(cfg))
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def _stand_in(cfg: Config) -> str:
    return str(bool(cfg.stand_in_reasons())).lower()
