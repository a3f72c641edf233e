"""Cluster storage: what must outlive a job or be seen by more than one node.

``cluster.storage`` in params.yaml (DDPM_CLUSTER_STORAGE in the environment wins) names a
folder every node of the Ray cluster mounts at the same path (NFS, Lustre, EFS, a bucket
mounted with s3fs/gcsfuse). When it is set::

    <storage>/checkpoints/<variant>/<run>/   Ray Train's storage_path (every rank reports there)
    <storage>/data/<scale>-<digest>/         the prepared data the training ranks map
    <storage>/work/{sample,nll}/<variant>/   finished sample and NLL blocks (reused on resubmit)
    <storage>/dvc/                           the DVC remote each finished stage is pushed to
    <storage>/state/<scale>/                 dvc.lock and the uncached outputs (metrics, plots)

Unset, everything stays in the project folder (one node). Sampling, NLL and figure tasks get
their inputs through Ray's object store either way; only the driver writes block shards.
A URI (s3://, gs://) is refused with one line for now: mount it and give the mount path.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Config
from pipeline.errors import ConfigError, DataError, UserError

ENV = "DDPM_CLUSTER_STORAGE"
POINTER = "CLUSTER_STORAGE.txt"  # left in a local DVC out whose content lives in storage


def storage_root(cfg: Config) -> Path | None:
    """The cluster storage folder, or None (single node: the project folder holds everything)."""
    value = os.environ.get(ENV) or cfg.cluster.storage
    if not value:
        return None
    if "://" in value and not value.startswith("file://"):
        raise ConfigError(
            f"cluster.storage {value!r}: URIs are not supported yet; mount the bucket on every "
            "node (s3fs, gcsfuse) and give the mount's path"
        )
    path = Path(value.removeprefix("file://"))
    if not path.is_absolute():
        raise ConfigError(f"cluster.storage {value!r}: must be an absolute path (every node's)")
    return path


def check_storage(cfg: Config) -> Path | None:
    """The storage folder, created if needed and checked writable; a UserError otherwise."""
    root = storage_root(cfg)
    if root is None:
        return None
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-check-"):
            pass
    except OSError as e:
        raise UserError(f"cluster storage {root} is not writable: {e.strerror or e}") from None
    return root


def shared_path(cfg: Config, root: Path, relative: Path) -> Path:
    """``relative`` (a layout path) in cluster storage, else in the project folder ``root``.

    In storage mode the local ``root/relative`` (a DVC out) is created too, holding a pointer
    file, so that DVC finds its output.
    """
    storage = check_storage(cfg)
    if storage is None:
        return (root / relative).resolve()
    local = root / relative
    local.mkdir(parents=True, exist_ok=True)
    target = storage / relative
    (local / POINTER).write_text(f"{target}\n")
    return target


def shared_data(cfg: Config, local: Path) -> Path:
    """The prepared data folder the training ranks read: ``local`` copied into storage once.

    The copy is keyed by the manifest's digest (which lists every file's sha256), written under
    a temporary name and renamed, so every node sees the whole copy or none. Unset storage:
    ``local`` itself.
    """
    storage = check_storage(cfg)
    local = local.resolve()
    if storage is None:
        return local
    digest = hashlib.sha256((local / "manifest.json").read_bytes()).hexdigest()[:16]
    target = storage / "data" / f"{local.name}-{digest}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            shutil.copytree(local, tmp, dirs_exist_ok=True)
            os.rename(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not target.is_dir():  # another driver's copy won the rename: use it
                raise
    return target


def dvc_remote(storage: Path) -> Path:
    """The DVC remote folder in storage."""
    return storage / "dvc"


def state_dir(storage: Path, scale: str) -> Path:
    """Where dvc.lock and the uncached outputs of a scale are kept between jobs."""
    return storage / "state" / scale


def copy_file_atomic(source: Path, target: Path) -> None:
    """Copy ``source`` onto ``target`` through a temporary sibling (readers never see half)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        shutil.copy2(source, tmp)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# What a torch file read from storage may hold besides tensors: numpy arrays (torch-fidelity's
# statistics), nothing that runs code when unpickled.
NUMPY_GLOBALS = [
    np._core.multiarray._reconstruct,
    np.ndarray,
    np.dtype,
    type(np.dtype(np.float32)),
    type(np.dtype(np.float64)),
]


def safe_load(path: Path) -> object:
    """``torch.load`` with ``weights_only=True`` and :data:`NUMPY_GLOBALS`; DataError if refused."""
    try:
        with torch.serialization.safe_globals(NUMPY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(
            f"{path}: refused, not plain tensors or arrays ({type(e).__name__})"
        ) from None


def record_placement(run_dir: Path, rank: int) -> None:
    """Note which Ray node (and host, process) this training rank runs on, in ``run_dir/nodes/``.

    ``rank-<r>-<node id>.json``: one file per rank and node it ever ran on (restarts included),
    so that people and tests can see where a run trained.
    """
    import json
    import socket

    import ray

    node = ray.get_runtime_context().get_node_id()
    folder = run_dir / "nodes"
    folder.mkdir(parents=True, exist_ok=True)
    record = {"rank": rank, "node_id": node, "host": socket.gethostname(), "pid": os.getpid()}
    (folder / f"rank-{rank}-{node[:12]}.json").write_text(json.dumps(record) + "\n")
