"""A sample set on disk as shards with a manifest, never one merged file.

``samples/<variant>/`` holds the sample stage's finished block shards themselves,
``block-<start:08d>-<stop:08d>.npz`` (uncompressed .npz, array ``images`` uint8 [n, R, R, 3],
each memory-mapped where it lies), and ``manifest.json`` listing them in index order::

    "sha256": <of every image's bytes in index order: what one merged array would hash to>,
    "shards": [{"file": "block-00000000-00000064.npz", "start": 0, "stop": 64, "count": 64,
                "sha256": <of this shard's images>}, ...]

No second copy by the stage: :func:`publish_shards` hard-links each block of
``work/sample/<variant>/<key>/`` into the output folder (one inode: the bytes exist once, and
the blocks stay reusable by later runs).
Only where a link is impossible (blocks in cluster storage on another file system, a file system
without hard links) is the block copied. Blocks are only ever replaced by a rename, never written
in place, so a linked shard never changes under a reader. (DVC, caching ``samples/<variant>``,
relinks the workspace files as copies afterwards: docs/sampling.md.)

The hashes are of the images' C-order bytes, not of the files: a .npz's zip headers hold a
timestamp, so a recomputed block has other file bytes but the same pixels, and the manifest
stays deterministic. A shard is hashed in one read, ``HASH_CHUNK_BYTES`` at a time.

:func:`open_samples` reads the folder back as one lazy :class:`SampleShards` (an ImageSet:
slices read across shards, the set never whole in memory), after checking every listed shard's
count and item shape and, by default, every shard's and the whole set's sha256: a missing,
truncated or altered shard is a DataError naming it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cluster.blocks import checked_blocks, shard_path
from pipeline.data.loaders import ImageSet
from pipeline.errors import DataError
from pipeline.sampling.npzmap import NpyMember, map_member, npy_member

NAME = "images"  # the array of every shard
HASH_CHUNK_BYTES = 16 << 20
LINK_ERRORS = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP)


class SampleShards(ImageSet):
    """The images [N, R, R, 3] uint8 of a sample folder's shards, memory-mapped, in index order.

    Indexing as :class:`pipeline.data.ImageSet` (copies, across shard boundaries). Pickled (to a
    Ray worker), it sends its folder and is mapped again there without re-hashing.
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, folder: Path, arrays: list[np.ndarray]) -> None:
        super().__init__(Path(folder), "samples", arrays)

    def __repr__(self) -> str:
        return f"SampleShards({str(self.data_dir)!r}, shape={self.shape})"

    def __reduce__(self) -> tuple:
        return _reopen, (self.data_dir,)


def _reopen(folder: Path) -> SampleShards:
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    return open_samples(folder, manifest, "rerun the sample stage", verify=False)


# ---------------------------------------------------------------------------------------------
# Writing: the sample stage.


def publish_shards(
    blocks_dir: str | os.PathLike, n_items: int, block_size: int, dest: str | os.PathLike
) -> dict[str, Any]:
    """Place the blocks of ``0 .. n_items-1`` in ``dest`` (hard links, else copies), hashed.

    Returns the manifest's entries: ``count``, ``shape``, ``dtype``, ``sha256`` (of all images in
    index order) and ``shards`` (see the module docstring). Raises DataError as
    :func:`pipeline.cluster.blocks.merge_blocks` does (missing, duplicated or foreign blocks), and
    for a
    block whose ``images`` is unreadable, compressed, of other rows than its range, or differs
    in dtype or item shape from the first block's.
    """
    blocks_dir, dest = Path(blocks_dir), Path(dest)
    blocks = checked_blocks(blocks_dir, n_items, block_size)
    if not blocks:
        raise DataError(f"{blocks_dir}: no sample blocks to publish (n_samples is 0)")
    dest.mkdir(parents=True, exist_ok=True)
    total, shards, first = hashlib.sha256(), [], None
    for start, stop in blocks:
        source = shard_path(blocks_dir, start, stop)
        member = _member(source, stop - start)
        first = first or member
        if (member.dtype, member.shape[1:]) != (first.dtype, first.shape[1:]):
            raise DataError(
                f"{source}: images {member.dtype}{member.shape[1:]} differ from the first "
                f"block's {first.dtype}{first.shape[1:]}"
            )
        target = dest / source.name
        place(source, target)
        digest = hashlib.sha256()
        hash_bytes(target, member.offset, member.nbytes, digest, total)
        entry = {"file": target.name, "start": start, "stop": stop, "count": stop - start}
        shards.append({**entry, "sha256": digest.hexdigest()})
    assert first is not None  # there are blocks (checked above)
    return {
        "count": n_items,
        "shape": [n_items, *first.shape[1:]],
        "dtype": str(first.dtype),
        "sha256": total.hexdigest(),
        "shards": shards,
    }


def place(source: Path, target: Path) -> str:
    """Hard-link ``source`` as ``target``, or copy it where a link is impossible: which one."""
    try:
        os.link(source, target)
        return "link"
    except OSError as e:
        if e.errno not in LINK_ERRORS:
            raise
    shutil.copyfile(source, target)
    return "copy"


