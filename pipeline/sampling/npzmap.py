"""Memory-map an array stored in an uncompressed ``.npz`` (what :func:`pipeline.atomic.save_npz`
writes), so that a whole sample set is read in pages, not held in memory.

An uncompressed zip stores each member's bytes contiguously after its local file header; the
member ``<name>.npy`` is a .npy header followed by the raw array, so the array can be mapped at
that offset with ``np.memmap``. A compressed member cannot (:func:`npy_member` returns None).
"""

from __future__ import annotations

import os
import struct
import zipfile
from dataclasses import dataclass
from typing import Literal

import numpy as np

LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zip local file header, 30 bytes
LOCAL_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class NpyMember:
    """Where an uncompressed ``.npz`` member's array lies in the file."""

    offset: int  # bytes from the start of the file to the first array byte
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool

    @property
    def nbytes(self) -> int:
        """Length of the array's bytes in the file."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def npy_member(path: str | os.PathLike, name: str) -> NpyMember | None:
    """Offset, shape and dtype of array ``name`` of the .npz at ``path``; None if compressed.

    Raises ValueError for a file that is not a readable .npz, KeyError for a missing array.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(f"{name}.npy")
    except zipfile.BadZipFile as e:
        raise ValueError(f"not a zip file: {e}") from None
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:  # compressed, encrypted
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        fields = LOCAL_HEADER.unpack(f.read(LOCAL_HEADER.size))
        if fields[0] != LOCAL_MAGIC:
            raise ValueError("bad zip local header")
        name_len, extra_len = fields[-2], fields[-1]
        f.seek(info.header_offset + LOCAL_HEADER.size + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{name}: object arrays are not loaded")
    return NpyMember(offset, tuple(shape), dtype, bool(fortran))


def map_member(path: str | os.PathLike, member: NpyMember) -> np.ndarray:
    """The read-only memmap of ``member`` (from :func:`npy_member`) of the file ``path``.

    Raises ValueError when the file is shorter than the header says (a truncated file).
    """
    order: Literal["C", "F"] = "F" if member.fortran else "C"
    return np.memmap(
        path, dtype=member.dtype, mode="r", offset=member.offset, shape=member.shape, order=order
    )
