"""Image views read in chunks: mapped pages released as they are read, hashes chunked by bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pipeline.atomic import save_npz
from pipeline.data import imageviews
from pipeline.data.imageviews import ImagePrefix, release_pages
from pipeline.data.loaders import ImageSet
from pipeline.evaluation.fidelity import content_key
from pipeline.sampling.npzmap import map_member, npy_member


def mapped_kb() -> int:
    """This process's resident file-backed and shared pages (kB): where memory maps show."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["RssFile"].split()[0]) + int(fields["RssShmem"].split()[0])


def test_release_drops_the_resident_pages_of_a_memory_map_and_keeps_its_data(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (64, 256, 256, 3), dtype=np.uint8)
    save_npz(tmp_path / "s.npz", images=images)  # 12 MiB
    mapped = map_member(tmp_path / "s.npz", npy_member(tmp_path / "s.npz", "images"))
    before = mapped_kb()
    assert int(mapped.sum(dtype=np.int64)) == int(images.sum(dtype=np.int64))  # every page read
    read = mapped_kb()
    assert read - before > 8 * 1024
    assert release_pages(mapped[10:20]) == 1  # a view finds its map
    assert read - mapped_kb() > 8 * 1024
    np.testing.assert_array_equal(mapped[50:60], images[50:60])  # read again from the file
    assert release_pages(images) == 0  # an in-memory array: nothing to release


def test_an_image_prefix_releases_as_it_reads(tmp_path, monkeypatch):
    images = np.random.default_rng(2).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    arrays = []
    for start, stop in ((0, 16), (16, 32), (32, 40)):  # shard files, as prepare writes them
        np.save(tmp_path / f"{start}.npy", images[start:stop])
        arrays.append(np.load(tmp_path / f"{start}.npy", mmap_mode="r"))
    split = ImageSet(tmp_path, "train", arrays)
    assert release_pages(split) == 3  # one map per shard file
    monkeypatch.setattr(imageviews, "RELEASE_EVERY_BYTES", 10 * 8 * 8 * 3)  # every 10 images
    released = []
    monkeypatch.setattr(imageviews, "release_pages", lambda images: released.append(images))
    head = ImagePrefix(split, 35)
    got = np.stack([head[i] for i in range(35)])
    np.testing.assert_array_equal(got, images[:35])
    assert len(released) == 3 and released[0] is split


def test_content_key_is_the_same_in_any_chunking():
    images = np.random.default_rng(1).integers(0, 256, (7, 5, 5, 3), dtype=np.uint8)
    expected = hashlib.sha256(b"uint8(7, 5, 5, 3)" + images.tobytes()).hexdigest()
    assert content_key(images) == content_key(images, chunk=3) == expected