def _member(path: Path, rows: int) -> NpyMember:
    """The ``images`` member of a shard, checked to be mappable and ``rows`` long."""
    try:
        member = npy_member(path, NAME)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: unreadable sample shard ({type(e).__name__}: {e})") from None
    if member is None or member.fortran:
        raise DataError(f"{path}: images stored compressed or in Fortran order, not mappable")
    if len(member.shape) < 1 or member.shape[0] != rows:
        raise DataError(f"{path}: holds images {member.shape}, expected {rows} rows")
    if os.path.getsize(path) < member.offset + member.nbytes:
        raise DataError(f"{path}: truncated ({os.path.getsize(path)} bytes)")
    return member


def hash_bytes(path: Path, offset: int, nbytes: int, *digests: Any) -> None:
    """Feed bytes ``offset .. offset + nbytes`` of ``path`` to every digest, in chunks.

    Plain reads, not a memory map: the pages stay out of this process's resident set.
    """
    buffer = bytearray(min(HASH_CHUNK_BYTES, max(nbytes, 1)))
    view = memoryview(buffer)
    with open(path, "rb") as f:
        f.seek(offset)
        left = nbytes
        while left > 0:
            got = f.readinto(view[: min(left, len(buffer))])
            if not got:
                raise DataError(f"{path}: truncated ({left} bytes missing)")
            for d in digests:
                d.update(view[:got])
            left -= got


# ---------------------------------------------------------------------------------------------
# Reading: evaluate, and the sample stage's grid.


def map_blocks(blocks_dir: str | os.PathLike, n_items: int, block_size: int) -> SampleShards:
    """The finished blocks of ``0 .. n_items-1`` in ``blocks_dir``, mapped (coverage checked)."""
    blocks_dir = Path(blocks_dir)
    blocks = checked_blocks(blocks_dir, n_items, block_size)
    if not blocks:
        raise DataError(f"{blocks_dir}: no sample blocks (n_samples is 0)")
    arrays = []
    for start, stop in blocks:
        path = shard_path(blocks_dir, start, stop)
        arrays.append(map_member(path, _member(path, stop - start)))
    return SampleShards(blocks_dir, arrays)


def open_samples(
    folder: str | os.PathLike, manifest: dict[str, Any], hint: str, verify: bool = True
) -> SampleShards:
    """The shards ``manifest`` lists in ``folder``, mapped; DataError (ending in ``hint``) when
    one is missing, unreadable, of another count or item shape, or (``verify``) whose bytes do
    not hash to the manifest's sha256 (each shard's, then the whole set's).
    """
    folder = Path(folder)
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise DataError(
            f"{folder / 'manifest.json'}: lists no sample shards (format "
            f"{manifest.get('format')!r}, written by an older version?); {hint}"
        )
    total, arrays, first, expected_start = hashlib.sha256(), [], None, 0
    for entry in shards:
        path, start, stop, sha = _entry(folder, entry, hint)
        if start != expected_start:
            raise DataError(f"{path}: starts at image {start}, expected {expected_start}; {hint}")
        if not path.is_file():
            raise DataError(f"{path}: missing sample shard; {hint}")
        try:
            member = _member(path, stop - start)
        except DataError as e:
            raise DataError(f"{e}; {hint}") from None
        first = first or member
        if (member.dtype, member.shape[1:]) != (first.dtype, first.shape[1:]):
            raise DataError(f"{path}: images {member.dtype}{member.shape[1:]} differ; {hint}")
        if verify:
            digest = hashlib.sha256()
            hash_bytes(path, member.offset, member.nbytes, digest, total)
            if digest.hexdigest() != sha:
                raise DataError(f"{path}: sha256 differs from the manifest's (altered); {hint}")
        arrays.append(map_member(path, member))
        expected_start = stop
    if manifest.get("count") not in (None, expected_start):
        raise DataError(
            f"{folder}: shards hold {expected_start} images, the manifest says "
            f"{manifest['count']}; {hint}"
        )
    if verify and manifest.get("sha256") not in (None, total.hexdigest()):
        raise DataError(f"{folder}: the images' sha256 differs from the manifest's; {hint}")
    return SampleShards(folder, arrays)


def _entry(folder: Path, entry: Any, hint: str) -> tuple[Path, int, int, str]:
    """(path, start, stop, sha256) of a manifest's shard entry; DataError when malformed."""
    try:
        name, start, stop, sha = entry["file"], entry["start"], entry["stop"], entry["sha256"]
        start, stop = int(start), int(stop)
    except (KeyError, TypeError, ValueError):
        raise DataError(
            f"{folder / 'manifest.json'}: malformed shard entry {entry!r}; {hint}"
        ) from None
    if not isinstance(name, str) or Path(name).name != name or stop <= start:
        raise DataError(f"{folder / 'manifest.json'}: bad shard entry {entry!r}; {hint}")
    return folder / name, start, stop, str(sha)
