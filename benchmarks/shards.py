"""Merging block shards into one ``.npz`` on disk, one shard in memory at a time.

:func:`merge_to_npz` checks coverage as :func:`pipeline.cluster.blocks.merge_blocks` does (every
index exactly once, blocks of the given size), then writes array ``name`` of every shard, in index
order, straight into an uncompressed ``.npz`` member (a .npy header for the whole
``[n_items, ...]`` shape, then each shard's bytes) while hashing the bytes. Memory stays one shard
whatever N is; :func:`pipeline.sampling.npzmap.load_npz_array` maps the result back.

The sample stage no longer merges (its output is the shards themselves:
:mod:`pipeline.sampling.shards`); ``benchmarks.memory_merge`` still compares this merge with the
in-memory one it replaced.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_path
from pipeline.cluster.blocks import checked_blocks, read_shard, shard_path
from pipeline.errors import DataError


def merge_to_npz(
    out_dir: str | os.PathLike,
    n_items: int,
    block_size: int,
    path: str | os.PathLike,
    name: str = "images",
) -> str:
    """Write array ``name`` of the shards of ``0 .. n_items-1`` as ``path`` (.npz, atomically).

    Returns the sha256 of the merged array's C-order bytes. Raises DataError as merge_blocks
    does (missing, duplicated or foreign shards, unreadable ones), and for shards whose
    ``name`` is missing or differs in dtype or item shape from the first one's.
    """
    out_dir = Path(out_dir)
    blocks = checked_blocks(out_dir, n_items, block_size)
    digest = hashlib.sha256()
    with (
        atomic_path(path, ".npz") as tmp,
        zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf,
        zf.open(f"{name}.npy", "w", force_zip64=True) as member,
    ):
        _write_shards(member, digest, out_dir, blocks, n_items, name)
    return digest.hexdigest()


def _write_shards(member, digest, out_dir: Path, blocks: list, n_items: int, name: str) -> None:
    """The .npy header of [n_items, ...], then every shard's ``name`` bytes, also hashed."""
    first = None
    for start, stop in blocks:
        path = shard_path(out_dir, start, stop)
        arrays = read_shard(path, stop - start)
        if name not in arrays:
            raise DataError(f"{path}: no array {name!r}")
        part = np.ascontiguousarray(arrays.pop(name))
        if first is None:
            first = part
            header = {
                "descr": np.lib.format.dtype_to_descr(part.dtype),
                "fortran_order": False,
                "shape": (n_items, *part.shape[1:]),
            }
            np.lib.format.write_array_header_2_0(member, header)
        elif part.dtype != first.dtype or part.shape[1:] != first.shape[1:]:
            raise DataError(
                f"{path}: {name} {part.dtype}{part.shape[1:]} differs from the first shard's "
                f"{first.dtype}{first.shape[1:]}"
            )
        member.write(part.data)
        digest.update(part.data)
