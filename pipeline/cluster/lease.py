"""One job per cluster storage and scale: a lease under ``<storage>/state/<scale>/lease/``.

Two jobs on one storage would train the same Ray Train run into the same folder and interleave
their state saves. DVC's repository lock does not prevent it: every edit of the code gives a
Ray job a new working directory. So ``stages.repro`` takes a lease before any work
(:func:`job_lease`), in a folder or a bucket alike (:class:`~pipeline.cluster.storage_fs.Store`).

**Generations.** The lease is a series of small JSON records, one per holder, named by a
generation number: ``lease/000000000007.json``; the newest is the lease::

    {"generation": 7, "job": "raysubmit_...", "host": "head-1", "pid": 4242,
     "pid_started": 1764689990.1, "started": 1764690000.0, "heartbeat": 1764690042.0,
     "released": false, "nonce": "..."}

- **Taken** by creating the next generation's record only if it is absent
  (:meth:`~pipeline.cluster.storage_fs.Store.create_text`: ``link()`` on a folder, S3's
  ``If-None-Match: *``, GCS's ``ifGenerationMatch=0``). Of any number of jobs racing for one
  generation exactly one creates it; the others read the winner's record and stop. A job takes
  the next generation only when the newest is free: released, its heartbeat older than
  :data:`TIMEOUT_S` (the holder died: SIGKILLed, its node lost), or held by a process of this
  host that is gone (``ray job stop`` SIGKILLs after its wait; the drivers of Ray jobs all run on
  the head, so a resubmission need not wait for the timeout). Otherwise it stops at once with
  one ``error:`` line naming the holder and how to stop it (built from the holder's job id, once
  that id is checked to be a plain name).
- **Renewed** by its holder every ``timeout / 8``: the holder rewrites its own generation's
  record and no other, after checking that no newer generation exists, so a renewal can never
  overwrite a take-over.
- **Lost**: a holder that has not renewed for ``timeout / 2`` (:data:`DEADLINE_FRACTION`; a
  storage outage, a stalled mount) stops its own job (:func:`stop_self`, from a watchdog thread
  that does not touch storage), well before another job may take over at ``timeout``; a holder
  that finds a newer generation stops too.
- **Fenced**: every state save (:func:`fence`, in :mod:`pipeline.cluster.durable` and the block
  uploads of :mod:`pipeline.cluster.storage`) first checks that this job's generation is still
  the newest and renewed within the deadline; a stale holder's late save is refused
  (:class:`LeaseLostError`). The check and the save are two requests, so a save that is itself
  delayed past the timeout could still land; the deadline (the holder stops first) is what
  covers that window.
- **Released** when the job ends (finished, failed or stopped by a signal it survives): its
  record is rewritten with ``"released": true`` and the next job takes the next generation.

Clocks are assumed synchronised (NTP) to well within the timeout: a heartbeat's age is the
reader's clock minus the holder's. ``DDPM_LEASE_TIMEOUT_S`` overrides :data:`TIMEOUT_S`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cluster.storage_fs import Store
from pipeline.errors import UserError

LEASE = "lease"
TIMEOUT_ENV = "DDPM_LEASE_TIMEOUT_S"
TIMEOUT_S = 120.0  # a heartbeat older than this: the holder died, the lease is taken over
HEARTBEAT_FRACTION = 1 / 8  # of the timeout: how often the holder renews
DEADLINE_FRACTION = 1 / 2  # of the timeout: no renewal for this long and the holder stops itself
HELD_ENV = "DDPM_LEASE_HELD"  # {store, scale, generation, timeout}: for the holder's stages
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # Ray's job config, in every `ray job submit` driver
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")  # what a job id in a hint may hold
HOST_PID = re.compile(r"(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*):(?P<pid>[0-9]+)")
CREATE_TRIES = 3  # a generation another job released again at once: try the next one


class LeaseLostError(UserError):
    """This job no longer holds the lease: another job took it over, or it was not renewed in
    time. Nothing more may be saved."""


def lease_dir(scale: str) -> Path:
    """The lease's folder of a scale, relative to the storage root."""
    return Path("state") / scale / LEASE


def record_name(generation: int) -> str:
    return f"{generation:012d}.json"


