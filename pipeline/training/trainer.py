"""The train stage's driver: one variant trained with Ray Train (or in this process), resumable,
then exported.

:func:`train_variant` checks the params and the prepared data, names the run
(:mod:`pipeline.training.identity`), opens (or reopens) the variant's MLflow run, connects to Ray
(a new local cluster, or RAY_ADDRESS / ``ray.address``), runs a ``TorchTrainer``
(DistributedDataParallel over ``train.num_workers`` workers, a number or an elastic range:
:func:`scaling_options`; gloo on CPU, NCCL on GPU) whose ``RunConfig`` keeps the last
``keep_checkpoints`` checkpoints in ``checkpoints/<variant>/`` and restarts failed workers from
the latest one up to ``max_failures`` times, shows progress, records the world size of every
(re)start (:mod:`pipeline.training.worldsize`), and writes the final weights to
``models/<variant>/``. With ``train.backend: process`` the same loop
runs in this process instead, without Ray (:mod:`pipeline.training.inprocess`). A diverged run
raises :class:`~pipeline.training.loop.TrainingDivergedError` naming the step and the last
good checkpoint.

With ``cluster.storage`` set (:mod:`pipeline.cluster.storage`), the run folder (Ray Train's
storage_path) and the prepared data the ranks map are in cluster storage, so ranks on any node find
them and a resubmitted job continues from the stored checkpoint. A bucket (s3://, gs://): Ray Train
writes the run there itself (:meth:`pipeline.cluster.storage_fs.Store.ray_storage`), the ranks
download the prepared data into a node-local cache, and the driver keeps its records (identity,
MLflow run) in a local mirror of the run folder that it uploads (:func:`_pull_records`,
:func:`_push_records`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.cluster import devices
from pipeline.cluster.lease import fence
from pipeline.cluster.progress import BoardReader, ProgressDisplay, new_board
from pipeline.cluster.raycluster import init_ray
from pipeline.cluster.storage import MIRROR, check_storage, shared_data, shared_path
from pipeline.cluster.storage_fs import Store
from pipeline.config import Config, TrainConfig, Variant
from pipeline.data import open_split
from pipeline.errors import ConfigError
from pipeline.layout import checkpoint_dir, data_dir, model_dir, reference_dir
from pipeline.report import tracking
from pipeline.training import faults
from pipeline.training.curves import MlflowCurves
from pipeline.training.export import export_weights
from pipeline.training.identity import (
    IDENTITY_RECORD,
    MLFLOW_RECORD,
    record_mlflow_run,
    recorded_mlflow_run,
    run_identity,
    write_identity,
)
from pipeline.training.loop import TrainingDivergedError, TrainJob, train_loop_per_worker
from pipeline.training.selection import TAG_SELECTION, select_checkpoint, selection_note
from pipeline.training.signals import own_sigint
from pipeline.training.worldsize import WorldSizes

if TYPE_CHECKING:  # imported where used: it pulls in torch-fidelity and torchvision (~1.6 s)
    from pipeline.training.eval_during import CheckpointEvaluator

# Each ray.train.report waits about this long for the controller (Ray's default is 2 s).
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_S = "0.2"


@dataclass(frozen=True)
class TrainSummary:
    """What a finished :func:`train_variant` did."""

    variant: str
    run_name: str
    start: int  # step this fit began at (0: a fresh run)
    restarts: list[int]  # steps that failed workers were restarted from (FailureConfig)
    steps: int  # steps done in total
    seconds: float  # wall time of fit(), start-up included
    model_dir: Path
    model_json: dict[str, Any]
    # the MLflow run (also in the run folder's mlflow_run.json and the run's ddpm.ray_run tag;
    # model.json holds only what params and data determine: pipeline.training.export)
    mlflow_run_id: str = ""
    eval_seconds: float | None = None  # waiting for evaluations after fit() (eval_every > 0)


def check_train_config(cfg: Config) -> None:
    """The train section's values that config.validate cannot judge; ConfigError naming them."""
    t, where = cfg.train, f"presets.{cfg.scale}.train"
    checks = {
        "lr": (t.lr > 0, "positive"),
        "warmup": (t.warmup >= 0, "0 or more"),
        "keep_checkpoints": (t.keep_checkpoints >= 1, "at least 1"),
        "cpus_per_worker": (t.cpus_per_worker >= 1, "at least 1"),
        "gpus_per_worker": (not t.use_gpu or t.gpus_per_worker > 0, "positive with use_gpu"),
        "torch_threads": (t.torch_threads >= 1, "at least 1"),
        "max_failures": (t.max_failures >= 0, "0 or more"),
        "seed": (t.seed >= 0, "0 or more"),
    }
    for key, (ok, expected) in checks.items():
        if not ok:
            raise ConfigError(f"{where}.{key} must be {expected} (got {getattr(t, key)!r})")
    bad = [w for w in t.worker_counts() if t.batch_size % w]
    if bad:
        raise ConfigError(
            f"{where}.batch_size ({t.batch_size}) must be divisible by every number of workers "
            f"train.num_workers allows (not by {bad[0]}): the global batch is split evenly"
        )


