"""What training, sampling and evaluation read: memory-mapped splits, scaling, batches.

- :func:`open_split` maps a split's ``.npy`` files (one, or LSUN's shards) as one
  :class:`ImageSet` of uint8 [N, R, R, 3] images.
- :func:`to_model_input` scales uint8 pixels k to x = 2k/255 - 1 in [-1, 1] (the paper's
  scaling), NHWC -> NCHW float32; :func:`to_uint8` is its inverse.
- :class:`TrainBatches` gives the training batch of a step as a pure function of (seed, step),
  sharded over data-parallel workers (Ray Train ranks) so that W workers with batch b see exactly
  the global batch that 1 worker with batch W*b sees.
- :func:`eval_batches` walks a split in order, without flips.

torch is imported on first use, so that the ``prepare`` stage does not pay for it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.data.manifest import one_line, read_manifest
from pipeline.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

# x = 2k/255 - 1 for every uint8 k, computed in float64 and rounded once to float32.
_TO_MODEL = (2.0 * np.arange(256, dtype=np.float64) / 255.0 - 1.0).astype(np.float32)
_FLIP_STREAM = 0x666C6970  # "flip": the flip generator's third seed word


class ImageSet:
    """A prepared split, memory-mapped: uint8 [N, R, R, 3] over one or more ``.npy`` files.

    ``images[i]`` is one image [R, R, 3]; a slice or an integer index array gives [n, R, R, 3]
    in the order asked, across file boundaries. Results are copies (safe to modify). Pickling an
    ImageSet (e.g. to a Ray worker) sends its path, and the worker maps the files itself.
    """

    def __init__(self, data_dir: Path, split: str, arrays: list[np.ndarray], labels: Any = None):
        self.data_dir, self.split = data_dir, split
        self._arrays = arrays
        self._starts = np.cumsum([0] + [len(a) for a in arrays])
        self.labels: np.ndarray | None = labels
        self.shape: tuple[int, ...] = (int(self._starts[-1]), *arrays[0].shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ImageSet({str(self.data_dir)!r}, {self.split!r}, shape={self.shape})"

    def __reduce__(self) -> tuple[Any, ...]:
        return open_split, (self.data_dir, self.split)

    def __getitem__(self, key: int | slice | np.ndarray | list[int]) -> np.ndarray:
        if isinstance(key, int | np.integer):
            index = self._check(np.array([key]))[0]
            shard = int(np.searchsorted(self._starts, index, side="right")) - 1
            return np.array(self._arrays[shard][index - self._starts[shard]])
        if isinstance(key, slice):
            return self._gather(np.arange(*key.indices(len(self))))
        indices = np.asarray(key)
        if indices.ndim != 1 or not (indices.size == 0 or np.issubdtype(indices.dtype, np.integer)):
            raise TypeError(
                f"ImageSet indices must be an int, a slice or 1-d integers, not {key!r}"
            )
        return self._gather(self._check(indices.astype(np.int64)))

    def _check(self, indices: np.ndarray) -> np.ndarray:
        """Negative indices count from the end; out of range is an IndexError."""
        n = len(self)
        if indices.size and (indices.min() < -n or indices.max() >= n):
            raise IndexError(f"index out of range for {self!r}")
        return np.where(indices < 0, indices + n, indices)

    def _gather(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), *self.shape[1:]), dtype=np.uint8)
        shards = np.searchsorted(self._starts, indices, side="right") - 1
        for shard in np.unique(shards):
            rows = np.flatnonzero(shards == shard)
            out[rows] = self._arrays[shard][indices[rows] - self._starts[shard]]
        return out


def open_split(data_dir: str | os.PathLike[str], split: str) -> ImageSet:
    """Memory-map a prepared split (``"train"`` or ``"test"``); DataError if it is missing."""
    data_dir = Path(data_dir).resolve()
    manifest = read_manifest(data_dir)
    entry = manifest["splits"].get(split)
    if entry is None:
        known = ", ".join(manifest["splits"]) or "none"
        raise DataError(f"{data_dir}: no {split!r} split in the prepared data (it has: {known})")
    resolution = manifest["resolution"]
    arrays = [_map(data_dir / f["path"], f["count"], resolution) for f in entry["files"]]
    if not arrays:
        raise DataError(f"{data_dir}: the {split!r} split has no files")
    labels = None
    if "labels" in entry:
        labels = _load_labels(data_dir / entry["labels"]["path"], entry["count"])
    return ImageSet(data_dir, split, arrays, labels)


def _map(path: Path, count: int, resolution: int) -> np.ndarray:
    """Memory-map one array file and check it against the manifest."""
    if not path.is_file():
        raise DataError(f"{path}: missing; rerun `dvc repro prepare` (or `dvc checkout`)")
    try:
        array: np.ndarray = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(
            f"{path}: unreadable array ({one_line(e)}); rerun `dvc repro prepare`"
        ) from None
    expected = (count, resolution, resolution, 3)
    if array.shape != expected or array.dtype != np.uint8:
        raise DataError(
            f"{path}: holds {array.dtype} {array.shape}, the manifest says uint8 {expected}"
        )
    return array


def _load_labels(path: Path, count: int) -> np.ndarray:
    try:
        labels: np.ndarray = np.load(path)
    except (OSError, ValueError) as e:
        raise DataError(
            f"{path}: unreadable labels ({one_line(e)}); rerun `dvc repro prepare`"
        ) from None
    if labels.shape != (count,):
        raise DataError(f"{path}: {labels.shape[0]} labels for {count} images")
    return labels


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, R, R, 3] -> float32 [B, 3, R, R] with x = 2k/255 - 1 (exact to float32)."""
    import torch

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise TypeError(f"expected uint8 images [B, R, R, 3], got {images.dtype} {images.shape}")
    return torch.from_numpy(_TO_MODEL[images].transpose(0, 3, 1, 2).copy())


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [B, 3, R, R] in [-1, 1] -> uint8 [B, R, R, 3]: clip, then round((x + 1) * 127.5)."""
    import torch

    pixels = ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class TrainBatches:
    """Training batches as a pure function of the step, sharded over data-parallel ranks.

    Global batch ``s`` takes positions [s*B, (s+1)*B) of an endless stream made of one
    permutation of range(N) per epoch, epoch e's drawn by ``np.random.default_rng([seed, e])``;
    a batch may span two epochs. Rank r takes the r-th contiguous slice of B // world_size.
    Whether position j of global batch s is flipped left-right is drawn by
    ``default_rng([seed, s, "flip"])``, so it does not depend on the world size either.
    Resuming at step s needs nothing but s. In a Ray Train loop::

        ctx = ray.train.get_context()
        batches = TrainBatches(images, cfg.train.batch_size, ctx.get_world_rank(),
                               ctx.get_world_size(), cfg.train.seed, cfg.data.random_flip)
        x0 = batches.batch(step)  # float32 [B // world_size, 3, R, R] in [-1, 1]
    """

    def __init__(
        self,
        images: ImageSet,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        random_flip: bool = True,
    ):
        if global_batch <= 0 or world_size <= 0 or global_batch % world_size:
            raise ConfigError(
                f"the global batch ({global_batch}) must be a positive multiple of the number "
                f"of workers ({world_size})"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if seed < 0 or len(images) == 0:
            raise ValueError(f"need a seed >= 0 (got {seed}) and a non-empty image set")
        self.images, self.global_batch, self.rank = images, global_batch, rank
        self.world_size, self.seed, self.random_flip = world_size, seed, random_flip
        self.local_batch = global_batch // world_size

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of epoch ``epoch``: a permutation of range(N)."""
        return _permutation(self.seed, epoch, len(self.images))

    def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's part of global batch ``step``: image indices [b] and flip flags [b]."""
        first = step * self.global_batch + self.rank * self.local_batch
        positions = first + np.arange(self.local_batch, dtype=np.int64)
        epochs, offsets = np.divmod(positions, len(self.images))
        indices = np.empty(self.local_batch, dtype=np.int64)
        for epoch in np.unique(epochs):
            rows = epochs == epoch
            indices[rows] = self.permutation(int(epoch))[offsets[rows]]
        return indices, self._flips(step)

    def _flips(self, step: int) -> np.ndarray:
        if not self.random_flip:
            return np.zeros(self.local_batch, dtype=bool)
        flips = np.random.default_rng([self.seed, step, _FLIP_STREAM]).random(self.global_batch)
        start = self.rank * self.local_batch
        return flips[start : start + self.local_batch] < 0.5

    def batch(self, step: int) -> torch.Tensor:
        """float32 [B // world_size, 3, R, R] in [-1, 1]: this rank's slice of batch ``step``."""
        indices, flips = self.indices(step)
        images = self.images[indices]
        images[flips] = images[flips, :, ::-1]
        return to_model_input(images)


@functools.lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    permutation = np.random.default_rng([seed, epoch]).permutation(n)
    permutation.flags.writeable = False
    return permutation


def eval_batches(
    images: ImageSet, batch_size: int, start: int = 0, stop: int | None = None
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Images [start, stop) in order, as (indices [b], float32 [b, 3, R, R] in [-1, 1])."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive (got {batch_size})")
    stop = len(images) if stop is None else min(stop, len(images))
    for first in range(start, stop, batch_size):
        indices = np.arange(first, min(first + batch_size, stop))
        yield indices, to_model_input(images[first : indices[-1] + 1])
