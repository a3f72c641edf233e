"""Arrays of an uncompressed .npz memory-mapped (samples read in pages, never whole)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from pipeline.atomic import save_npz
from pipeline.data.imageviews import ImagePrefix
from pipeline.evaluation.fidelity import content_key
from pipeline.sampling.draw import _array_sha256
from pipeline.sampling.npzmap import map_member, npy_member


def mapped(path, name: str) -> np.ndarray:
    """Array ``name`` of the .npz at ``path`` as pipeline.sampling.shards reads a shard."""
    return map_member(path, npy_member(path, name))


def test_stored_arrays_are_memory_mapped_and_equal(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    other = rng.standard_normal((3, 5))
    save_npz(tmp_path / "s.npz", images=images, other=other)
    got = mapped(tmp_path / "s.npz", "images")
    assert isinstance(got, np.memmap) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(mapped(tmp_path / "s.npz", "other"), other)
    with pytest.raises(KeyError):
        npy_member(tmp_path / "s.npz", "missing")


def test_compressed_is_not_mapped_and_garbage_is_a_value_error(tmp_path):
    a = np.arange(12).reshape(3, 4)
    np.savez_compressed(tmp_path / "c.npz", a=a)
    assert npy_member(tmp_path / "c.npz", "a") is None
    (tmp_path / "bad.npz").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError):
        npy_member(tmp_path / "bad.npz", "a")
    save_npz(tmp_path / "t.npz", a=np.zeros((1000, 100)))
    data = (tmp_path / "t.npz").read_bytes()
    (tmp_path / "t.npz").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError):
        mapped(tmp_path / "t.npz", "a")


def test_chunked_sha256_is_the_whole_array_hash():
    a = np.random.default_rng(1).integers(0, 256, (2500, 3, 3), dtype=np.uint8)
    assert _array_sha256(a, chunk=1000) == hashlib.sha256(a.tobytes()).hexdigest()


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
