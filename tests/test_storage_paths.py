"""Cluster storage cannot write outside its folders (issue 36): planted keys and links.

Anyone with access to the bucket (or the shared folder) can plant a key such as
``state/<scale>/work/../../../x`` or a link leading out of the folder. A restore, a download of
finished blocks or a state save must then copy nothing outside the folder it writes to: the
key is left out (one warning line) or refused, never followed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from pipeline.cluster import durable
from pipeline.cluster.storage_fs import Store, UnsafePathError, inside, safe_rel

sys.path.insert(0, str(Path(__file__).parent))
from moto_s3 import endpoint_fixture, s3_env

BUCKET = "ddpm-paths"


endpoint = endpoint_fixture(BUCKET)


def files_under(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_keys_must_be_relative_without_dotdot(tmp_path):
    for good in ("", ".", "a", "state/tiny/work/x.npz"):
        safe_rel(good)
    bad_keys = ("/etc/passwd", "..", "a/../b", "state/tiny/work/../../../x", "a/..", "//x", "a//b")
    for bad in (*bad_keys, "a/./b", "a/"):
        with pytest.raises(UnsafePathError, match="refused"):
            safe_rel(bad)
    store = Store(str(tmp_path / "shared"))
    with pytest.raises(UnsafePathError):
        store.uri("../outside")
    with pytest.raises(UnsafePathError):
        store.local_path("/etc/passwd")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafePathError, match="resolves outside"):
        inside(tmp_path / "shared", "link/x")


def test_planted_bucket_keys_land_nowhere(endpoint, tmp_path, monkeypatch, capsys):
    import boto3

    for key, value in s3_env(endpoint).items():
        monkeypatch.setenv(key, value)
    prefix = f"planted-{time.time_ns()}"
    store = Store.parse(f"s3://{BUCKET}/{prefix}")
    client = boto3.client("s3", endpoint_url=endpoint)
    planted = {
        "state/tiny/dvc.lock": b"schema: '2.0'\n",
        "state/tiny/metrics/m.json": b"{}",
        "state/tiny/work/../../../escaped.txt": b"planted",  # a naive join leaves the project
        "state/tiny/work//abs-escaped.txt": b"planted",  # an absolute name after the prefix
        "state/tiny/metrics/../../../../../../../../tmp/escaped-abs.txt": b"planted",
    }
    for key, body in planted.items():
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{key}", Body=body)
    deep = tmp_path / "a" / "b" / "c"
    project = deep / "project"
    project.mkdir(parents=True)
    assert durable.restore_state(store, Path("state/tiny"), project)
    assert files_under(project) == {Path("dvc.lock"), Path("metrics/m.json")}
    assert files_under(tmp_path) == {
        Path("a/b/c/project/dvc.lock"),
        Path("a/b/c/project/metrics/m.json"),
    }
    assert not Path("/tmp/escaped-abs.txt").exists()
    err = capsys.readouterr().err
    assert err.count("warning:") == 3 and "left out" in err
    blocks = deep / "blocks"  # the download of finished blocks (storage.synced) alike
    assert sorted(store.get_dir("state/tiny", blocks)) == ["dvc.lock", "metrics/m.json"]
    assert files_under(blocks) == {Path("dvc.lock"), Path("metrics/m.json")}
    assert not any(p.name.endswith("escaped.txt") for p in tmp_path.rglob("*"))
    with pytest.raises(UnsafePathError):  # named directly, such a key is refused
        store.get_file("state/tiny/work/../../../escaped.txt", deep / "x")


def test_planted_links_in_a_folder_store_are_not_followed(tmp_path, capsys):
    shared, project, outside = tmp_path / "shared", tmp_path / "project", tmp_path / "outside"
    state = shared / "state" / "tiny"
    (state / "metrics").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (state / "dvc.lock").write_text("schema: '2.0'\n")
    (state / "metrics" / "secret.json").symlink_to(outside / "secret.txt")  # read out of it
    (state / "work").symlink_to(outside)  # a save would write through it
    store = Store(str(shared))
    assert store.list("state/tiny") == ["dvc.lock"]  # the link out is left out
    project.mkdir()
    assert durable.restore_state(store, Path("state/tiny"), project)
    assert files_under(project) == {Path("dvc.lock")}
    assert "left out" in capsys.readouterr().err
    (project / "work" / "sample").mkdir(parents=True)
    (project / "work" / "sample" / "block.npz").write_bytes(b"block")
    with pytest.raises(UnsafePathError, match="resolves outside"):
        durable.save_state(project, store, Path("state/tiny"))
    assert files_under(outside) == {Path("secret.txt")}


def test_a_data_record_pointing_out_of_storage_is_refused(tmp_path):
    store = Store(str(tmp_path / "shared"))
    store.write_text("state/tiny/data.txt", "/etc")
    with pytest.raises(UnsafePathError, match="is not in"):
        durable.restore_data(store, Path("state/tiny"), tmp_path / "project", "tiny")
    store.write_text("state/tiny/data.txt", store.uri("data") + "/../../etc")
    with pytest.raises(UnsafePathError):
        durable.restore_data(store, Path("state/tiny"), tmp_path / "project", "tiny")
    assert not (tmp_path / "project").exists()
