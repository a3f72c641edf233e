"""One job per cluster storage and scale: a lease at ``<storage>/state/<scale>/lease``.

Two jobs on one storage would train the same Ray Train run into the same folder and interleave
their state saves. DVC's repository lock does not prevent it: every edit of the code gives a
Ray job a new working directory. So ``stages.repro`` takes a lease before any work
(:func:`job_lease`); the lease is a small JSON record, in a folder or a bucket alike
(:class:`~pipeline.cluster.storage_fs.Store`)::

    {"job": "raysubmit_...", "host": "head-1", "pid": 4242, "stop": "ray job stop raysubmit_...",
     "started": 1764690000.0, "heartbeat": 1764690042.0}

- **Held**: a second job finds a lease of another job whose heartbeat is younger than
  :data:`TIMEOUT_S` and stops at once with one ``error:`` line naming that job and how to stop it.
- **Heartbeat**: a thread of the holder rewrites ``heartbeat`` every :data:`HEARTBEAT_S`.
- **Taken over**: a lease whose heartbeat is older than :data:`TIMEOUT_S` belongs to a job that
  died (SIGKILLed, its node lost); the next job takes it, so a resubmission after a crash never
  waits for a person. A lease of a job that ran on this host and whose process is gone (pid and
  start time) is taken over at once: the drivers of Ray jobs all run on the head, so a
  resubmission right after ``ray job stop`` (which SIGKILLs after its wait) needs no timeout.
- **Lost**: a holder whose lease was taken over (its heartbeat stalled past the timeout, e.g. a
  storage outage) stops its stage (:func:`stop_self`) instead of writing on.
- **Released** when the job ends (finished, failed or stopped by a signal it survives).

Taking it is check, write, wait :data:`SETTLE_S`, read back: of two jobs that write at nearly the
same moment one reads the other's record and stops. Object stores (S3, GCS) and NFS are
read-after-write consistent; clocks are assumed synchronised (NTP) to well within the timeout.
``DDPM_LEASE_TIMEOUT_S`` overrides :data:`TIMEOUT_S` (the heartbeat is an eighth of it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.cluster.storage_fs import Store
from pipeline.errors import UserError

LEASE = "lease"
TIMEOUT_ENV = "DDPM_LEASE_TIMEOUT_S"
TIMEOUT_S = 120.0  # a heartbeat older than this: the holder died, the lease is taken over
HEARTBEAT_S = TIMEOUT_S / 8
SETTLE_S = 1.0  # between writing the lease and reading it back
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # Ray's job config, in every `ray job submit` driver


def lease_path(scale: str) -> Path:
    """The lease of a scale, relative to the storage root."""
    return Path("state") / scale / LEASE


def this_job() -> tuple[str, str]:
    """(job id, how to stop it): the Ray job's submission id, else host:pid."""
    host, pid = socket.gethostname(), os.getpid()
    with contextlib.suppress(KeyError, ValueError, TypeError):
        job = json.loads(os.environ[RAY_JOB_ENV])["metadata"]["job_submission_id"]
        if job:
            return job, f"ray job stop {job}"
    return f"{host}:{pid}", f"kill {pid} on host {host}"


def timeout_s() -> float:
    """The lease timeout: ``DDPM_LEASE_TIMEOUT_S`` or :data:`TIMEOUT_S`."""
    value = os.environ.get(TIMEOUT_ENV)
    return float(value) if value else TIMEOUT_S


