"""Arrays of an uncompressed .npz memory-mapped (samples read in pages, never whole)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from benchmarks.shards import merge_to_npz
from pipeline.atomic import save_npz
from pipeline.cluster.blocks import shard_path
from pipeline.data.imageviews import ImagePrefix
from pipeline.errors import DataError
from pipeline.evaluation.fidelity import content_key
from pipeline.sampling.draw import _array_sha256
from pipeline.sampling.npzmap import load_npz_array


def test_stored_arrays_are_memory_mapped_and_equal(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    other = rng.standard_normal((3, 5))
    save_npz(tmp_path / "s.npz", images=images, other=other)
    got = load_npz_array(tmp_path / "s.npz", "images")
    assert isinstance(got, np.memmap) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(load_npz_array(tmp_path / "s.npz", "other"), other)
    with pytest.raises(KeyError):
        load_npz_array(tmp_path / "s.npz", "missing")


def test_compressed_is_read_whole_and_garbage_is_a_value_error(tmp_path):
    a = np.arange(12).reshape(3, 4)
    np.savez_compressed(tmp_path / "c.npz", a=a)
    got = load_npz_array(tmp_path / "c.npz", "a")
    assert not isinstance(got, np.memmap)
    np.testing.assert_array_equal(got, a)
    (tmp_path / "bad.npz").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError):
        load_npz_array(tmp_path / "bad.npz", "a")
    save_npz(tmp_path / "t.npz", a=np.zeros((1000, 100)))
    data = (tmp_path / "t.npz").read_bytes()
    (tmp_path / "t.npz").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError):
        load_npz_array(tmp_path / "t.npz", "a")


def test_chunked_sha256_is_the_whole_array_hash():
    a = np.random.default_rng(1).integers(0, 256, (2500, 3, 3), dtype=np.uint8)
    assert _array_sha256(a, chunk=1000) == hashlib.sha256(a.tobytes()).hexdigest()


def test_shards_merge_into_one_npz_with_the_hash_of_the_whole(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    for start in range(0, 10, 4):
        save_npz(shard_path(tmp_path, start, min(start + 4, 10)), images=images[start : start + 4])
    sha = merge_to_npz(tmp_path, 10, 4, tmp_path / "merged.npz")
    assert sha == hashlib.sha256(images.tobytes()).hexdigest()
    with np.load(tmp_path / "merged.npz") as f:  # a plain .npz for numpy
        np.testing.assert_array_equal(f["images"], images)
    np.testing.assert_array_equal(load_npz_array(tmp_path / "merged.npz", "images"), images)
    shard_path(tmp_path, 4, 8).unlink()
    with pytest.raises(DataError, match=r"missing indices \[4, 8\)"):
        merge_to_npz(tmp_path, 10, 4, tmp_path / "again.npz")
    assert not (tmp_path / "again.npz").exists()


def test_an_image_prefix_reads_lazily_what_a_copy_would_hold():
    images = np.random.default_rng(3).integers(0, 256, (9, 4, 4, 3), dtype=np.uint8)
    head = ImagePrefix(images, 5)
    assert len(head) == 5 and head.shape == (5, 4, 4, 3) and head.dtype == np.uint8
    np.testing.assert_array_equal(head[3:100], images[3:5])  # slices stop at the prefix
    np.testing.assert_array_equal(head[-1], images[4])
    with pytest.raises(IndexError):
        head[5]
    assert content_key(head, chunk=2) == content_key(images[:5])
    assert len(ImagePrefix(images, 50)) == 9
