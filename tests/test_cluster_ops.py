"""Cluster operations that must not go wrong (issue 25), without a cluster.

The storage lease (one job per storage and scale: refused while held, kept alive by its
heartbeat, taken over when stale, released at the end), on a folder and on s3:// (a moto
server); one download of the prepared data per node; dvc.lock saved last; several Ray nodes
without storage refused before any work; a stop under ``ray job stop`` fitting Ray's grace and
reported as a stop, not as a remote failure.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.cluster import durable, lease, raycluster, stopping, storage
from pipeline.cluster.lease import Lease, job_lease
from pipeline.cluster.storage_fs import Store
from pipeline.config import load_config
from pipeline.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))
from moto_s3 import endpoint_fixture, folder_or_bucket, s3_env
from repo_copy import PARAMS

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "ddpm-ops"
A, B = "raysubmit_A", "raysubmit_B"


def wait_until(condition, what: str, timeout: float = 30) -> None:
    """Poll ``condition`` until it is true; fail after ``timeout`` seconds (no fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


endpoint = endpoint_fixture(BUCKET)


@pytest.fixture(params=["folder", "s3"])
def store(request, tmp_path, monkeypatch):
    return folder_or_bucket(request, tmp_path, monkeypatch, BUCKET)


def plant(store: Store, generation: int, record: dict) -> None:
    """A lease record written as its holder would have."""
    store.write_text(lease.lease_dir("tiny") / lease.record_name(generation), json.dumps(record))


def test_a_second_job_is_refused_while_the_first_holds_the_lease(store):
    first = Lease(store, "tiny", job=A, timeout=60)
    first.acquire()
    assert store.exists("state/tiny/lease/000000000001.json") and first.generation == 1
    second = Lease(store, "tiny", job=B, timeout=60)
    with pytest.raises(UserError) as refused:
        second.acquire()
    text = str(refused.value)
    assert "\n" not in text and "raysubmit_A" in text and "`ray job stop raysubmit_A`" in text
    assert first.read().job == A and first.read().generation == 1  # the refused job wrote nothing
    Lease(store, "paper", job=B, timeout=60).acquire()  # another scale: its own lease
    first.release()
    assert first.read().record["released"]
    second.acquire()  # released: the next job takes the next generation
    assert second.read().job == B and second.generation == 2


def test_a_stale_lease_is_taken_over_and_its_holder_stops(store):
    lost: list[str] = []
    T = 2.0  # renewed every 0.25 s, within its deadline of 1 s on a busy moto)
    first = Lease(store, "tiny", job=A, timeout=T, on_lost=lost.append)
    first.acquire()
    first.start_heartbeat()  # every T/8: the lease stays fresh past its timeout
    started = first.record["started"]
    wait_until(lambda: first.read().record["heartbeat"] > started + T, "a heartbeat past T")
    with pytest.raises(UserError, match="raysubmit_A"):
        Lease(store, "tiny", job=B, timeout=T).acquire()
    assert not lost
    first._stop.set()  # the holder dies (no more heartbeat) ...
    for thread in first._threads:
        thread.join()
    wait_until(lambda: first.read().age() > T, "the lease gone stale")
    second = Lease(store, "tiny", job=B, timeout=T)
    second.acquire()
    assert second.read().job == B and second.generation == 2
    first._renewed = time.monotonic()  # a holder that was only stalled: its next heartbeat
    first.start_heartbeat()  # finds generation 2 and stops
    wait_until(lambda: lost, "the stalled holder told it lost the lease")
    assert "job raysubmit_B took over" in lost[0]
    assert second.read().job == B  # the stalled job did not overwrite it
    first.release()  # not its lease any more: left alone
    assert second.read().job == B and not second.read().record["released"]


def test_a_lease_of_an_ended_job_on_this_host_is_taken_over_at_once(store, capsys):
    """``ray job stop`` SIGKILLs a job after its wait, maybe before it released its lease: its
    driver ran on this host (the head) and its process is gone, so the resubmission takes the
    lease at once, heartbeat fresh or not."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    now = time.time()
    plant(store, 1, {"job": A, "host": socket.gethostname(), "pid": gone.pid, "heartbeat": now})
    second = Lease(store, "tiny", job=B, timeout=60)
    second.acquire()
    assert second.read().job == B and second.generation == 2
    assert f"process {gone.pid} is gone" in capsys.readouterr().err
    plant(store, 3, {"job": A, "host": "other-host", "pid": gone.pid, "heartbeat": now})
    with pytest.raises(UserError, match="raysubmit_A"):  # a live job on another host: refused
        Lease(store, "tiny", job=B + "2", timeout=60).acquire()


def test_the_lease_is_released_when_the_job_ends_or_fails(store, monkeypatch):
    monkeypatch.setenv(lease.RAY_JOB_ENV, json.dumps({"metadata": {"job_submission_id": "j1"}}))
    with job_lease(store, "tiny") as held:
        assert held.read().job == "j1" and not held.read().record["released"]
        assert json.loads(os.environ[lease.HELD_ENV])["generation"] == 1
    assert held.read().record["released"] and lease.HELD_ENV not in os.environ
    with pytest.raises(UserError, match="a stage failed"), job_lease(store, "tiny"):
        raise UserError("a stage failed")
    assert lease.read_lease(store, "tiny").record["released"]
    with job_lease(None, "tiny") as nothing:  # no storage: no lease
        assert nothing is None


def test_stages_repro_stops_at_once_when_another_job_holds_the_storage(tmp_path):
    """``python -m stages.repro`` with storage another live job holds: one error line, exit 2,
    before any work (no dvc command ran: the working folder is not even a DVC project)."""
    shared = tmp_path / "shared"
    Lease(Store(str(shared)), "tiny", job=A, timeout=60).acquire()
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(PARAMS.read_text())
    env = {**os.environ, "PYTHONPATH": str(ROOT), storage.ENV: str(shared)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "stages.repro", "--scale", "tiny"],
        cwd=work, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: job raysubmit_A"), done.stderr
    assert "ray job stop raysubmit_A" in lines[0]
    assert not (work / ".dvc").exists()


def test_one_download_of_the_prepared_data_per_node(endpoint, tmp_path, monkeypatch):
    """Four ranks of one node ask for the bucket's data at once: one downloads, the others
    wait for it and map the same copy."""
    for key, value in s3_env(endpoint).items():
        monkeypatch.setenv(key, value)
    local = tmp_path / "project" / "data" / "tiny"
    local.mkdir(parents=True)
    arr = np.arange(48, dtype=np.uint8).reshape(1, 4, 4, 3)
    np.save(local / "train.npy", arr)
    sha = storage._sha256(local / "train.npy")
    (local / "manifest.json").write_text(
        json.dumps({"train": {"path": "train.npy", "sha256": sha}})
    )
    uri = storage.store_data(Store.parse(f"s3://{BUCKET}/node-{time.time_ns()}"), local)
    monkeypatch.setenv(storage.NODE_CACHE_ENV, str(tmp_path / "node"))
    downloads: list[int] = []
    get_dir = Store.get_dir

    def slow_get_dir(self, rel, dest):
        downloads.append(1)
        lock = next((tmp_path / "node").glob(".*.lock"))
        wait_until(lambda: blocked_on(lock) == 3, "the other ranks waiting for the download")
        return get_dir(self, rel, dest)

    monkeypatch.setattr(Store, "get_dir", slow_get_dir)
    got: list[Path] = []
    ranks = [
        threading.Thread(target=lambda: got.append(storage.node_local_data(uri))) for _ in range(4)
    ]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join()
    assert len(got) == 4 and len(set(got)) == 1 and len(downloads) == 1
    np.testing.assert_array_equal(np.load(got[0] / "train.npy"), arr)
    left = sorted(p.name for p in (tmp_path / "node").iterdir())
    assert left == sorted([got[0].name, f".{got[0].name}.lock"])  # no temporary folder


def blocked_on(lock: Path) -> int:
    """How many flock()s of this process wait for ``lock`` (Linux's /proc/locks: ``->``)."""
    me, inode = f" {os.getpid()} ", f":{lock.stat().st_ino} "
    lines = Path("/proc/locks").read_text().splitlines()
    return sum("-> FLOCK" in line and me in line and inode in line for line in lines)


def test_dvc_lock_is_saved_last(tmp_path, monkeypatch):
    """A save cut short must never leave a new dvc.lock beside old outputs."""
    project = tmp_path / "project"
    for rel in ("dvc.lock", "metrics/a.json", "plots/b.csv", "work/x/y.txt"):
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text(rel)
    order: list[str] = []
    copy = durable.copy_file_atomic
    monkeypatch.setattr(
        durable, "copy_file_atomic", lambda s, t: (order.append(s.name), copy(s, t))
    )
    store = Store(str(tmp_path / "shared"))
    durable.save_state(project, store, Path("state/tiny"))
    assert len(order) == 4 and order[-1] == "dvc.lock", order


def test_several_ray_nodes_without_storage_is_one_line_before_any_work(monkeypatch):
    cfg = load_config(PARAMS, "tiny")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setattr(raycluster, "alive_nodes", lambda _cfg: 3)
    with pytest.raises(UserError) as refused:
        raycluster.check_single_node(cfg.ray, has_storage=False)
    assert "3 alive nodes and no cluster storage" in str(refused.value)
    assert "\n" not in str(refused.value)
    raycluster.check_single_node(cfg.ray, has_storage=True)  # with storage: fine
    monkeypatch.setattr(raycluster, "alive_nodes", lambda _cfg: 1)
    raycluster.check_single_node(cfg.ray, has_storage=False)  # one node: fine


def test_alive_nodes_counts_a_real_local_cluster(ray_session):
    from pipeline.config import RayConfig

    assert raycluster.alive_nodes(RayConfig(address="auto")) == 1  # joined, not disconnected
    assert ray_session.is_initialized()


def test_a_stop_under_ray_fits_its_grace_and_is_not_a_remote_failure(tmp_path, monkeypatch):
    """As a Ray job, ``ray job stop`` SIGKILLs after RAY_JOB_STOP_WAIT_TIME_S: a stage that
    ignores the stop is SIGKILLed by the driver within that wait (not after 20 s), and a
    ``dvc push`` cut by the stop ends as "stopped" (exit 143), not as "fix the remote"."""
    import signal

    from stages import repro

    monkeypatch.setenv(stopping.RAY_JOB_ENV, "{}")
    monkeypatch.setenv(stopping.WAIT_ENV, "5")
    assert stopping.stop_grace_s(20.0) == 3.0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ready = tmp_path / "ready"  # the stage ignores SIGTERM from here on
    stubborn = (
        "import pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)"
    )
    (bin_dir / "dvc").write_text(
        f"#!{sys.executable}\nimport subprocess, sys\n"
        f"sys.exit(subprocess.call([sys.executable, '-c', {stubborn!r}]))\n"
    )
    (bin_dir / "dvc").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")

    def stop_when_ready() -> None:
        """SIGTERM once the stage ignores it and the driver forwards it (its handler set)."""
        deadline = time.monotonic() + 60
        while not (ready.exists() and signal.getsignal(signal.SIGTERM) is not default):
            if time.monotonic() > deadline:
                return  # no stop: push() then fails, not Stopped
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    default = signal.getsignal(signal.SIGTERM)

    threading.Thread(target=stop_when_ready, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(stopping.Stopped) as stop:
        durable.push(repro.dvc, Store(str(tmp_path / "shared")), "train@v")
    assert stop.value.code == 143
    assert time.monotonic() - started < 15  # the 3 s grace, not GRACE_S = 20 s


def test_a_short_ray_stop_wait_is_named_at_the_start(monkeypatch, capsys):
    stopping.warn_short_stop_wait()  # not a Ray job: nothing
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(stopping.RAY_JOB_ENV, "{}")
    stopping.warn_short_stop_wait()  # Ray's default 3 s
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SIGKILLs this job 3 s after" in err
    monkeypatch.setenv(stopping.WAIT_ENV, "60")
    stopping.warn_short_stop_wait()
    assert capsys.readouterr().err == ""