def stop_hint(job: object) -> str | None:
    """How to stop job ``job`` (``ray job stop <id>``, or ``kill <pid> on host <host>`` for a
    job started outside Ray), or None when ``job`` is not a plain id (a record that was
    tampered with: its text is never shown as a command)."""
    if not isinstance(job, str) or not JOB_ID.fullmatch(job):
        return None
    local = HOST_PID.fullmatch(job)
    return f"kill {local['pid']} on host {local['host']}" if local else f"ray job stop {job}"


def this_job() -> str:
    """This job's id: the Ray job's submission id (UserError unless it is a plain name,
    :data:`JOB_ID`), else ``host:pid``."""
    with contextlib.suppress(KeyError, ValueError, TypeError):
        job = json.loads(os.environ[RAY_JOB_ENV])["metadata"]["job_submission_id"]
        if job:
            if not isinstance(job, str) or not JOB_ID.fullmatch(job):
                raise UserError(
                    f"the Ray job's submission id {str(job)[:80]!r} is not a plain name "
                    "(letters, digits, _ . : -, at most 128): submit with another --submission-id"
                )
            return job
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()).strip(".-") or "host"
    return f"{host}:{os.getpid()}"


def timeout_s() -> float:
    """The lease timeout: ``DDPM_LEASE_TIMEOUT_S`` or :data:`TIMEOUT_S`."""
    value = os.environ.get(TIMEOUT_ENV)
    return float(value) if value else TIMEOUT_S


@dataclass(frozen=True)
class Held:
    """The newest lease record: its generation and content."""

    generation: int
    record: dict[str, Any]

    @property
    def job(self) -> Any:
        return self.record.get("job")

    def age(self) -> float:
        """Seconds since its holder's last heartbeat (by this host's clock)."""
        return time.time() - float(self.record.get("heartbeat", 0))


def read_lease(store: Store, scale: str) -> Held | None:
    """The newest generation's record of ``store``/``scale``, or None (no lease yet). A record
    that cannot be read as one (half a file is impossible: records are written whole) counts as
    a record of an unknown job with no heartbeat."""
    folder = lease_dir(scale)
    for _ in range(5):  # a generation removed while listing (a take-over's clean-up): again
        generations = [int(n[:-5]) for n in store.list(folder) if re.fullmatch(r"\d+\.json", n)]
        if not generations:
            return None
        newest = max(generations)
        try:
            text = store.read_text(folder / record_name(newest))
        except FileNotFoundError:
            continue
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            record = {"job": None}
        if not isinstance(record.get("heartbeat"), int | float):
            record["heartbeat"] = 0  # no usable heartbeat: as old as can be
        return Held(newest, record)
    raise UserError(f"the lease {store.shown(folder)} keeps changing while it is read")