def check_data(cfg: Config, folder: Path) -> int:
    """The prepared train split exists and fits the params; returns its size."""
    images = open_split(folder, "train")
    side = images.shape[1]
    if side != cfg.data.resolution:
        raise ConfigError(
            f"{folder} holds {side}x{side} images but presets.{cfg.scale}.data.resolution is "
            f"{cfg.data.resolution}; rerun `dvc repro prepare`"
        )
    return len(images)


def make_trainer(job: TrainJob) -> Any:
    """The TorchTrainer of a job: scaling, backend, storage, checkpoints and retries."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = job.cfg.train
    storage_path, filesystem = _ray_storage(job.run_dir)
    return TorchTrainer(  # Ray Train V2 (the default) takes any return: mypy sees V1's type
        train_loop_per_worker,  # type: ignore[arg-type]  # V1's Callable[[dict], None]
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend=devices.train_backend(t.use_gpu)),
        scaling_config=ScalingConfig(**scaling_options(t)),
        run_config=RunConfig(
            name=job.run["name"],
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=FailureConfig(max_failures=t.max_failures),
            # V2's RunConfig has logging_config; mypy sees ray.air's (V1), which has not
            logging_config=LoggingConfig(log_level="WARNING"),  # type: ignore[call-arg]
        ),
    )


def scaling_options(t: TrainConfig) -> dict[str, Any]:
    """Ray Train's ``ScalingConfig`` keywords for the train section: a fixed number of workers,
    or with ``num_workers: [min, max]`` a ``(min, max)`` tuple, which turns on Ray Train's
    elastic scaling (a restart after a lost worker goes on with the workers the cluster still
    holds, at least min; every ``elastic_resize_s`` seconds a running group is grown, or shrunk,
    to what the cluster holds, up to max: docs/training.md, "Elastic training")."""
    resources = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})}
    options: dict[str, Any] = {"use_gpu": t.use_gpu, "resources_per_worker": resources}
    if t.elastic:
        options["num_workers"] = (t.min_workers, t.max_workers)
        options["elastic_resize_monitor_interval_s"] = t.elastic_resize_s
    else:
        options["num_workers"] = t.max_workers  # [n, n]: n workers, Ray's fixed scaling
    return options


def open_mlflow_run(cfg: Config, variant: Variant, run_dir: Path, root: Path) -> tuple[str, str]:
    """(tracking URI, run id): the run recorded for this Ray run, else a new one."""
    import mlflow

    uri = tracking.tracking_uri(cfg, root)
    run_id = recorded_mlflow_run(run_dir, uri)
    if run_id is not None:
        try:
            mlflow.MlflowClient(uri).get_run(run_id)
            return uri, run_id
        except mlflow.exceptions.MlflowException:
            pass  # the store was reset: start a new MLflow run for this Ray run
    run_id = tracking.start_variant_run(cfg, variant, root, {tracking.TAG_RUN: run_dir.name})
    record_mlflow_run(run_dir, uri, run_id)
    return uri, run_id


def train_variant(cfg: Config, variant: Variant, root: str | Path | None = None) -> TrainSummary:
    """Train ``variant`` at ``cfg``'s scale (resuming its run if one exists) and export it.

    ``root`` is the project folder (default: the working directory): data/, checkpoints/,
    models/ and the default MLflow store are under it.
    """
    root = Path(root or Path.cwd()).resolve()
    check_train_config(cfg)
    check_data(cfg, root / data_dir(cfg.scale))
    data = shared_data(cfg, root / data_dir(cfg.scale))  # in cluster storage when set
    run = run_identity(cfg, variant, root / data_dir(cfg.scale))
    run_dir = shared_path(cfg, root, checkpoint_dir(cfg.run_key(variant.name))) / run["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    ray_run_dir = _pull_records(cfg, root, run_dir)  # a bucket: its URI, else run_dir
    write_identity(run_dir, cfg, variant, root / data_dir(cfg.scale))
    evaluator = make_evaluator(cfg, variant, run_dir, root)
    uri, run_id = open_mlflow_run(cfg, variant, run_dir, root)
    _push_records(cfg, root, run_dir)
    if evaluator is not None:
        evaluator.mlflow = (uri, run_id)
    start = time.perf_counter()
    job = TrainJob(cfg, variant, data, ray_run_dir, run, fault=faults.from_environment())
    if cfg.train.backend == "process":
        result, starts = _fit_here(job, uri, run_id)
    else:
        result, starts = fit(job, uri, run_id, [evaluator] if evaluator else [])
    seconds = time.perf_counter() - start
    if result.return_value["status"] == "diverged":
        _mark_run(uri, run_id, "diverged")
        raise TrainingDivergedError(_diverged_message(result, cfg.train.steps))
    out = root / model_dir(cfg.run_key(variant.name))  # models/<V>-s<k>/ for a further seed
    eval_seconds = None
    with result.checkpoint.as_directory() as last:
        folder, selection = Path(last), {"select": "last", "evaluations": 0}
        if evaluator is not None:
            evaluator.finish()
            folder, selection = select_checkpoint(cfg.train.select, evaluator.records, folder)
            eval_seconds = round(time.perf_counter() - start - seconds, 3)
        info = export_weights(folder, out, cfg, variant, run, {"selection": selection})
    _log_selection(uri, run_id, selection, eval_seconds)
    if evaluator is not None:  # which sampler the FID that selected the checkpoint came from
        from pipeline.training.eval_during import TAG_EVAL_SAMPLER, eval_sampler

        mlflow_client(uri).set_tag(run_id, TAG_EVAL_SAMPLER, eval_sampler(cfg))
    _mark_run(uri, run_id, "finished")
    _record_workers(uri, run_id, result.metrics.get("world_size"), starts[1:])
    return TrainSummary(
        variant.name, run["name"], starts[0], starts[1:], info["steps"], seconds, out, info,
        run_id, eval_seconds,
    )  # fmt: skip


def _ray_storage(run_dir: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) of Ray Train for the run folder ``run_dir``."""
    if "://" not in run_dir:
        return str(Path(run_dir).parent), None
    parent, _ = run_dir.rstrip("/").rsplit("/", 1)
    return Store(parent).ray_storage("")


