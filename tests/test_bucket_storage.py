"""Cluster storage in a bucket: a real S3 server on 127.0.0.1 (moto, tests/moto_s3.py).

The storage layer's operations on a folder and on s3:// (the same test), the prepared data a
rank downloads into its node-local cache (a tampered file refused), finished blocks uploaded
and found again by a resubmitted driver, the DVC state round trip, and the bad-input lines.
The tiny pipeline with s3:// storage and its resubmission: test_bucket_pipeline.py (slow).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cluster import durable, storage
from pipeline.cluster.storage_fs import Store
from pipeline.config import load_config
from pipeline.errors import ConfigError, DataError, UserError

sys.path.insert(0, str(Path(__file__).parent))
from moto_s3 import endpoint_fixture, list_keys, s3_env
from repo_copy import PARAMS, write_tree

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "ddpm-test"


endpoint = endpoint_fixture(BUCKET)


@pytest.fixture
def s3(endpoint, monkeypatch):
    for key, value in s3_env(endpoint).items():
        monkeypatch.setenv(key, value)
    return endpoint


@pytest.fixture(params=["folder", "s3"])
def store(request, tmp_path):
    if request.param == "folder":
        return Store.parse(str(tmp_path / "shared"))
    request.getfixturevalue("s3")
    return Store.parse(f"s3://{BUCKET}/{request.node.name.split('[')[0]}-{time.time_ns()}")


def test_the_layer_on_a_folder_and_a_bucket(store, tmp_path):
    store.check_writable()
    assert store.list() == []  # the write check leaves nothing behind
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("A")
    (src / "sub" / "b.bin").write_bytes(bytes(range(256)) * 4)
    assert store.put_dir(src, "d") == 1 + 1024
    assert store.list("d") == ["a.txt", "sub/b.bin"] and store.list("nothing") == []
    assert store.exists("d/a.txt") and store.exists("d") and not store.exists("d/c.txt")
    assert store.get_dir("d", tmp_path / "back") == ["a.txt", "sub/b.bin"]
    assert (tmp_path / "back" / "sub" / "b.bin").read_bytes() == bytes(range(256)) * 4
    store.write_text("r/x.json", '{"k": 1}')
    store.write_text("r/x.json", '{"k": 2}')  # replaced whole
    assert json.loads(store.read_text("r/x.json")) == {"k": 2}
    with pytest.raises(FileNotFoundError):
        store.read_text("r/none.json")
    store.put_file(src / "a.txt", "one/two/a.txt")
    store.get_file("one/two/a.txt", tmp_path / "got" / "a.txt")
    assert (tmp_path / "got" / "a.txt").read_text() == "A"
    assert not [p for p in (tmp_path / "got").iterdir() if p.name != "a.txt"]  # no temp left
    path, fs = store.ray_storage("checkpoints/v")
    assert path.endswith("checkpoints/v")
    if store.is_local:
        assert fs is None and Path(path) == store.local_path("checkpoints/v")
    else:  # pyarrow's S3 filesystem (what Ray Train writes with) sees the same objects
        assert fs.get_file_info(path.replace("checkpoints/v", "r/x.json")).size == 8
        assert store.dvc_remote_options() == {"endpointurl": os.environ["AWS_ENDPOINT_URL"]}


def _prepared(folder: Path) -> Path:
    folder.mkdir(parents=True)
    data = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    np.save(folder / "train.npy", data)
    sha = hashlib.sha256((folder / "train.npy").read_bytes()).hexdigest()
    manifest = {"splits": {"train": {"files": [{"path": "train.npy", "count": 2, "sha256": sha}]}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_prepared_data_reaches_a_node_local_cache_checked(s3, tmp_path, monkeypatch):
    cfg = load_config(PARAMS, "tiny")
    monkeypatch.setenv(storage.ENV, f"s3://{BUCKET}/data-test")
    monkeypatch.setenv(storage.NODE_CACHE_ENV, str(tmp_path / "node"))
    local = _prepared(tmp_path / "project" / "data" / "tiny")
    uri = storage.shared_data(cfg, local)
    assert uri.startswith(f"s3://{BUCKET}/data-test/data/tiny-")
    keys = list_keys(s3, BUCKET, "data-test/data/")
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == ["manifest.json", "train.npy"]
    cached = storage.node_local_data(uri)
    assert cached == tmp_path / "node" / uri.rsplit("/", 1)[1]
    np.testing.assert_array_equal(np.load(cached / "train.npy"), np.load(local / "train.npy"))
    assert storage.node_local_data(uri) == cached  # downloaded once per node
    left = sorted(p.name for p in (tmp_path / "node").iterdir())
    assert left == sorted([cached.name, f".{cached.name}.lock"])  # no temp left
    Store(uri).write_text("train.npy", "tampered")  # a file changed in the bucket
    monkeypatch.setenv(storage.NODE_CACHE_ENV, str(tmp_path / "other-node"))
    with pytest.raises(DataError, match="sha256 differs"):
        storage.node_local_data(uri)
    kept = [p.name for p in (tmp_path / "other-node").iterdir()]
    assert kept == [f".{cached.name}.lock"]  # nothing half-checked is kept


def test_finished_blocks_are_uploaded_and_reused_by_a_resubmitted_driver(s3, tmp_path, monkeypatch):
    cfg = load_config(PARAMS, "tiny")
    monkeypatch.setenv(storage.ENV, f"s3://{BUCKET}/blocks-test")
    monkeypatch.setattr(storage, "SYNC_EVERY_S", 0.1)
    first = storage.shared_path(cfg, tmp_path / "job1", Path("work/sample/v")) / "key"
    assert first.is_relative_to(tmp_path / "job1" / storage.MIRROR)
    pointer = tmp_path / "job1" / "work" / "sample" / "v" / storage.POINTER
    assert pointer.read_text().strip() == f"s3://{BUCKET}/blocks-test/work/sample/v"
    with (
        pytest.raises(RuntimeError, match="stopped"),  # a job that fails after one block
        storage.synced(cfg, tmp_path / "job1", first, ("block-*.npz",)),
    ):
        first.mkdir(parents=True)
        np.savez(first / "block-00000000-00000002.npz", x=np.arange(2))
        deadline = time.monotonic() + 10
        while not list_keys(s3, BUCKET, "blocks-test/work/") and time.monotonic() < deadline:
            time.sleep(0.05)  # uploaded while the job still runs
        assert list_keys(s3, BUCKET, "blocks-test/work/")
        np.savez(first / "block-00000002-00000004.npz", x=np.arange(2, 4))
        (first / "merged-4.npz").write_bytes(b"not a block")
        raise RuntimeError("stopped")
    keys = list_keys(s3, BUCKET, "blocks-test/work/sample/v/key/")
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == [
        "block-00000000-00000002.npz",
        "block-00000002-00000004.npz",
    ]  # the second block too (uploaded on exit), the merged file not
    again = storage.shared_path(cfg, tmp_path / "job2", Path("work/sample/v")) / "key"
    with storage.synced(cfg, tmp_path / "job2", again, ("block-*.npz",)):
        assert sorted(p.name for p in again.iterdir()) == sorted(k.rsplit("/", 1)[1] for k in keys)
        np.testing.assert_array_equal(
            np.load(again / "block-00000002-00000004.npz")["x"], np.arange(2, 4)
        )


def test_state_round_trip_through_a_bucket(s3, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.NODE_CACHE_ENV, str(tmp_path / "node"))
    project, again = tmp_path / "p", tmp_path / "q"
    (project / "metrics").mkdir(parents=True)
    (project / "dvc.lock").write_text("schema: '2.0'\n")
    (project / "metrics" / "v.json").write_text("{}")
    (project / "work" / "fid").mkdir(parents=True)
    torch.save({"mu": np.zeros(2)}, project / "work" / "fid" / "good.pt")
    torch.save({"x": print}, project / "work" / "fid" / "bad.pt")  # not weights-only
    store, rel = Store.parse(f"s3://{BUCKET}/state-test"), Path("state") / "tiny"
    assert durable.save_state(project, store, rel) > 0
    assert durable.save_state(project, store, rel) == 0  # unchanged: not uploaded again
    again.mkdir()
    assert durable.restore_state(store, rel, again)
    assert (again / "dvc.lock").read_text() == "schema: '2.0'\n"
    assert (again / "work" / "fid" / "good.pt").is_file()
    assert not (again / "work" / "fid" / "bad.pt").exists()
    assert [p.name for p in again.iterdir() if p.name.startswith(".")] == []  # temp removed
    assert not durable.restore_state(store, Path("state") / "other", again)
    _prepared(project / "data" / "tiny")  # uncached by DVC: stored once, restored by record
    durable.save_data(project, store, rel, "tiny")
    durable.restore_data(store, rel, again, "tiny")
    for name in ("manifest.json", "train.npy"):
        assert (again / "data" / "tiny" / name).read_bytes() == (
            project / "data" / "tiny" / name
        ).read_bytes()


def test_bad_bucket_settings_are_one_line_before_any_work(s3, tmp_path, monkeypatch):
    cfg = load_config(PARAMS, "tiny")
    cases = [
        ("ftp://host/x", ConfigError, "unknown scheme ftp://"),
        ("s3://", ConfigError, "no bucket name"),
        ("gs://bucket/x", UserError, r"pip install 'ddpm-repro\[gs\]'"),  # gcsfs not installed
        (f"s3://no-such-{BUCKET}/x", UserError, "not writable: .*bucket does not exist"),
    ]
    for value, error, match in cases:
        monkeypatch.setenv(storage.ENV, value)
        with pytest.raises(error, match=match):
            storage.check_storage(cfg)
    monkeypatch.setenv(storage.ENV, f"s3://{BUCKET}/x")
    paper = load_config(PARAMS, "paper")
    assert paper.train.eval_every > 0  # evaluation during training works with a bucket too
    assert storage.check_storage(paper).url == f"s3://{BUCKET}/x"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv(storage.ENV, f"s3://{BUCKET}/x")
    start = time.monotonic()
    with pytest.raises(UserError, match=r"127\.0\.0\.1:9\).*not writable.*connect"):
        storage.check_storage(cfg)
    assert time.monotonic() - start < 20  # no long retry loop


def test_a_missing_bucket_stops_the_repro_with_one_error_line(s3, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(durable.RAY_JOB_ENV)}
    env.update({storage.ENV: f"s3://no-such-{BUCKET}/x", "PYTHONPATH": str(ROOT)})
    run = subprocess.run(
        [sys.executable, "-m", "stages.repro"],
        cwd=write_tree(tmp_path / "repo"),
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and run.stdout == "", run.stderr
    assert run.stderr.startswith(f"error: cluster storage s3://no-such-{BUCKET}/x")
    assert run.stderr.count("\n") == 1


def test_a_push_the_bucket_rejects_is_one_line_and_keeps_the_outputs(s3, tmp_path, monkeypatch):
    """A real ``dvc push`` to s3:// (through dvc-s3) of a bucket that does not exist."""
    from stages.repro import dvc

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    store = Store.parse(f"s3://no-such-{BUCKET}/x")
    dvc("init", "--no-scm", "-q")
    (tmp_path / "out.txt").write_text("finished work")
    dvc("add", "-q", "out.txt")
    dvc("remote", "add", "--local", "--default", durable.REMOTE, storage.dvc_remote(store))
    for option, value in store.dvc_remote_options().items():
        dvc("remote", "modify", "--local", durable.REMOTE, option, value)
    with pytest.raises(UserError, match=f"push of the outputs to s3://no-such-{BUCKET}/x/dvc"):
        durable.push(dvc, store, None)
    assert (tmp_path / "out.txt").read_text() == "finished work"
