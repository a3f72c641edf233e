"""Durable, incremental runs on a cluster: each finished stage reaches cluster storage at once.

``stages.repro`` uses this when ``cluster.storage`` is set (see :mod:`pipeline.cluster.storage`):

Storage is a folder or a bucket (:class:`pipeline.cluster.storage_fs.Store`; a bucket's DVC remote
needs the ``dvc-s3``/``dvc-gs`` plugin, and ``AWS_ENDPOINT_URL`` is given to it as ``endpointurl``).

1. restore: copy ``<storage>/state/<scale>/`` (dvc.lock and the outputs DVC does not cache:
   params.resolved.yaml, metrics/, plots/, the pointer files and Inception caches of
   checkpoints/ and work/) into the working directory, then ``dvc pull --allow-missing`` from
   the storage remote. Every torch
   file restored is first loaded with ``weights_only=True``
   (:func:`pipeline.cluster.storage.safe_load`);
   one that is refused is not restored (its stage then simply reruns).
2. reproduce stage by stage (``dvc repro --single-item``, in dvc.yaml's order), and after each
   stage ``dvc push`` its outputs to the remote and save the state: a job stopped or failed
   keeps every stage it finished; a resubmitted job (new working directory, same params) skips
   them, training continues from its stored checkpoint and finished blocks are reused.

Every save first checks that this job still holds the storage lease
(:func:`pipeline.cluster.lease.fence`): a job that lost it saves nothing more. A file whose
upload fails is retried with backoff (:data:`SAVE_BACKOFF`). Every file restored lands inside
the working directory (a key with ``..`` or a link leading out of storage is refused), and the
recorded data location must be inside storage's ``data/``.

A push the remote rejects fails the run after the stage, with its local outputs kept.
:func:`check_job_tracking` stops a Ray job whose MLflow store would live in its temporary
working directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from pipeline.cluster.lease import fence
from pipeline.cluster.retry import Backoff, retrying
from pipeline.cluster.stopping import Stopped
from pipeline.cluster.storage import (
    dvc_remote,
    node_local_data,
    safe_load,
    state_dir,
    store_data,
)
from pipeline.cluster.storage_fs import Store, UnsafePathError, copy_file_atomic, inside
from pipeline.config import Config
from pipeline.errors import DataError, UserError
from pipeline.layout import data_dir
from pipeline.report import tracking

RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in every `ray job submit` driver
REMOTE = "cluster-storage"
# relative to the project: dvc.lock and the outputs DVC does not cache (params.resolved.yaml is
# in git, as the committed scale's: a job of another scale needs the one its dvc.lock records)
STATE = ("dvc.lock", "params.resolved.yaml", "metrics", "plots", "checkpoints", "work")
DATA_RECORD = "data.txt"  # in the state: where in storage the prepared data (uncached) is

Dvc = Callable[..., None]


def in_ray_job() -> bool:
    """Whether this process is the entrypoint of a ``ray job submit``."""
    return RAY_JOB_ENV in os.environ


def local_store(uri: str) -> Path | None:
    """The local path of a file-based MLflow store (sqlite:///..., file:..., a path), else None."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).expanduser()
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else uri).expanduser()
    return None


def check_job_tracking(cfg: Config, workdir: Path) -> None:
    """In a Ray job, a UserError unless MLflow's store outlives the job's working directory."""
    if not in_ray_job():
        return
    uri = tracking.tracking_uri(cfg, workdir)
    store = local_store(uri)
    if store is None or not store.resolve().is_relative_to(workdir.resolve()):
        return
    configured = os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri
    where = f"the MLflow store {uri}" if configured else "MLFLOW_TRACKING_URI is not set"
    raise UserError(
        f"{where}: in a Ray job the MLflow store would be in the job's temporary working "
        f"directory and lost with it; set MLFLOW_TRACKING_URI in the job's runtime_env "
        f'(--runtime-env-json \'{{"env_vars": {{"MLFLOW_TRACKING_URI": ...}}}}\') to an '
        f"MLflow server or a store on cluster storage"
    )