def _bucket_run(cfg: Config, root: Path, run_dir: Path) -> tuple[Store, Path] | None:
    """(store, the run folder's path in it) when ``run_dir`` is a bucket run's local mirror."""
    store = check_storage(cfg)
    mirror = (root / MIRROR).resolve()
    if store is None or store.is_local or not run_dir.resolve().is_relative_to(mirror):
        return None
    return store, run_dir.resolve().relative_to(mirror)


def _pull_records(cfg: Config, root: Path, run_dir: Path) -> str:
    """A bucket run: download the driver's records of an earlier job (not the checkpoints:
    Ray Train reads those itself) into the mirror ``run_dir``; returns the run's URI. Else
    ``run_dir``."""
    bucket = _bucket_run(cfg, root, run_dir)
    if bucket is None:
        return str(run_dir)
    store, rel = bucket
    for name in (IDENTITY_RECORD, MLFLOW_RECORD):
        if store.exists(rel / name):
            store.get_file(rel / name, run_dir / name)
    return store.uri(rel)


def _push_records(cfg: Config, root: Path, run_dir: Path) -> None:
    """A bucket run: upload the driver's records from the mirror ``run_dir``."""
    bucket = _bucket_run(cfg, root, run_dir)
    if bucket is not None:
        store, rel = bucket
        fence(store, cfg.scale)  # a job that lost its lease uploads nothing more
        for name in (IDENTITY_RECORD, MLFLOW_RECORD):
            if (run_dir / name).is_file():
                store.put_file(run_dir / name, rel / name)