class Lease:
    """The lease of ``store``/``scale`` for this job (``job``: its id, default
    :func:`this_job`). ``on_lost(reason)`` is called once when the lease is lost (default
    :func:`stop_self`)."""

    def __init__(
        self,
        store: Store,
        scale: str,
        job: str | None = None,
        timeout: float | None = None,
        on_lost: Callable[[str], None] | None = None,
    ):
        self.store, self.scale, self.folder = store, scale, lease_dir(scale)
        self.job = job or this_job()
        self.timeout = timeout_s() if timeout is None else timeout
        self.heartbeat_s = self.timeout * HEARTBEAT_FRACTION
        self.deadline_s = self.timeout * DEADLINE_FRACTION
        self.on_lost = on_lost or stop_self
        self.generation: int | None = None
        self.record: dict[str, Any] = {}
        self._renewed = 0.0  # time.monotonic() at the start of the last successful renewal
        self._lost: str | None = None
        self._lost_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def read(self) -> Held | None:
        """The newest record (:func:`read_lease`)."""
        return read_lease(self.store, self.scale)

    def _refuse_if_held(self, held: Held | None) -> None:
        """Return if ``held`` is free to take over, else UserError naming its holder."""
        if held is None or held.record.get("released") or held.job == self.job:
            return
        name = held.job if stop_hint(held.job) else "(an id that is not a plain name)"
        if _ended_here(held.record):
            print(
                f"taking over the lease of job {name}: it ran on this host and has ended "
                f"(process {held.record.get('pid')} is gone)",
                file=sys.stderr,
                flush=True,
            )
            return
        age = held.age()
        if age >= self.timeout:
            print(
                f"taking over the lease of job {name} (no heartbeat for {age:.0f} s, timeout "
                f"{self.timeout:.0f} s): it has died",
                file=sys.stderr,
                flush=True,
            )
            return
        hint = stop_hint(held.job)
        how = f"stop it first (`{hint}`)" if hint else "stop it first"
        raise UserError(
            f"job {name} (host {str(held.record.get('host'))[:64]}, heartbeat "
            f"{max(age, 0):.0f} s ago) is running on cluster storage "
            f"{self.store.shown(self.folder.parent)}: {how} or wait for it to end; a lease "
            f"without a heartbeat for {self.timeout:.0f} s is taken over"
        )

    def acquire(self) -> None:
        """Take the lease (the next generation); UserError if another live job holds it or
        wins the race to it."""
        self._drop_old_format()
        for _ in range(CREATE_TRIES):
            held = self.read()
            self._refuse_if_held(held)
            generation = (held.generation if held else 0) + 1
            started, now = time.monotonic(), time.time()
            record = {
                "generation": generation,
                "job": self.job,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "pid_started": _process_start(os.getpid()),
                "started": now,
                "heartbeat": now,
                "released": False,
                "nonce": uuid.uuid4().hex,
            }
            if self.store.create_text(self.folder / record_name(generation), _dump(record)):
                self.generation, self.record, self._renewed = generation, record, started
                self._clean_up(generation)
                return
            # another job created this generation first: its record decides (refused, or it
            # was released already and the next generation is tried)
        raise UserError(f"the lease {self.store.shown(self.folder)} is contended: try again")

    def _drop_old_format(self) -> None:
        """A lease file of the earlier format (one record at ``state/<scale>/lease``, left by a
        job that crashed) in a folder store, where it blocks the lease folder: refused like a
        record while its holder is live, else removed."""
        if not self.store.is_local or not self.store.local_path(self.folder).is_file():
            return
        try:
            record = json.loads(self.store.read_text(self.folder))
        except (FileNotFoundError, ValueError):
            record = None
        if isinstance(record, dict):
            self._refuse_if_held(Held(0, record))
        self.store.remove(self.folder)

    def _clean_up(self, generation: int) -> None:
        """Remove the records of generations before ``generation - 1`` (best effort)."""
        with contextlib.suppress(Exception):
            for name in self.store.list(self.folder):
                if re.fullmatch(r"\d+\.json", name) and int(name[:-5]) < generation - 1:
                    self.store.remove(self.folder / name)

    def _in_time(self, now: float | None = None) -> bool:
        """Whether the last renewal is younger than the deadline (no storage access)."""
        now = time.monotonic() if now is None else now
        return self.generation is not None and now - self._renewed < self.deadline_s

    def renew(self) -> bool:
        """Rewrite this generation's heartbeat; False (nothing written) when the lease is lost:
        a newer generation exists, or the deadline has passed."""
        started, now = time.monotonic(), time.time()
        if self._lost or not self._in_time(started):
            return False
        held = self.read()
        if held is None or held.generation != self.generation:
            return False
        self.record["heartbeat"] = now
        self.store.write_text(self.folder / record_name(self.generation), _dump(self.record))
        self._renewed = started
        return True

    def check(self) -> None:
        """Fencing: LeaseLostError unless this job still holds the lease (renewed within the
        deadline and its generation the newest)."""
        if self.generation is None:
            raise LeaseLostError(
                f"this job does not hold the lease {self.store.shown(self.folder)}"
            )
        if self._lost or not self._in_time():
            raise LeaseLostError(self._lost or self._late())
        held = self.read()
        if held is None or held.generation != self.generation:
            raise LeaseLostError(self._taken(held))

    def _late(self) -> str:
        return (
            f"the cluster-storage lease was not renewed for {self.deadline_s:.0f} s (storage "
            f"unreachable?); this job stops before another may take it over "
            f"({self.timeout:.0f} s)"
        )

    def _taken(self, held: Held | None) -> str:
        name = held.job if held is not None and stop_hint(held.job) else "another job"
        return f"job {name} took over the cluster-storage lease; this job stops"

    def release(self) -> None:
        """Mark this generation released if it is still the newest (a later holder's record is
        never touched); stop the heartbeat."""
        self._stop.set()
        for thread in self._threads:  # a renewal hung in a stalled storage call: not waited for
            if thread is not threading.current_thread():
                thread.join(timeout=self.heartbeat_s)
        if self.generation is None or self._lost:
            return
        with contextlib.suppress(Exception):  # a storage outage: the lease times out instead
            held = self.read()
            if held is not None and held.generation == self.generation:
                self.record["released"] = True
                self.store.write_text(
                    self.folder / record_name(self.generation), _dump(self.record)
                )

    def _lose(self, reason: str) -> None:
        """Call ``on_lost`` once."""
        with self._lost_lock:
            if self._lost:
                return
            self._lost = reason
        self.on_lost(reason)

    def start_heartbeat(self) -> None:
        """Renew every ``heartbeat_s`` in a daemon thread, and watch the deadline in another
        (which never touches storage, so a stalled storage call cannot hold it up); call
        ``on_lost`` once when the lease is lost."""
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    if self.renew():
                        continue
                    if not self._in_time():
                        return  # the watchdog reports it
                    self._lose(self._taken(self.read()))
                    return
                except Exception as e:  # storage outage: retry at the next beat
                    print(f"warning: lease heartbeat failed: {e}", file=sys.stderr, flush=True)

        def watch() -> None:
            while not self._lost:
                left = self._renewed + self.deadline_s - time.monotonic()
                if left <= 0:
                    self._lose(self._late())
                    return
                if self._stop.wait(left):
                    return

        self._threads = [
            threading.Thread(target=beat, name="lease-heartbeat", daemon=True),
            threading.Thread(target=watch, name="lease-deadline", daemon=True),
        ]
        for thread in self._threads:
            thread.start()


