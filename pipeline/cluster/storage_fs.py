"""Access to cluster storage: a folder (NFS, Lustre, EFS) or a bucket URI (s3://, gs://).

:class:`Store` gives the few operations the pipeline needs on both: ``exists``, ``list``,
``put_file``/``put_dir`` (a local file or folder into storage), ``get_file``/``get_dir``
(storage to a local file or folder), ``write_text``/``read_text`` (small records), ``remove`` and
``makedirs``. A folder keeps the fast local behaviour: plain file copies written under a
temporary name and renamed (readers never see half a file); in a bucket each object put is
atomic by itself. Every local file written by ``get_*`` is written under a temporary name and
renamed too, so concurrent readers on one node are safe. A folder store's files are fsynced (the
file, then its folder) so that a renamed file is a whole file after a crash of the node.

**Nothing lands outside its folder.** Keys are relative paths (:func:`safe_rel`): an absolute
key or one with a ``..`` part is refused (:class:`UnsafePathError`), and every local path a store
reads or writes is resolved (symbolic links followed) and checked to be inside its folder
(:func:`inside`). A listing leaves such keys out with one warning line each: a key planted in a
bucket (``state/<scale>/work/../../../x``) is never copied onto a local path.

:meth:`Store.create_text` writes a small file only if it is absent, atomically among concurrent
writers (``link()`` on a folder, S3's ``If-None-Match: *``, GCS's ``ifGenerationMatch=0``):
the primitive of the job lease (:mod:`pipeline.cluster.lease`).

Buckets go through fsspec (s3fs for s3://, gcsfs for gs://; extras ``ddpm-repro[s3]`` and
``ddpm-repro[gs]``). An S3-compatible store (MinIO, Ceph, a moto server) is reached through
the standard ``AWS_ENDPOINT_URL`` environment variable; credentials come from the usual
places (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ~/.aws, instance roles;
``GOOGLE_APPLICATION_CREDENTIALS`` for gs://). A :class:`Store` holds only its URL, so it can
be sent to Ray workers; each process builds its own filesystem client on first use.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import importlib.util
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.errors import ConfigError, DataError, UserError
from pipeline.uri import redact_uri

ENDPOINT_ENV = "AWS_ENDPOINT_URL"
# scheme -> (the fsspec package it needs, the pip extra that installs it with the DVC plugin)
SCHEMES = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gs"), "gcs": ("gcsfs", "gs")}
CONNECT_TIMEOUT_S = 5  # a bucket endpoint that does not answer fails fast, not after minutes


class UnsafePathError(DataError):
    """A key or path that would read or write outside its folder (absolute, ``..``, a link)."""


def safe_rel(rel: str | os.PathLike) -> PurePosixPath:
    """``rel`` as a relative key inside a store; UnsafePathError unless it is canonical: not
    absolute, no ``..``, ``.`` or empty part (``a//b`` is another S3 key than ``a/b``). ``""``
    and ``"."`` are the root."""
    text = os.fspath(rel)
    if text in ("", "."):
        return PurePosixPath(".")
    if "\0" in text or any(part in ("", ".", "..") for part in text.split("/")):
        raise UnsafePathError(
            f"{text!r}: refused, a storage key must be a relative path without '..' or '//'"
        )
    return PurePosixPath(text)


def inside(folder: str | os.PathLike, rel: str | os.PathLike) -> Path:
    """``folder/rel`` after checking that it stays inside ``folder`` once resolved (``..`` and
    symbolic links followed); UnsafePathError otherwise."""
    folder = Path(folder)
    path = folder / safe_rel(rel)
    if not path.resolve().is_relative_to(folder.resolve()):
        raise UnsafePathError(f"{path}: refused, it resolves outside {folder}")
    return path


def _warn_refused(where: str, error: UnsafePathError) -> None:
    print(f"warning: {where}: left out: {error}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Store:
    """One cluster-storage location: an absolute folder path or ``scheme://bucket[/prefix]``."""

    url: str

    @staticmethod
    def parse(value: str) -> Store:
        """The store ``value`` names; ConfigError for a relative path or an unknown scheme, and
        UserError when the scheme's filesystem package is not installed."""
        value = value.strip().removeprefix("file://")
        if "://" in value:
            scheme, rest = value.split("://", 1)
            rest = rest.rstrip("/")
            if scheme not in SCHEMES:
                known = ", ".join(f"{s}://" for s in SCHEMES)
                raise ConfigError(
                    f"cluster.storage {value!r}: unknown scheme {scheme}:// (a path, or {known})"
                )
            if not rest or rest.startswith("/"):
                raise ConfigError(f"cluster.storage {value!r}: no bucket name after {scheme}://")
            package, extra = SCHEMES[scheme]
            needed = {package: package, f"dvc_{extra}": f"dvc-{extra}"}
            missing = [n for m, n in needed.items() if importlib.util.find_spec(m) is None]
            if missing:
                raise UserError(
                    f"cluster.storage {value!r} needs {' and '.join(missing)}, not installed: "
                    f"pip install 'ddpm-repro[{extra}]'"
                )
            return Store(f"{'gs' if scheme == 'gcs' else scheme}://{rest}")
        value = value.rstrip("/") or "/"
        if not Path(value).is_absolute():
            raise ConfigError(f"cluster.storage {value!r}: must be an absolute path (every node's)")
        return Store(value)

    # -- where things are ----------------------------------------------------------------

    @property
    def scheme(self) -> str:
        """``s3``, ``gs`` or ``file``."""
        return self.url.split("://", 1)[0] if "://" in self.url else "file"

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    def uri(self, rel: str | os.PathLike = "") -> str:
        """The URL (or absolute path) of ``rel`` in storage (see :func:`safe_rel`)."""
        rel = str(safe_rel(rel)).rstrip("/")
        return f"{self.url.rstrip('/')}/{rel}" if rel and rel != "." else self.url

    def shown(self, rel: str | os.PathLike = "") -> str:
        """:meth:`uri` for messages and logs: any credentials in it replaced by ``***``."""
        return redact_uri(self.uri(rel))

    def local_path(self, rel: str | os.PathLike = "") -> Path:
        """``rel`` as a local path (a folder store only), checked to resolve inside the store's
        folder (:func:`inside`)."""
        if not self.is_local:
            raise ValueError(f"{self.url} is a bucket, not a folder")
        return inside(self.url, rel)

    def _path(self, rel: str | os.PathLike) -> str:
        """``rel`` as a path of :attr:`fs` (no scheme)."""
        uri = self.uri(rel)
        return uri.split("://", 1)[1] if "://" in uri else uri

    @property
    def fs(self) -> Any:
        """The fsspec filesystem (one client per process and store)."""
        return _filesystem(self.scheme, self._endpoint() or "")

    # -- operations ------------------------------------------------------------------------

    def exists(self, rel: str | os.PathLike) -> bool:
        """Whether a file (or, in a folder store, a folder; in a bucket, a prefix) exists."""
        if self.is_local:
            return self.local_path(rel).exists()
        return bool(self.fs.exists(self._path(rel)))

    def list(self, rel: str | os.PathLike = "") -> list[str]:
        """Every file under ``rel``, recursively, as paths relative to ``rel`` (sorted). In a
        bucket, the empty "folder" objects that pyarrow (Ray Train) creates are not files."""
        if self.is_local:
            base = self.local_path(rel)
            if not base.is_dir():
                return []
            names = [str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()]
        else:
            base_key = self._path(rel).rstrip("/")
            self.fs.invalidate_cache()
            try:
                found = self.fs.find(base_key)
            except FileNotFoundError:
                return []
            names = [p[len(base_key) + 1 :] for p in found if p.startswith(base_key + "/")]
            names = [n for n in names if n and not n.endswith("/")]  # not pyarrow's dir markers
        return sorted(n for n in names if self._listable(rel, n))

    def _listable(self, rel: str | os.PathLike, name: str) -> bool:
        """Whether a listed ``name`` under ``rel`` is a safe key (one warning line if not): no
        ``..``, not absolute, and in a folder store not a link that leads out of it."""
        try:
            safe_rel(name)
            if self.is_local:
                inside(self.local_path(rel), name)
        except UnsafePathError as e:
            _warn_refused(self.uri(rel), e)
            return False
        return True

    def put_file(self, local: str | os.PathLike, rel: str | os.PathLike) -> None:
        """Copy the local file ``local`` to ``rel`` (readers see the old file or the new one)."""
        if self.is_local:
            copy_file_atomic(Path(local), self.local_path(rel))
        else:
            self.fs.put_file(str(local), self._path(rel))

    def put_dir(self, local: str | os.PathLike, rel: str | os.PathLike) -> int:
        """Copy every file under the local folder ``local`` to ``rel``; the number of bytes."""
        total = 0
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                self.put_file(path, Path(rel) / path.relative_to(local))
                total += path.stat().st_size
        return total

    def get_file(self, rel: str | os.PathLike, local: str | os.PathLike) -> None:
        """Copy ``rel`` to the local file ``local`` (temporary sibling, then rename)."""
        safe_rel(rel)
        if self.is_local:
            copy_file_atomic(self.local_path(rel), Path(local))
            return
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.parent / f".{local.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            self.fs.get_file(self._path(rel), str(tmp))
            os.replace(tmp, local)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def get_dir(self, rel: str | os.PathLike, local: str | os.PathLike) -> builtins.list[str]:
        """Copy every file under ``rel`` into the local folder ``local``; the files copied.
        Every destination is checked to resolve inside ``local`` (UnsafePathError otherwise)."""
        names = self.list(rel)
        for name in names:
            self.get_file(Path(rel) / name, inside(local, name))
        return names

    def write_text(self, rel: str | os.PathLike, text: str) -> None:
        """A small text file (a record) at ``rel``, written atomically."""
        if self.is_local:
            target = self.local_path(rel)
            tmp = _synced_temp(target, text.encode())
            os.replace(tmp, target)
            fsync_dir(target.parent)
        else:
            self.fs.pipe_file(self._path(rel), text.encode())

    def create_text(self, rel: str | os.PathLike, text: str) -> bool:
        """Write the small file ``rel`` only if it is absent: True if this call created it,
        False if it exists. Of concurrent callers (threads, processes, nodes) exactly one gets
        True. ``text`` should be unique to the caller (a nonce): a create whose reply was lost
        and whose retry found the file is recognised by its content.

        A folder: the text is written to a temporary file and fsynced, then ``link()``ed to
        ``rel`` (atomic, and fails if ``rel`` exists, on POSIX file systems and NFSv3+). S3:
        ``PutObject`` with ``If-None-Match: *``; GCS: ``ifGenerationMatch=0`` (both through
        fsspec's ``mode="create"``; a server that ignores the condition is caught only when the
        read-back finds another writer's text).
        """
        if not self.is_local:
            with contextlib.suppress(FileExistsError):
                self.fs.pipe_file(self._path(rel), text.encode(), mode="create")
            # read back: a store that ignores the condition (an old S3-compatible server) is
            # caught when another writer's record is found here (not in every interleaving)
            return self._holds(rel, text)
        target = self.local_path(rel)
        tmp = _synced_temp(target, text.encode())
        try:
            os.link(tmp, target)
            created = True
        except FileExistsError:
            created = False
        except OSError:  # NFS: a link whose reply was lost; the retry may report an error
            created = os.stat(tmp).st_nlink == 2
        finally:
            os.unlink(tmp)
        fsync_dir(target.parent)
        return created or self._holds(rel, text)

    def _holds(self, rel: str | os.PathLike, text: str) -> bool:
        try:
            return self.read_text(rel) == text
        except FileNotFoundError:
            return False

    def read_text(self, rel: str | os.PathLike) -> str:
        """The text of ``rel``; FileNotFoundError if absent."""
        if self.is_local:
            return self.local_path(rel).read_text()
        return self.fs.cat_file(self._path(rel)).decode()

    def remove(self, rel: str | os.PathLike) -> None:
        """Delete the file ``rel`` (nothing if it is absent)."""
        if self.is_local:
            self.local_path(rel).unlink(missing_ok=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._path(rel))

    def makedirs(self, rel: str | os.PathLike = "") -> None:
        """Create the folder ``rel`` (buckets have no folders: nothing to do)."""
        if self.is_local:
            self.local_path(rel).mkdir(parents=True, exist_ok=True)

    def check_writable(self) -> None:
        """Write and delete a small file at the root; UserError naming the cause if that fails."""
        name = f".write-check-{uuid.uuid4().hex[:12]}"
        try:
            self.makedirs()
            self.write_text(name, "ok\n")
            if self.is_local:
                self.local_path(name).unlink()
            else:
                self.fs.rm_file(self._path(name))
        except UserError:
            raise
        except Exception as e:  # botocore/gcsfs raise many types; all mean "not usable"
            reason = (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__
            where = f" (endpoint {os.environ[ENDPOINT_ENV]})" if self._endpoint() else ""
            raise UserError(
                f"cluster storage {self.url}{where} is not writable: "
                f"{type(e).__name__}: {reason.splitlines()[0][:200]}"
            ) from None

    def _endpoint(self) -> str | None:
        return os.environ.get(ENDPOINT_ENV) if self.scheme == "s3" else None

    # -- what Ray Train and DVC need ---------------------------------------------------------

    def ray_storage(self, rel: str | os.PathLike) -> tuple[str, Any]:
        """(storage_path, storage_filesystem) for Ray Train's RunConfig at ``rel``.

        A folder or a bucket without an endpoint override: the URI and None (Ray builds the
        pyarrow filesystem). An S3-compatible endpoint: pyarrow's S3FileSystem pointed at it,
        and the path inside it.
        """
        endpoint = self._endpoint()
        if not endpoint:
            return self.uri(rel), None
        from pyarrow import fs as pafs

        scheme, _, rest = endpoint.partition("://")
        s3 = pafs.S3FileSystem(
            endpoint_override=rest or scheme,
            scheme=scheme if rest else "https",
            region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            connect_timeout=CONNECT_TIMEOUT_S,
        )
        return self._path(rel), s3

    def dvc_remote_options(self) -> dict[str, str]:
        """``dvc remote modify`` options the remote needs beyond its URL (the endpoint)."""
        endpoint = self._endpoint()
        return {"endpointurl": endpoint} if endpoint else {}


@functools.cache
def _filesystem(scheme: str, endpoint: str) -> Any:
    """The fsspec filesystem of a scheme, with short timeouts and the endpoint override."""
    import fsspec

    if scheme == "file":
        return fsspec.filesystem("file")
    if scheme == "s3":
        client: dict[str, Any] = {}
        if endpoint:
            client["endpoint_url"] = endpoint
        config = {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": 60,
            "retries": {"max_attempts": 2, "mode": "standard"},
        }
        return fsspec.filesystem(
            "s3", client_kwargs=client, config_kwargs=config, skip_instance_cache=True
        )
    return fsspec.filesystem(scheme, timeout=60, skip_instance_cache=True)


def copy_file_atomic(source: Path, target: Path) -> None:
    """Copy ``source`` onto ``target`` through a temporary sibling (readers never see half),
    the copy fsynced before the rename and the folder after it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        shutil.copy2(source, tmp)
        fsync_file(Path(tmp))
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _synced_temp(target: Path, data: bytes) -> str:
    """A temporary sibling of ``target`` holding ``data``, fsynced; its path."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it) to the device, where the system allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
