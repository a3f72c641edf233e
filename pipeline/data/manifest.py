"""The prepared-data format: uint8 ``.npy`` files per split and a ``manifest.json``.

::

    data/<scale>/
      manifest.json                     what is here (see below)
      train.npy  or  train-00000.npy, train-00001.npy, ...   uint8 [n, R, R, 3] (HWC), in order
      test.npy   or  test-00000.npy, ...
      train-labels.npy, test-labels.npy optional int64 [N] (cifar10, synthetic)

manifest.json::

    {"format": "ddpm-repro/data-v1", "dataset": str, "synthetic": bool, "resolution": R,
     "splits": {"train": {"count": N, "shape": [N, R, R, 3], "dtype": "uint8",
                          "files": [{"path": "train.npy", "count": n, "sha256": hex}, ...],
                          "labels": {"path": ..., "sha256": ..., "names": [...]}  (optional)},
                "test": {...}},
     "source": {...its checksum...}, "params": {...the data section...},
     "corrupt": {"count": n, "keys": [...]}  (lsun)}

``sha256`` is that of the ``.npy`` file's bytes (``sha256sum data/<scale>/train.npy`` agrees).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pipeline.errors import DataError

FORMAT = "ddpm-repro/data-v1"
MANIFEST = "manifest.json"


def one_line(error: object) -> str:
    """An exception as one line of text (for DataError messages and the corrupt-record list)."""
    return " ".join(str(error).split()) or type(error).__name__


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path, root: Path, count: int) -> dict[str, Any]:
    """The manifest entry of one array file: relative path, image count, sha256."""
    return {"path": path.relative_to(root).as_posix(), "count": count, "sha256": sha256_file(path)}


def split_entry(files: list[dict[str, Any]], resolution: int) -> dict[str, Any]:
    """The manifest entry of a split made of ``files`` (in order)."""
    count = sum(f["count"] for f in files)
    return {
        "count": count,
        "shape": [count, resolution, resolution, 3],
        "dtype": "uint8",
        "files": files,
    }


def save_labels(root: Path, split: str, labels: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Write ``<split>-labels.npy`` (int64 [N]) and return its manifest entry."""
    path = root / f"{split}-labels.npy"
    np.save(path, np.asarray(labels, dtype=np.int64))
    return {"path": path.name, "sha256": sha256_file(path), "names": names}


class NpyWriter:
    """Streams uint8 images [n, R, R, 3] into one ``.npy`` file whose length is known at the end.

    The header is written for a placeholder count and rewritten in place on :meth:`close`
    (numpy pads headers so that the first axis can grow to 21 digits without moving the data),
    so memory does not depend on the number of images.
    """

    def __init__(self, path: Path, resolution: int):
        self.path = path
        self.resolution = resolution
        self.count = 0
        self._file: BinaryIO = path.open("wb")
        self._header_size = self._write_header(0)

    def add(self, images: np.ndarray) -> None:
        """Append images, uint8 [n, R, R, 3]."""
        expected = (self.resolution, self.resolution, 3)
        if images.dtype != np.uint8 or images.shape[1:] != expected:
            raise ValueError(f"expected uint8 [n, {expected}], got {images.dtype} {images.shape}")
        self._file.write(np.ascontiguousarray(images).data)
        self.count += len(images)

    def close(self) -> int:
        """Finish the file (final header); returns the number of images written."""
        self._file.seek(0)
        if self._write_header(self.count) != self._header_size:
            raise RuntimeError(f"{self.path}: npy header changed size")  # numpy format change
        self._file.close()
        return self.count

    def abort(self) -> None:
        """Close and delete an unfinished file."""
        self._file.close()
        self.path.unlink(missing_ok=True)

    def _write_header(self, count: int) -> int:
        shape = (count, self.resolution, self.resolution, 3)
        header = {"descr": "|u1", "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(self._file, header)
        return self._file.tell()


def save_split(root: Path, split: str, images: np.ndarray) -> dict[str, Any]:
    """Write an in-memory split as ``<split>.npy`` and return its manifest entry."""
    path = root / f"{split}.npy"
    writer = NpyWriter(path, images.shape[1])
    writer.add(images)
    writer.close()
    return split_entry([file_entry(path, root, len(images))], images.shape[1])


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` (last, so that a folder with a manifest is complete)."""
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a prepared data folder; DataError if it is missing or unreadable."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no prepared data here (run `dvc repro prepare` first)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(
            f"{path}: unreadable manifest ({one_line(e)}); rerun `dvc repro prepare`"
        ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise DataError(f"{path}: not a {FORMAT} manifest; rerun `dvc repro prepare`")
    return manifest
