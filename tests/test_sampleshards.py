"""Samples on disk as shards + manifest: publishing (links, copies), hashes, reading back."""

from __future__ import annotations

import errno
import hashlib
import os
import pickle

import numpy as np
import pytest

from pipeline.atomic import save_npz
from pipeline.cluster.blocks import block_ranges, shard_path
from pipeline.errors import DataError
from pipeline.sampling.shards import SampleShards, open_samples, publish_shards


def blocks(folder, images, block_size):
    for start, stop in block_ranges(len(images), block_size):
        save_npz(shard_path(folder, start, stop), images=images[start:stop])


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, (10, 5, 5, 3), dtype=np.uint8)


def test_published_shards_are_links_hashed_like_one_array(tmp_path, images):
    blocks(tmp_path / "work", images, 4)
    manifest = publish_shards(tmp_path / "work", 10, 4, tmp_path / "out")
    assert manifest["sha256"] == hashlib.sha256(images.tobytes()).hexdigest()
    assert manifest["shape"] == [10, 5, 5, 3] and manifest["dtype"] == "uint8"
    ranges = [(s["start"], s["stop"], s["count"]) for s in manifest["shards"]]
    assert ranges == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    for s in manifest["shards"]:
        assert s["sha256"] == hashlib.sha256(images[s["start"] : s["stop"]].tobytes()).hexdigest()
        assert (
            os.stat(tmp_path / "out" / s["file"]).st_ino
            == os.stat(tmp_path / "work" / s["file"]).st_ino
        )
    got = open_samples(tmp_path / "out", manifest, "hint")
    assert isinstance(got, SampleShards) and got.shape == (10, 5, 5, 3)
    np.testing.assert_array_equal(got[:], images)
    np.testing.assert_array_equal(got[3:9], images[3:9])  # across shard boundaries
    np.testing.assert_array_equal(got[-1], images[-1])
    (tmp_path / "out" / "manifest.json").write_text(__import__("json").dumps(manifest))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(got))[:], images)  # remapped


def test_another_file_system_gets_copies_with_the_same_manifest(tmp_path, images, monkeypatch):
    blocks(tmp_path / "work", images, 4)
    linked = publish_shards(tmp_path / "work", 10, 4, tmp_path / "a")

    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    copied = publish_shards(tmp_path / "work", 10, 4, tmp_path / "b")
    assert copied == linked
    for s in copied["shards"]:
        assert (
            os.stat(tmp_path / "b" / s["file"]).st_ino
            != os.stat(tmp_path / "work" / s["file"]).st_ino
        )
    np.testing.assert_array_equal(open_samples(tmp_path / "b", copied, "hint")[:], images)


def test_blocks_of_another_image_shape_are_refused(tmp_path, images):
    blocks(tmp_path, images, 4)
    save_npz(shard_path(tmp_path, 8, 10), images=np.zeros((2, 6, 6, 3), np.uint8))
    with pytest.raises(DataError, match="differ from the first block"):
        publish_shards(tmp_path, 10, 4, tmp_path / "out")


def test_an_older_single_file_manifest_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"lists no sample shards.*older version.*rerun"):
        open_samples(tmp_path, {"format": "ddpm-repro/samples-v1", "count": 4}, "rerun")
