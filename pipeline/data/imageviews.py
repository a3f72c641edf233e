"""A lazy prefix of an image set: the first n images, read only when indexed.

``ImageSet[:n]`` (pipeline.data) gathers a copy, the whole prefix in memory (LSUN bedroom's train
split is ~590 GB). :class:`ImagePrefix` is what the reference stage and evaluate's Inception pass
read instead: shape, dtype and length of the prefix, single images and slices read on demand (the
Inception pass and the content hash read in chunks), so memory stays flat in N.

Reading a memory map leaves its pages resident in this process (file-backed, reclaimable, but
counted in its RSS, and by an OOM killer): every ``RELEASE_EVERY_BYTES`` read, ImagePrefix tells
the kernel this process no longer needs the pages of the memory maps under it
(``madvise(MADV_DONTNEED)``; they stay in the page cache, a later read maps them again).
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Iterator
from typing import Any

import numpy as np

RELEASE_EVERY_BYTES = 64 << 20


class ImagePrefix:
    """The first ``n`` images [n, R, R, 3] of ``images`` (an ImageSet, array or memmap)."""

    def __init__(self, images: Any, n: int) -> None:
        self.images = images
        self.n = max(0, min(int(n), len(images)))
        self.shape: tuple[int, ...] = (self.n, *images.shape[1:])
        self.dtype = np.dtype(getattr(images, "dtype", np.uint8))
        self.unreleased = 0  # bytes read since the mapped pages were last released

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int | np.integer | slice) -> np.ndarray:
        out: np.ndarray
        if isinstance(key, slice):
            out = self.images[slice(*key.indices(self.n))]
        elif isinstance(key, int | np.integer):
            if not -self.n <= key < self.n:
                raise IndexError(f"image {key} out of range for {self.n} images")
            out = self.images[int(key) % self.n]
        else:
            raise TypeError(f"ImagePrefix indices are an int or a slice, not {type(key).__name__}")
        self.unreleased += out.nbytes
        if self.unreleased >= RELEASE_EVERY_BYTES:
            self.unreleased = 0
            release_pages(self.images)
        return out


def release_pages(images: Any) -> int:
    """Drop the resident pages of the memory maps under ``images`` from this process.

    ``images``: an np.memmap (or a view of one), an ImageSet, an ImagePrefix, or anything else
    (then nothing happens). Returns the number of maps released. Data is unchanged: read-only
    file mappings are read again from the page cache or the file.
    """
    count = 0
    for m in _maps(images):
        with contextlib.suppress(ValueError, OSError):  # closed map, or no madvise here
            m.madvise(mmap.MADV_DONTNEED)
            count += 1
    return count


def _maps(images: Any) -> Iterator[mmap.mmap]:
    mapped = getattr(images, "_mmap", None)  # np.memmap and its views
    if isinstance(mapped, mmap.mmap):
        yield mapped
        return
    for array in getattr(images, "_arrays", ()):  # pipeline.data.ImageSet's shards
        yield from _maps(array)
    inner = getattr(images, "images", None)  # ImagePrefix
    if inner is not None:
        yield from _maps(inner)
