"""Uploads ride out transient errors (issue 36): per-file retries with backoff, the loop going on.

The finished blocks of a stage reach a bucket (a moto server) through ``storage.synced``; a
filesystem wrapper makes one file's uploads fail: N times then succeed (the stage finishes, the
other files were not held up), or always (the stage fails with one line naming that file,
after exactly the allowed attempts, and every other file is uploaded). The backoff is seeded.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.cluster import durable, lease, storage, storage_fs
from pipeline.cluster.retry import Backoff, retrying
from pipeline.cluster.storage_fs import Store
from pipeline.config import load_config
from pipeline.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))
from moto_s3 import endpoint_fixture, list_keys, s3_env

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "ddpm-retries"
ATTEMPTS = 4


endpoint = endpoint_fixture(BUCKET)


class Flaky:
    """An fsspec filesystem whose ``put_file`` of names containing ``victim`` fails ``times``
    times (None: always) with a 503-like error, then goes through; it records what it sent."""

    def __init__(self, fs, victim: str, times: int | None):
        self.fs, self.victim, self.times = fs, victim, times
        self.failed, self.sent = 0, []
        self.lock = threading.Lock()

    def put_file(self, local, remote, **kwargs):
        with self.lock:
            if self.victim in remote and (self.times is None or self.failed < self.times):
                self.failed += 1
                raise OSError(5, "503 Slow Down (injected)")
        self.fs.put_file(local, remote, **kwargs)
        with self.lock:
            self.sent.append(remote.rsplit("/", 1)[1])

    def __getattr__(self, name):
        return getattr(self.fs, name)


@pytest.fixture
def flaky_bucket(endpoint, monkeypatch):
    """(install, prefix, endpoint): ``install(victim, times)`` puts a Flaky filesystem under
    every Store."""
    for key, value in s3_env(endpoint).items():
        monkeypatch.setenv(key, value)
    prefix = f"retries-{time.time_ns()}"
    monkeypatch.setenv(storage.ENV, f"s3://{BUCKET}/{prefix}")
    monkeypatch.setattr(storage, "SYNC_EVERY_S", 0.05)
    backoff = Backoff(base_s=0.02, cap_s=0.1, attempts=ATTEMPTS, rng=random.Random(0))
    monkeypatch.setattr(storage, "UPLOAD_BACKOFF", backoff)
    real = storage_fs._filesystem

    def install(victim: str, times: int | None) -> Flaky:
        flaky = Flaky(real("s3", endpoint), victim, times)
        monkeypatch.setattr(storage_fs, "_filesystem", lambda scheme, endpoint: flaky)
        return flaky

    return install, prefix, endpoint


def run_stage(tmp_path: Path, blocks: int) -> Path:
    """A stage writing ``blocks`` block files into a synced bucket folder: all but the last at
    once, the last after a while (a later block: the loop still uploads)."""
    cfg = load_config(ROOT / "params.yaml", "tiny")
    folder = storage.shared_path(cfg, tmp_path / "job", Path("work/sample/v")) / "key"
    with storage.synced(cfg, tmp_path / "job", folder, ("block-*.npz",)):
        folder.mkdir(parents=True)
        for i in range(blocks):
            if i == blocks - 1:
                time.sleep(0.2)  # a block's work: a few rounds of the upload loop
            np.savez(folder / f"block-{i}.npz", x=np.arange(i + 1))
    return folder


def test_a_file_failing_a_few_times_is_retried_and_the_others_go_on(flaky_bucket, tmp_path):
    install, prefix, endpoint = flaky_bucket
    flaky = install("block-1", times=ATTEMPTS - 1)  # the last allowed attempt goes through
    run_stage(tmp_path, blocks=4)
    keys = list_keys(endpoint, BUCKET, f"{prefix}/work/")
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == [f"block-{i}.npz" for i in range(4)]
    assert flaky.failed == ATTEMPTS - 1
    assert flaky.sent.count("block-1.npz") == 1
    assert flaky.sent.index("block-2.npz") < flaky.sent.index("block-1.npz")  # not held up
    assert "block-3.npz" in flaky.sent


def test_a_file_that_always_fails_fails_the_stage_after_the_last_attempt(flaky_bucket, tmp_path):
    install, prefix, endpoint = flaky_bucket
    flaky = install("block-1", times=None)
    with pytest.raises(UserError) as failed:
        run_stage(tmp_path, blocks=4)
    text = str(failed.value)
    assert "\n" not in text and "block-1.npz" in text and f"failed {ATTEMPTS} times" in text
    assert "503 Slow Down" in text
    assert flaky.failed == ATTEMPTS  # exactly the attempts allowed, then given up
    keys = list_keys(endpoint, BUCKET, f"{prefix}/work/")
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == [
        "block-0.npz",
        "block-2.npz",
        "block-3.npz",
    ]


def test_uploads_stop_when_the_lease_is_lost(flaky_bucket, tmp_path, monkeypatch):
    install, prefix, _endpoint = flaky_bucket
    flaky = install("nothing", times=0)
    store = Store.parse(f"s3://{BUCKET}/{prefix}")
    store.write_text("state/tiny/lease/000000000002.json", '{"job": "raysubmit_B"}')
    held = {"store": store.url, "scale": "tiny", "generation": 1, "timeout": 60}
    monkeypatch.setenv(lease.HELD_ENV, json.dumps(held))
    with pytest.raises(lease.LeaseLostError, match="raysubmit_B took over"):
        run_stage(tmp_path, blocks=2)
    assert flaky.sent == []


def test_backoff_is_exponential_capped_and_jittered():
    backoff = Backoff(base_s=0.5, cap_s=30.0, attempts=8, rng=random.Random(7))
    reference = random.Random(7)
    for failures in range(1, 12):
        step = min(30.0, 0.5 * 2.0 ** (failures - 1))
        expected = step / 2 + reference.uniform(0, step / 2)
        assert backoff.delay(failures) == pytest.approx(expected, rel=1e-12)
        assert step / 2 <= expected <= step
    assert not backoff.gives_up(7) and backoff.gives_up(8)


def test_a_state_save_is_retried(flaky_bucket, tmp_path, monkeypatch):
    install, prefix, _endpoint = flaky_bucket
    flaky = install("dvc.lock", times=2)
    monkeypatch.setattr(durable, "SAVE_BACKOFF", Backoff(0.01, 0.02, 4, random.Random(1)))
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "dvc.lock").write_text("schema: '2.0'\n")
    store = Store.parse(f"s3://{BUCKET}/{prefix}")
    assert durable.save_state(tmp_path / "p", store, Path("state/tiny")) > 0
    assert flaky.failed == 2 and store.read_text("state/tiny/dvc.lock") == "schema: '2.0'\n"
    calls: list[int] = []
    waits: list[float] = []

    def always() -> None:
        calls.append(1)
        raise OSError(5, "injected")

    with pytest.raises(OSError, match="injected"):
        retrying(always, "a save", Backoff(1, 2, 3, random.Random(0)), sleep=waits.append)
    assert len(calls) == 3 and len(waits) == 2  # three calls in all, two waits between them
    assert 0.5 <= waits[0] <= 1 and 1 <= waits[1] <= 2