def stage_names() -> list[str]:
    """dvc.yaml's stages in file order (foreach expanded), a topological order here."""
    out = subprocess.run(
        ["dvc", "stage", "list", "--name-only"], capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise UserError(f"dvc stage list failed: {out.stderr.strip().splitlines()[-1:]}")
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def reproduce_with_storage(
    store: Store,
    scale: str,
    repro_args: list[str],
    dvc: Dvc,
    parallel: int = 1,
    env: dict[str, str] | None = None,
) -> None:
    """Restore, then reproduce stage by stage with a push and a state save after each;
    ``parallel`` > 1: independent stages side by side (pipeline.cluster.parallel)."""
    state = state_dir(store, scale)
    dvc("remote", "add", "--local", "--force", "--default", REMOTE, dvc_remote(store))
    for option, value in store.dvc_remote_options().items():
        dvc("remote", "modify", "--local", REMOTE, option, value)
    if restore_state(store, state, Path.cwd()):
        print(f"restored the state of an earlier run from {store.shown(state)}", flush=True)
        restore_data(store, state, Path.cwd(), scale)
        dvc("pull", "--allow-missing")
    if repro_args:  # targets or options of the user's: one repro, then one push
        dvc("repro", *repro_args)
        push(dvc, store, None)
        save_data(Path.cwd(), store, state, scale)
        save_state(Path.cwd(), store, state)
        return

    def after(name: str) -> None:
        push(dvc, store, name)
        save_data(Path.cwd(), store, state, scale)
        save_state(Path.cwd(), store, state)

    if parallel > 1:
        from pipeline.cluster.parallel import run_parallel

        run_parallel(parallel, after, env=env)
        return
    for name in stage_names():
        dvc("repro", "--single-item", name)
        after(name)


def save_data(project: Path, store: Store, state: Path, scale: str) -> None:
    """The prepared data (an uncached DVC output, so in no remote) copied into storage once
    (``data/<scale>-<digest>/``, as the training ranks read it) and recorded in the state."""
    local = project / data_dir(scale)
    if (local / "manifest.json").is_file():
        fence(store, state.name)  # state is state/<scale>
        where = store_data(store, local)
        if not store.exists(state / DATA_RECORD) or store.read_text(state / DATA_RECORD) != where:
            store.write_text(state / DATA_RECORD, where)


def restore_data(store: Store, state: Path, project: Path, scale: str) -> None:
    """The recorded prepared data into ``project`` (sha256-checked through the node-local
    cache), so that DVC finds ``data/<scale>`` as dvc.lock records it and skips prepare."""
    local = project / data_dir(scale)
    if local.exists() or not store.exists(state / DATA_RECORD):
        return
    where = store.read_text(state / DATA_RECORD).strip()
    stored = store.uri("data").rstrip("/") + "/"
    if not where.startswith(stored) or ".." in Path(where.removeprefix(stored)).parts:
        raise UnsafePathError(f"{store.shown(state / DATA_RECORD)}: {where!r} is not in {stored}")
    if store.is_local:
        where = str(store.local_path(Path("data") / where.removeprefix(stored)))
    source = node_local_data(where)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.parent / f".{local.name}.restoring"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    os.replace(tmp, local)


def push(dvc: Dvc, store: Store, stage: str | None) -> None:
    """``dvc push [stage]`` to the storage remote; a rejected push is one UserError line."""
    try:
        dvc("push", *([stage] if stage else []))
    except Stopped:  # a signal stopped the push: a stop, not a remote failure
        raise
    except SystemExit as e:
        what = f"stage {stage}" if stage else "the outputs"
        raise UserError(
            f"dvc push of {what} to {dvc_remote(store)} failed (status {e.code}); the outputs "
            "are kept in the working directory and DVC's cache: fix the remote and rerun"
        ) from None


def _files(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """Files under ``folder`` of the given top-level names, relative to ``folder``."""
    found = []
    for name in names:
        path = folder / name
        if path.is_file():
            found.append(Path(name))
        elif path.is_dir():
            found += [p.relative_to(folder) for p in sorted(path.rglob("*")) if p.is_file()]
    return found


def _same(a: Path, b: Path) -> bool:
    if not b.is_file():
        return False
    sa, sb = a.stat(), b.stat()
    return sa.st_size == sb.st_size and sa.st_mtime_ns == sb.st_mtime_ns


_SAVED: dict[str, tuple[int, int]] = {}  # bucket objects this process wrote: (size, mtime)
SAVE_BACKOFF = Backoff()  # retries of one state file's upload


def save_state(project: Path, store: Store, state: Path) -> int:
    """Copy the uncached outputs, then dvc.lock, into ``state`` (changed files only); bytes
    copied.

    A folder store compares size and mtime with the stored copy; a bucket, with what this
    process uploaded last (a new job uploads the small state once, then only changes).
    """
    fence(store, state.name)  # state is state/<scale>: a job that lost its lease saves nothing
    copied = 0
    # dvc.lock last: a save cut short leaves the old lock with new outputs (the stages rerun
    # or are found unchanged), never a new lock beside the outputs of an earlier stage
    for rel in sorted(_files(project, STATE), key=lambda rel: rel == Path("dvc.lock")):
        if rel.name.startswith(".") and (rel.name.endswith(".tmp") or ".tmp." in rel.name):
            continue  # a temporary file (pipeline.atomic and the like)
        source = project / rel
        try:
            copied += _save_file(source, store, state / rel)
        except FileNotFoundError:
            if source.exists():
                raise
            # gone since the listing: a file of a stage still running beside the one just
            # committed (pipeline.cluster.parallel); its own commit saves what it leaves
    return copied


def _save_file(source: Path, store: Store, dest: Path) -> int:
    """``source`` into the store at ``dest`` unless unchanged; bytes copied."""
    if store.is_local:
        if _same(source, store.local_path(dest)):
            return 0
        copy_file_atomic(source, store.local_path(dest))
    else:
        stat, uri = source.stat(), store.uri(dest)
        if _SAVED.get(uri) == (stat.st_size, stat.st_mtime_ns):
            return 0
        retrying(lambda: store.put_file(source, dest), f"save of {uri}", SAVE_BACKOFF)
        _SAVED[uri] = (stat.st_size, stat.st_mtime_ns)
    return source.stat().st_size


def restore_state(store: Store, state: Path, project: Path) -> bool:
    """Copy a saved state into ``project``; torch files only when they load weights-only."""
    if store.is_local:
        return _restore_folder(store.local_path(state), project)
    files = [Path(f) for f in store.list(state) if Path(f).parts[0] in STATE]
    if Path("dvc.lock") not in files:
        return False
    with tempfile.TemporaryDirectory(prefix=".restore-", dir=project) as tmp:
        for rel in files:
            store.get_file(state / rel, inside(tmp, rel))
        _restore_folder(Path(tmp), project)
    return True


def _restore_folder(state: Path, project: Path) -> bool:
    """:func:`restore_state` from a local folder ``state``."""
    files = _files(state, STATE) if state.is_dir() else []
    if not any(rel == Path("dvc.lock") for rel in files):
        return False
    for rel in files:
        try:
            source, target = inside(state, rel), inside(project, rel)
            if rel.suffix == ".pt":
                safe_load(source)
        except DataError as e:  # a refused torch file, a link out of storage or the project
            print(f"warning: not restored: {e}", flush=True)
            continue
        if not _same(source, target):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return True
