"""CIFAR10: a small archive in the official layout, prepared pixel-exactly; every bad input."""

from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from data_formats import data_config, make_cifar_archive, py2_pickle

from pipeline.data import open_split, prepare, read_manifest
from pipeline.data.cifar10 import _parse_batch
from pipeline.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, str, dict]:
    path = tmp_path_factory.mktemp("cifar") / "cifar-10-python.tar.gz"
    md5, batches = make_cifar_archive(path, per_batch=40, n_test=60)
    return path, md5, batches


def expected_images(data: np.ndarray) -> np.ndarray:
    """Independent reading of b'data': pixel (h, w) of plane c is column c*1024 + h*32 + w."""
    n = len(data)
    h, w, c = np.meshgrid(np.arange(32), np.arange(32), np.arange(3), indexing="ij")
    return data[np.arange(n)[:, None, None, None], (c * 1024 + h * 32 + w)[None]]


def test_prepares_both_splits_pixel_exactly(tmp_path, archive):
    path, md5, batches = archive
    manifest = prepare(data_config(dataset="cifar10", source=str(path), md5=md5), tmp_path / "d")
    train, test = open_split(tmp_path / "d", "train"), open_split(tmp_path / "d", "test")
    names = [f"data_batch_{i}" for i in range(1, 6)]
    want_train = np.concatenate([expected_images(batches[n][b"data"]) for n in names])
    assert train.shape == (200, 32, 32, 3) and test.shape == (60, 32, 32, 3)
    np.testing.assert_array_equal(train[:], want_train)
    np.testing.assert_array_equal(test[:], expected_images(batches["test_batch"][b"data"]))
    labels = np.concatenate([batches[n][b"labels"] for n in names])
    np.testing.assert_array_equal(train.labels, labels)
    np.testing.assert_array_equal(test.labels, batches["test_batch"][b"labels"])
    assert manifest == read_manifest(tmp_path / "d")
    assert manifest["source"]["md5"] == md5 and not manifest["synthetic"]
    assert manifest["splits"]["train"]["labels"]["names"][:2] == ["airplane", "automobile"]
    for split in manifest["splits"].values():
        for f in split["files"]:
            digest = hashlib.sha256((tmp_path / "d" / f["path"]).read_bytes()).hexdigest()
            assert f["sha256"] == digest


def test_downloads_once_into_the_cache(tmp_path, archive):
    path, md5, _ = archive
    cache = tmp_path / "cache"
    cfg = data_config(dataset="cifar10", url=path.as_uri(), md5=md5)
    prepare(cfg, tmp_path / "a", downloads=cache)
    assert (cache / "cifar-10-python.tar.gz").read_bytes() == path.read_bytes()
    offline = data_config(dataset="cifar10", url="http://127.0.0.1:9/cifar.tar.gz", md5=md5)
    prepare(offline, tmp_path / "b", downloads=cache)  # the verified copy is reused
    assert (tmp_path / "b" / "manifest.json").is_file()


def test_offline_download_says_to_set_source(tmp_path):
    cfg = data_config(dataset="cifar10", url="http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(DataError, match=r"cannot download .*set presets\.t\.data\.source"):
        prepare(cfg, tmp_path / "d", downloads=tmp_path / "cache")
    assert not (tmp_path / "d").exists()


def assert_fails(tmp_path: Path, pattern: str, **data) -> None:
    """prepare raises DataError matching ``pattern`` and leaves no output folder."""
    with pytest.raises(DataError, match=pattern) as info:
        prepare(data_config(dataset="cifar10", **data), tmp_path / "d")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "d").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".d")]


def test_missing_archive(tmp_path):
    assert_fails(
        tmp_path, r"no such file; set presets\.t\.data\.source", source=str(tmp_path / "x")
    )


def test_wrong_checksum_names_both_sums(tmp_path, archive):
    path, md5, _ = archive
    expected = "0" * 32
    assert_fails(
        tmp_path,
        f"md5 {md5} does not match the expected {expected}",
        source=str(path),
        md5=expected,
    )


@pytest.mark.parametrize("damage", ["truncated", "not_tar", "empty"])
def test_unreadable_archive(tmp_path, archive, damage):
    path, _, _ = archive
    bad = tmp_path / "bad.tar.gz"
    content = {
        "truncated": path.read_bytes()[: path.stat().st_size // 2],
        "not_tar": b"<html>not found</html>\n" * 50,
        "empty": b"",
    }[damage]
    bad.write_bytes(content)
    md5 = hashlib.md5(content).hexdigest()  # the checksum passes: the content is what is bad
    assert_fails(tmp_path, r"not a readable cifar-10-python\.tar\.gz", source=str(bad), md5=md5)


def test_batch_with_wrong_shape(tmp_path):
    path = tmp_path / "a.tar.gz"
    bad = {b"data": np.zeros((40, 3000), dtype=np.uint8)}
    md5, _ = make_cifar_archive(path, override={"data_batch_3": bad})
    assert_fails(
        tmp_path,
        r"data_batch_3: b'data' has shape \(40, 3000\), expected \(N, 3072\)",
        source=str(path),
        md5=md5,
    )


def test_labels_not_matching_images(tmp_path):
    path = tmp_path / "a.tar.gz"
    md5, _ = make_cifar_archive(path, override={"test_batch": {b"labels": [1, 2, 3]}})
    assert_fails(tmp_path, r"test_batch: b'labels' must be 60 integers", source=str(path), md5=md5)


def test_missing_member(tmp_path):
    path = tmp_path / "a.tar.gz"
    md5, _ = make_cifar_archive(path, skip=("test_batch",))
    assert_fails(tmp_path, r"cifar-10-batches-py/test_batch missing", source=str(path), md5=md5)


def test_refuses_objects_other_than_arrays(tmp_path):
    path = tmp_path / "a.tar.gz"
    extra = {"data_batch_1": {b"extra": OrderedDict()}}
    md5, _ = make_cifar_archive(path, override=extra, py2=False)
    assert_fails(
        tmp_path,
        r"data_batch_1 is not a CIFAR10 batch pickle .*collections\.OrderedDict",
        source=str(path),
        md5=md5,
    )


@pytest.mark.parametrize("protocol", [2, 5])
def test_reads_batches_pickled_by_python_3(tmp_path, protocol):
    """Batches re-pickled by Python 3 (numpy._core names, _codecs bytes, buffers) also read."""
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    blob = pickle.dumps({b"data": data, b"labels": [3, 4]}, protocol=protocol)
    images, labels = _parse_batch(Path("x"), "data_batch_1", blob)
    np.testing.assert_array_equal(images, expected_images(data))
    np.testing.assert_array_equal(labels, [3, 4])


def test_python_2_pickles_are_what_the_fixture_writes():
    """The fixture's hand-written Python 2 stream is what pickle reads as the batch dict."""
    data = np.random.default_rng(0).integers(0, 256, (3, 3072), dtype=np.uint8)
    batch = {b"data": data, b"labels": [0, 9, 300], b"batch_label": b"x" * 300}
    back = pickle.loads(py2_pickle(batch), encoding="bytes")
    assert back.keys() == batch.keys() and back[b"labels"] == [0, 9, 300]
    np.testing.assert_array_equal(back[b"data"], data)
    assert back[b"batch_label"] == b"x" * 300


def test_resolution_must_be_32(tmp_path):
    with pytest.raises(ConfigError, match=r"presets\.t\.data\.resolution: cifar10 images are 32"):
        prepare(data_config(dataset="cifar10", resolution=16), tmp_path / "d")
