"""Atomic output writing: write to a temporary sibling, then rename into place.

A crash or an interrupt therefore never leaves a file (or folder) that looks complete. What is
renamed into place is fsynced first (the file, or every file of a folder, and the folder), and
the parent folder after the rename, so that after a crash of the machine the output is the old
one or the whole new one. :func:`atomic_dir` replaces an existing folder with two renames (the
old one aside to ``.<name>.old.<pid>``, the new one into place); a crash between them leaves no
``<name>``, and the next :func:`atomic_dir` of that path (or :func:`recover_dir`) renames the
old copy back first.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the device (where the system allows a
    folder to be opened: not every file system does)."""
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder``, then ``folder``."""
    for path in sorted(folder.rglob("*"), reverse=True):  # a folder after what it holds
        if (path.is_file() and not path.is_symlink()) or path.is_dir():
            fsync_path(path)
    fsync_path(folder)


OLD = ".{name}.old."  # + pid: atomic_dir's copy of the old folder between its two renames


def recover_dir(path: str | os.PathLike) -> bool:
    """Undo an :func:`atomic_dir` cut between its two renames: with ``path`` missing and an old
    copy ``.<name>.old.<pid>`` left by a process that is gone, rename the newest such copy back
    to ``path`` (True). With ``path`` present, old copies of gone processes are removed."""
    path = Path(path)
    prefix = OLD.format(name=path.name)
    olds = []
    for old in path.parent.glob(f"{glob.escape(prefix)}*") if path.parent.is_dir() else []:
        pid = old.name[len(prefix) :]
        if pid.isdigit() and not _alive(int(pid)):
            olds.append(old)
    if not olds:
        return False
    olds.sort(key=lambda p: p.stat().st_mtime_ns)
    recovered = False
    if not path.exists():
        os.replace(olds.pop(), path)
        fsync_path(path.parent)
        recovered = True
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
    return recovered


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not between two renames while it recovers
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _publish_mode(path: Path, directory: bool) -> None:
    """Give a finished temporary file/folder the usual permissions (mkstemp makes them 0600)."""
    path.chmod((0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.

    The temporary name ends with ``suffix`` (e.g. ``.npy``) so that libraries which append an
    extension do not change it. On error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _publish_mode(tmp_path, directory=False)
        fsync_path(tmp_path)
        os.replace(tmp_path, path)
        fsync_path(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` whole.

    An existing ``path`` is removed only after the new content is complete (and fsynced); an
    old copy left by a crash between the two renames is recovered first (:func:`recover_dir`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _publish_mode(tmp, directory=True)
        _fsync_tree(tmp)
        if path.exists():
            old = path.with_name(OLD.format(name=path.name) + str(os.getpid()))
            os.replace(path, old)
            os.replace(tmp, path)
            fsync_path(path.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
            fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path, ".json") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Save named arrays in one uncompressed .npz, atomically."""
    with atomic_path(path, ".npz") as tmp, tmp.open("wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub: a key may be allow_pickle