class Lease:
    """The lease of ``store``/``scale`` for this job (``job``: id, default :func:`this_job`)."""

    def __init__(
        self,
        store: Store,
        scale: str,
        job: tuple[str, str] | None = None,
        timeout: float | None = None,
        on_lost: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.store, self.scale, self.path = store, scale, lease_path(scale)
        self.job, self.stop_hint = job or this_job()
        self.timeout = timeout_s() if timeout is None else timeout
        self.heartbeat_s = self.timeout / 8
        self.on_lost = on_lost or stop_self
        self.record: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict[str, Any] | None:
        """The stored lease, or None (absent or unreadable: a half-written record is none)."""
        try:
            record = json.loads(self.store.read_text(self.path))
        except (FileNotFoundError, ValueError):
            return None
        return record if isinstance(record, dict) and "job" in record else None

    def _write(self) -> None:
        self.record["heartbeat"] = time.time()
        self.store.write_text(self.path, json.dumps(self.record) + "\n")

    def _refuse_if_held(self, held: dict[str, Any] | None) -> None:
        if held is None or held.get("job") == self.job:
            return
        age = time.time() - float(held.get("heartbeat", 0))
        if _ended_here(held):
            print(
                f"taking over the lease of job {held['job']}: it ran on this host and has "
                f"ended (process {held.get('pid')} is gone)",
                file=sys.stderr,
                flush=True,
            )
            return
        if age >= self.timeout:
            print(
                f"taking over the lease of job {held['job']} on {held.get('host')} "
                f"(no heartbeat for {age:.0f} s, timeout {self.timeout:.0f} s): it has died",
                file=sys.stderr,
                flush=True,
            )
            return
        raise UserError(
            f"job {held['job']} (host {held.get('host')}, heartbeat {max(age, 0):.0f} s ago) "
            f"is running on cluster storage {self.store.uri(self.path.parent)}: stop it first "
            f"(`{held.get('stop', 'ray job stop ' + str(held['job']))}`) or wait for it to end; "
            f"a lease without a heartbeat for {self.timeout:.0f} s is taken over"
        )

    def acquire(self) -> None:
        """Take the lease; UserError if another live job holds it (or wins the race to it)."""
        self._refuse_if_held(self.read())
        now = time.time()
        self.record = {
            "job": self.job,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_started": _process_start(os.getpid()),
            "stop": self.stop_hint,
            "started": now,
        }
        self._write()
        time.sleep(SETTLE_S)
        held = self.read()
        if held is None or held.get("job") != self.job:
            self._refuse_if_held(held or {"job": "?", "heartbeat": now})
            raise UserError(f"the lease {self.store.uri(self.path)} vanished while taking it")

    def renew(self) -> bool:
        """Rewrite the heartbeat; False (and nothing written) when another job holds it now."""
        held = self.read()
        if held is not None and held.get("job") != self.job:
            return False
        self._write()
        return True

    def release(self) -> None:
        """Remove the lease if it is still this job's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(Exception):  # a storage outage: the lease times out instead
            held = self.read()
            if held is not None and held.get("job") == self.job:
                self.store.remove(self.path)

    def start_heartbeat(self) -> None:
        """Renew every ``heartbeat_s`` in a daemon thread; call ``on_lost`` if taken over."""

        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    if not self.renew():
                        self.on_lost(self.read() or {})
                        return
                except Exception as e:  # storage outage: retry at the next beat
                    print(f"warning: lease heartbeat failed: {e}", file=sys.stderr, flush=True)

        self._thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
        self._thread.start()


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None if there is none."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _ended_here(held: dict[str, Any]) -> bool:
    """Whether the lease's holder ran on this host and its process is gone: a stopped or
    SIGKILLed job (``ray job stop`` SIGKILLs after its wait; drivers of Ray jobs all run on the
    head), so a resubmission need not wait for the timeout. A reused pid does not count as
    alive (its start time differs)."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    started = _process_start(held["pid"])
    return started is None or started != held.get("pid_started")


def stop_self(held: dict[str, Any]) -> None:
    """This job lost its lease to ``held``'s job: one error line, then SIGTERM to itself (the
    stage running is stopped the usual way; the finished ones are in storage)."""
    print(
        f"error: job {held.get('job')} took over the cluster-storage lease (this job's heartbeat "
        "was older than the timeout); stopping this job",
        file=sys.stderr,
        flush=True,
    )
    os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def job_lease(store: Store | None, scale: str) -> Iterator[Lease | None]:
    """Hold the lease of ``store``/``scale`` for the block (nothing without storage)."""
    if store is None:
        yield None
        return
    lease = Lease(store, scale)
    lease.acquire()
    lease.start_heartbeat()
    try:
        yield lease
    finally:
        lease.release()
