"""A lazy prefix of an image set: the first n images, read only when indexed.

``ImageSet[:n]`` (pipeline.data) gathers a copy, the whole prefix in memory (LSUN bedroom's train
split is ~590 GB). :class:`ImagePrefix` is what the reference stage hands torch-fidelity instead:
shape, dtype and length of the prefix, single images and slices read on demand (the Inception
pass and the content hash read in chunks), so memory stays flat in N.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ImagePrefix:
    """The first ``n`` images [n, R, R, 3] of ``images`` (an ImageSet, array or memmap)."""

    def __init__(self, images: Any, n: int) -> None:
        self.images = images
        self.n = max(0, min(int(n), len(images)))
        self.shape: tuple[int, ...] = (self.n, *images.shape[1:])
        self.dtype = np.dtype(getattr(images, "dtype", np.uint8))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int | np.integer | slice) -> np.ndarray:
        if isinstance(key, slice):
            return self.images[slice(*key.indices(self.n))]
        if isinstance(key, int | np.integer):
            if not -self.n <= key < self.n:
                raise IndexError(f"image {key} out of range for {self.n} images")
            return self.images[int(key) % self.n]
        raise TypeError(f"ImagePrefix indices are an int or a slice, not {type(key).__name__}")