def _dump(record: dict[str, Any]) -> str:
    return json.dumps(record) + "\n"


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


def stop_self(reason: str) -> None:
    """This job lost its lease: one error line, then SIGTERM to itself (the stage running is
    stopped the usual way; the finished ones are in storage)."""
    print(f"error: {reason}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


_HELD: dict[tuple[str, str], Lease] = {}  # the leases this process holds: (store url, scale)


def fence(store: Store, scale: str) -> None:
    """Before a state save: LeaseLostError unless this job still holds the lease of ``store``/
    ``scale``. In the process holding it, :meth:`Lease.check`; in a stage process the holder
    started (:data:`HELD_ENV` names its generation), the newest generation must be that one,
    not released and renewed within the deadline (by this host's clock). Without a lease (no
    ``stages.repro`` around this process) there is nothing to check."""
    lease = _HELD.get((store.url, scale))
    if lease is not None:
        lease.check()
        return
    with contextlib.suppress(KeyError, ValueError, TypeError):
        held_env = json.loads(os.environ[HELD_ENV])
        if held_env["store"] == store.url and held_env["scale"] == scale:
            generation = int(held_env["generation"])
            held = read_lease(store, scale)
            if held is None or held.generation != generation or held.record.get("released"):
                name = held.job if held is not None and stop_hint(held.job) else "another job"
                raise LeaseLostError(f"job {name} took over the cluster-storage lease; not saved")
            deadline = float(held_env.get("timeout", timeout_s())) * DEADLINE_FRACTION
            if held.age() >= deadline:
                raise LeaseLostError(
                    f"the cluster-storage lease was not renewed for {held.age():.0f} s; not saved"
                )


@contextlib.contextmanager
def job_lease(store: Store | None, scale: str) -> Iterator[Lease | None]:
    """Hold the lease of ``store``/``scale`` for the block (nothing without storage); the
    stages started in it find its generation in :data:`HELD_ENV`."""
    if store is None:
        yield None
        return
    lease = Lease(store, scale)
    lease.acquire()
    lease.start_heartbeat()
    key = (store.url, scale)
    _HELD[key] = lease
    saved = os.environ.get(HELD_ENV)
    os.environ[HELD_ENV] = json.dumps(
        {
            "store": store.url,
            "scale": scale,
            "generation": lease.generation,
            "timeout": lease.timeout,
        }
    )
    try:
        yield lease
    finally:
        if saved is None:
            os.environ.pop(HELD_ENV, None)
        else:
            os.environ[HELD_ENV] = saved
        _HELD.pop(key, None)
        lease.release()