def make_evaluator(
    cfg: Config, variant: Variant, run_dir: Path, root: Path
) -> CheckpointEvaluator | None:
    """Evaluation during training (train.eval_every > 0), or None; needs the train reference."""
    if cfg.train.eval_every <= 0:
        return None
    stats = root / reference_dir(cfg.scale) / "train-stats.pt"
    if not stats.is_file():
        raise ConfigError(
            f"presets.{cfg.scale}.train.eval_every needs the training reference statistics "
            f"{stats}; run the reference stage first (dvc repro reference)"
        )
    bucket = _bucket_run(cfg, root, run_dir)  # a bucket: the evaluator lists the run there
    from pipeline.training.eval_during import CheckpointEvaluator

    return CheckpointEvaluator(cfg, variant, run_dir, stats, root, bucket=bucket)


def mlflow_client(uri: str) -> Any:
    import mlflow

    return mlflow.MlflowClient(uri)


def _log_selection(
    uri: str, run_id: str, selection: dict[str, Any], eval_seconds: float | None
) -> None:
    """The chosen checkpoint as MLflow tag ``ddpm.selection`` (the report's notes show it) and,
    with evaluation during training, the seconds waited for it after fit() as the metric
    ``eval_wait_s`` (a timing: never in model.json, whose hash is in dvc.lock)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    client.set_tag(run_id, TAG_SELECTION, selection_note(selection))
    if eval_seconds is not None:
        client.log_metric(run_id, "eval_wait_s", eval_seconds)


def fit(
    job: TrainJob, uri: str, run_id: str, sinks: list[Any] | None = None
) -> tuple[Any, list[int]]:
    """Run the job's TorchTrainer, showing progress and logging curves to the MLflow run.

    Returns Ray's result and the steps the workers started (and restarted) at.
    """
    import ray

    os.environ.setdefault(HEALTH_CHECK_ENV, HEALTH_CHECK_S)
    init_ray(job.cfg.ray)
    board = new_board()  # on the driver's node: outlives a lost worker node
    job = dataclasses.replace(job, board=board)
    trainer = make_trainer(job)
    display = ProgressDisplay(f"train {job.variant.name}", job.cfg.train.steps)
    try:
        sinks = [display, MlflowCurves(uri, run_id), WorldSizes(uri, run_id), *(sinks or [])]
        with own_sigint(), BoardReader(board, sinks):  # Ray Train's handler removed after fit
            result = trainer.fit()
    except Exception:
        _mark_run(uri, run_id, "failed")
        raise
    finally:
        ray.kill(board)
    return result, display.starts or [result.return_value["start"]]


def _fit_here(job: TrainJob, uri: str, run_id: str) -> tuple[Any, list[int]]:
    """``train.backend: process``: the loop in this process (:mod:`pipeline.training.inprocess`)."""
    from pipeline.training.inprocess import fit_in_process

    if "://" in job.run_dir:
        raise ConfigError(
            f"presets.{job.cfg.scale}.train.backend: process keeps its checkpoints in a local "
            f"folder, but the run is in bucket storage ({job.run_dir}); use backend: ray"
        )
    try:
        return fit_in_process(job, uri, run_id)
    except Exception:
        _mark_run(uri, run_id, "failed")
        raise


def _diverged_message(result: Any, steps: int) -> str:
    """One line: in which step (1-based) it diverged, and the last good checkpoint."""
    bad = result.return_value["bad_step"] + 1
    if result.checkpoint is None:
        last = "none was saved before it"
    else:
        last = f"after step {result.metrics['step']}, {result.checkpoint.path}"
    return (
        f"training diverged: the loss or the gradient norm became NaN or infinite in step "
        f"{bad} of {steps}; last good checkpoint: {last}"
    )


def _mark_run(uri: str, run_id: str, status: str) -> None:
    """Tag the MLflow run with how training ended (finished | failed | diverged)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    client.set_tag(run_id, "ddpm.train_status", status)
    client.set_terminated(run_id, "FINISHED" if status == "finished" else "FAILED")


def _record_workers(uri: str, run_id: str, world_size: int | None, restarts: list[int]) -> None:
    """Tag the MLflow run with the workers that trained it and the steps they restarted from."""
    import mlflow

    if world_size is None:  # nothing was left to train: the tags of the run that did stay
        return
    client = mlflow.MlflowClient(uri)
    client.set_tag(run_id, "ddpm.world_size", str(world_size))
    client.set_tag(run_id, "ddpm.restarts", ",".join(map(str, restarts)) or "none")
