"""Cluster storage: what must outlive a job or be seen by more than one node.

``cluster.storage`` in params.yaml (DDPM_CLUSTER_STORAGE in the environment wins) names a
folder every node of the Ray cluster mounts at the same path (NFS, Lustre, EFS), or a bucket
URI that Ray Train and DVC both understand (``s3://bucket/prefix``, ``gs://bucket/prefix``;
access through :mod:`pipeline.cluster.storage_fs`). When it is set::

    <storage>/checkpoints/<variant>/<run>/   Ray Train's storage_path (every rank reports there)
    <storage>/data/<scale>-<digest>/         the prepared data the training ranks map
    <storage>/work/{sample,nll}/<variant>/   finished sample and NLL blocks (reused on resubmit)
    <storage>/dvc/                           the DVC remote each finished stage is pushed to
    <storage>/state/<scale>/                 dvc.lock and the uncached outputs (metrics, plots)

Unset, everything stays in the project folder (one node). Sampling, NLL and figure tasks get
their inputs through Ray's object store either way; only the driver writes block shards.

A folder is used in place. A bucket cannot be memory-mapped or globbed like a folder, so the
driver writes block shards into a local mirror (``<project>/.cluster-cache/``) and uploads each
one as it appears (:func:`synced`); a resubmitted driver first downloads the finished ones.
Training ranks download the prepared data once per node into a node-local cache
(:func:`node_local_data`, ``DDPM_NODE_CACHE``, default ``<tmp>/ddpm-node-cache``), checked
against the manifest's sha256 digests, and map it from there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch

from pipeline.cluster.lease import LeaseLostError, fence
from pipeline.cluster.retry import Backoff
from pipeline.cluster.storage_fs import Store
from pipeline.config import Config
from pipeline.errors import DataError, UserError

ENV = "DDPM_CLUSTER_STORAGE"
POINTER = "CLUSTER_STORAGE.txt"  # left in a local DVC out whose content lives in storage
MIRROR = ".cluster-cache"  # the driver's local copy of bucket folders, under the project
NODE_CACHE_ENV = "DDPM_NODE_CACHE"
SYNC_EVERY_S = 2.0  # how often a synced folder's new files are uploaded


def storage_root(cfg: Config) -> Store | None:
    """The cluster storage (a folder or a bucket), or None (single node: the project folder)."""
    value = os.environ.get(ENV) or cfg.cluster.storage
    return Store.parse(value) if value else None


_checked: set[str] = set()


def check_storage(cfg: Config) -> Store | None:
    """The storage, created if needed and checked writable (once per process); UserError
    otherwise."""
    store = storage_root(cfg)
    key = f"{store.url} {os.environ.get('AWS_ENDPOINT_URL', '')}" if store else ""
    if store is not None and key not in _checked:
        store.check_writable()
        _checked.add(key)
    return store


def shared_path(cfg: Config, root: Path, relative: Path) -> Path:
    """``relative`` (a layout path) in cluster storage, else in the project folder ``root``.

    In storage mode the local ``root/relative`` (a DVC out) is created too, holding a pointer
    file, so that DVC finds its output. A bucket: the driver's local mirror of ``relative``
    (keep it in step with :func:`synced`).
    """
    store = check_storage(cfg)
    if store is None:
        return (root / relative).resolve()
    local = root / relative
    local.mkdir(parents=True, exist_ok=True)
    (local / POINTER).write_text(f"{store.uri(relative)}\n")
    if store.is_local:
        return store.local_path(relative)
    return (root / MIRROR / relative).resolve()


@contextlib.contextmanager
def synced(
    cfg: Config, root: Path, folder: Path, patterns: tuple[str, ...] = ("*",)
) -> Iterator[None]:
    """Keep ``folder`` (from :func:`shared_path`, a bucket's mirror) in step with storage.

    Downloads the files storage holds there first (finished blocks of an earlier job), then
    uploads every new or changed file matching ``patterns`` every :data:`SYNC_EVERY_S` seconds
    and once more on exit, also when the body fails (what finished is kept). A file whose
    upload fails is retried with backoff (:data:`UPLOAD_BACKOFF`) while the others go on; the
    stage fails at the end (UserError) only for a file that still failed after the last retry,
    or when this job lost its lease (:func:`~pipeline.cluster.lease.fence`, checked before each
    round of uploads: nothing more is uploaded). Nothing to do for a folder store or without
    storage.
    """
    store = storage_root(cfg)
    mirror = (Path(root) / MIRROR).resolve()
    folder = Path(folder).resolve()
    if store is None or store.is_local or not folder.is_relative_to(mirror):
        yield
        return
    rel = folder.relative_to(mirror)
    for name in store.get_dir(rel, folder):
        _uploaded(folder / name)
    uploads = Uploads(store, rel, folder, patterns, cfg.scale, UPLOAD_BACKOFF)
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(SYNC_EVERY_S) and uploads.lost is None:
            uploads.run_pass()

    thread = threading.Thread(target=loop, name="storage-sync", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        uploads.flush()
        uploads.raise_failed()


UPLOAD_BACKOFF = Backoff()  # per-file upload retries of synced (tests: seeded and short)
LEASE_CHECK = "\0lease"  # Uploads' key for the retries of the lease check (no file's name)


class Uploads:
    """The uploads of one synced folder: what was sent, what failed how often and when it is
    due again, what failed for good. :meth:`run_pass` never raises and never waits."""

    def __init__(
        self,
        store: Store,
        rel: Path,
        folder: Path,
        patterns: tuple[str, ...],
        scale: str,
        backoff: Backoff,
    ):
        self.store, self.rel, self.folder, self.patterns = store, rel, folder, patterns
        self.scale, self.backoff = scale, backoff
        self.sent: dict[str, tuple[int, int]] = {}
        self.failures: dict[str, int] = {}
        self.due: dict[str, float] = {}  # time.monotonic() of a failed file's next try
        self.failed: dict[str, Exception] = {}  # persistent: given up
        self.lost: LeaseLostError | None = None

    def pending(self) -> list[tuple[str, Path, tuple[int, int]]]:
        """(name, path, (size, mtime)) of every file to upload, not given up on."""
        found = []
        for path in sorted(self.folder.rglob("*")) if self.folder.is_dir() else []:
            name = str(path.relative_to(self.folder))
            if not path.is_file() or path.name.startswith(".") or path.suffix == ".tmp":
                continue
            if not any(fnmatch(path.name, p) for p in self.patterns) or name in self.failed:
                continue
            stat = path.stat()
            key = (stat.st_size, stat.st_mtime_ns)
            if self.sent.get(name) != key and _UPLOADED.get(str(path)) != key:
                found.append((name, path, key))
        return found

    def run_pass(self) -> None:
        """Upload what is pending and due; check the lease first (none of it if lost)."""
        todo = self.pending()
        if not todo or self.lost is not None or not self._lease_checked():
            return
        now = time.monotonic()
        for name, path, key in todo:
            if self.due.get(name, 0.0) > now:
                continue
            try:
                self.store.put_file(path, self.rel / name)
            except Exception as e:
                self._failed(name, e)
                continue
            self.sent[name] = key
            self.failures.pop(name, None)
            self.due.pop(name, None)

    def _lease_checked(self) -> bool:
        """:func:`fence`: True if the lease is still this job's; a lease that cannot be read
        for now is retried with the same backoff (and given up on as a lost lease)."""
        if self.due.get(LEASE_CHECK, 0.0) > time.monotonic():
            return False
        try:
            fence(self.store, self.scale)
        except LeaseLostError as e:
            self.lost = e
            return False
        except Exception as e:
            self._failed(LEASE_CHECK, e)
            if LEASE_CHECK in self.failed:
                self.lost = LeaseLostError(f"the lease could not be checked: {e}")
            return False
        self.failures.pop(LEASE_CHECK, None)
        self.due.pop(LEASE_CHECK, None)
        return True

    def _failed(self, name: str, error: Exception) -> None:
        count = self.failures[name] = self.failures.get(name, 0) + 1
        what = (
            "lease check"
            if name == LEASE_CHECK
            else f"upload of {self.store.shown(self.rel / name)}"
        )
        reason = f"{type(error).__name__}: {str(error)[:120]}"
        if self.backoff.gives_up(count) or isinstance(error, UserError):
            self.failed[name] = error
            print(f"warning: {what} failed {count} times ({reason})", file=sys.stderr, flush=True)
            return
        wait = self.backoff.delay(count)
        self.due[name] = time.monotonic() + wait
        print(
            f"warning: {what} failed ({reason}); retry {count} in {wait:.1f} s",
            file=sys.stderr,
            flush=True,
        )

    def flush(self) -> None:
        """Passes until every pending file is sent or given up on (waiting for retries)."""
        while True:
            self.run_pass()
            todo = [name for name, _, _ in self.pending()]
            if not todo or self.lost is not None:
                return
            due = min(self.due.get(name, 0.0) for name in todo)
            due = max(due, self.due.get(LEASE_CHECK, 0.0))
            time.sleep(max(due - time.monotonic(), 0.0))

    def raise_failed(self) -> None:
        """UserError for a lost lease or for the files given up on."""
        if self.lost is not None:
            raise LeaseLostError(f"{self.lost}; the files left in {self.folder} are not uploaded")
        if self.failed:
            name, error = next(iter(sorted(self.failed.items())))
            more = f" (and {len(self.failed) - 1} more)" if len(self.failed) > 1 else ""
            raise UserError(
                f"upload to {self.store.shown(self.rel / name)}{more} failed "
                f"{self.failures.get(name, 1)} times: {type(error).__name__}: "
                f"{str(error).splitlines()[0][:200] if str(error) else ''}"
            )


_UPLOADED: dict[str, tuple[int, int]] = {}  # local files downloaded from storage: not resent


def _uploaded(path: Path) -> None:
    stat = path.stat()
    _UPLOADED[str(path)] = (stat.st_size, stat.st_mtime_ns)


def shared_data(cfg: Config, local: Path) -> str:
    """The prepared data folder the training ranks read: ``local`` copied into storage once.

    The copy is keyed by the manifest's digest (which lists every file's sha256). A folder
    store: written under a temporary name and renamed, so every node sees the whole copy or
    none. A bucket: every file put, the manifest last (its presence marks a whole copy); the
    ranks read it through :func:`node_local_data`. Unset storage: ``local`` itself.
    """
    store = check_storage(cfg)
    local = local.resolve()
    if store is None:
        return str(local)
    return store_data(store, local)


def store_data(store: Store, local: Path) -> str:
    """:func:`shared_data` into ``store``: the URI (or path) of the stored copy."""
    local = local.resolve()
    rel = Path("data") / f"{local.name}-{_digest(local / 'manifest.json')}"
    if not store.is_local:
        if not store.exists(rel / "manifest.json"):
            for path in sorted(local.rglob("*")):
                if path.is_file() and path.name != "manifest.json":
                    store.put_file(path, rel / path.relative_to(local))
            store.put_file(local / "manifest.json", rel / "manifest.json")
        return store.uri(rel)
    target = store.local_path(rel)
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
    return str(target)


def _digest(manifest: Path) -> str:
    return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]


def node_local_data(data_dir: str) -> Path:
    """A local folder with the prepared data ``data_dir`` (from :func:`shared_data`).

    A path: itself. A bucket URI: downloaded once per node into the node-local cache (keyed
    by the manifest's digest, which the folder name carries), every file listed in the
    manifest checked against its sha256, then renamed into place: ranks on one node share one
    copy, and a rank never maps a half-written or tampered file. One rank of a node downloads
    (an exclusive ``flock`` on ``.<name>.lock`` in the cache); the others wait for it, then
    find the copy.
    """
    if "://" not in data_dir:
        return Path(data_dir)
    store = Store(data_dir)
    name = data_dir.rstrip("/").rsplit("/", 1)[1]
    cache = Path(os.environ.get(NODE_CACHE_ENV) or Path(tempfile.gettempdir()) / "ddpm-node-cache")
    target = cache / name
    if (target / "manifest.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{name}.lock", "a") as lock:  # one download per node: the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "manifest.json").is_file():  # another rank of this node downloaded it
            return target
        _download_data(store, data_dir, name, cache, target)
    return target


def _download_data(store: Store, data_dir: str, name: str, cache: Path, target: Path) -> None:
    """:func:`node_local_data`'s download, checked, renamed to ``target`` (under the lock)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache))
    try:
        store.get_dir("", tmp)
        if not name.endswith("-" + _digest(tmp / "manifest.json")):
            raise DataError(f"{data_dir}: manifest.json does not match the folder's digest")
        for path, sha in _listed_files(json.loads((tmp / "manifest.json").read_text())):
            if _sha256(tmp / path) != sha:
                raise DataError(f"{data_dir}/{path}: sha256 differs from the manifest's")
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _listed_files(manifest: object) -> Iterator[tuple[str, str]]:
    """Every (path, sha256) pair anywhere in a manifest."""
    if isinstance(manifest, dict):
        if isinstance(manifest.get("path"), str) and isinstance(manifest.get("sha256"), str):
            yield manifest["path"], manifest["sha256"]
        for value in manifest.values():
            yield from _listed_files(value)
    elif isinstance(manifest, list):
        for value in manifest:
            yield from _listed_files(value)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dvc_remote(store: Store) -> str:
    """The DVC remote's URL in storage."""
    return store.uri("dvc")


def state_dir(store: Store, scale: str) -> Path:
    """Where dvc.lock and the uncached outputs of a scale are kept between jobs (relative)."""
    return Path("state") / scale


# What a torch file read from storage may hold besides tensors: numpy arrays (torch-fidelity's
# statistics), nothing that runs code when unpickled.
NUMPY_GLOBALS = [
    np._core.multiarray._reconstruct,  # type: ignore[attr-defined]  # numpy 2's, not in its stubs
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


def record_placement(run_dir: str | Path, rank: int) -> None:
    """Note which Ray node (and host, process) this training rank runs on, in ``run_dir/nodes/``.

    ``rank-<r>-<node id>.json``: one file per rank and node it ever ran on (restarts included),
    so that people and tests can see where a run trained. ``run_dir``: a path or a bucket URI.
    """
    import socket

    import ray

    node = ray.get_runtime_context().get_node_id()
    record = {"rank": rank, "node_id": node, "host": socket.gethostname(), "pid": os.getpid()}
    Store(str(run_dir)).write_text(f"nodes/rank-{rank}-{node[:12]}.json", json.dumps(record) + "\n")
