"""CIFAR10 from the official python archive ``cifar-10-python.tar.gz``, read by our own code.

The archive holds ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``: pickled
dicts with ``b'data'`` (N, 3072) uint8, each row the R, G then B planes of a 32x32 image in
row-major order, and ``b'labels'`` (N ints in 0..9). The training split is batches 1..5 in order
(50000 images), the test split is ``test_batch`` (10000), both uint8 HWC exactly as archived.

The archive's md5 is checked before anything is unpickled, and the unpickler accepts only the
numpy arrays, lists and bytes that these batches contain.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from tqdm import tqdm

from pipeline.atomic import atomic_path
from pipeline.config import DataConfig
from pipeline.data.manifest import one_line, save_labels, save_split
from pipeline.errors import DataError

ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
DOWNLOADS = Path(".cache/downloads")  # outside the DVC output; .cache/ is gitignored


def md5_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex md5 of a file's bytes."""
    digest = hashlib.md5()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_md5(path: Path, expected: str) -> str:
    """The file's md5; DataError naming both sums if it is not ``expected``."""
    found = md5_file(path)
    if found != expected.lower():
        raise DataError(
            f"{path}: md5 {found} does not match the expected {expected} "
            f"(a corrupt or different file, not the official {ARCHIVE})"
        )
    return found


def locate_archive(data: DataConfig, where: str, cache: Path = DOWNLOADS) -> Path:
    """The local archive: ``data.source``, or a verified download of ``data.url`` into ``cache``."""
    if data.source is not None:
        path = Path(data.source).expanduser()
        if not path.is_file():
            raise DataError(
                f"{path}: no such file; set {where}.source to a local copy of {ARCHIVE} "
                f"(or null to download it from {data.url})"
            )
        return path
    path = cache / ARCHIVE
    if path.is_file() and md5_file(path) == data.md5.lower():
        return path
    download(data.url, path, where)
    return path


def download(url: str, path: Path, where: str) -> None:
    """Download ``url`` to ``path`` atomically, with a progress bar."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_path(path) as tmp:
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=path.name, disable=None)
            with tmp.open("wb") as f, bar:
                while block := response.read(1 << 20):
                    f.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError) as e:
        reason = one_line(getattr(e, "reason", e))
        raise DataError(
            f"cannot download {url} ({reason}); without internet, set {where}.source "
            f"to a local copy of {ARCHIVE}"
        ) from None


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles the batches' dicts of numpy arrays, lists and bytes; refuses anything else."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module.replace("numpy.core.", "numpy._core."), name)


def read_archive(path: Path) -> dict[str, Any]:
    """Read the archive: ``{"train": (images, labels), "test": (...), "label_names": [...]}``.

    images: uint8 [N, 32, 32, 3] (HWC), labels: int64 [N], in the archive's order.
    """
    wanted = {f"{FOLDER}/{name}" for name in (*TRAIN_BATCHES, TEST_BATCH, META)}
    blobs: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tqdm(tar, desc="cifar10", unit="file", disable=None):
                if member.name not in wanted or not member.isfile():
                    continue
                file = tar.extractfile(member)
                assert file is not None  # a regular file has its content
                blobs[member.name.rsplit("/", 1)[1]] = file.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{path}: not a readable {ARCHIVE} ({one_line(e)})") from None
    missing = [f"{FOLDER}/{n}" for n in (*TRAIN_BATCHES, TEST_BATCH, META) if n not in blobs]
    if missing:
        raise DataError(f"{path}: {', '.join(missing)} missing (not the CIFAR10 python archive)")
    batches = {name: _parse_batch(path, name, blobs[name]) for name in (*TRAIN_BATCHES, TEST_BATCH)}
    return {
        "train": _concatenate([batches[name] for name in TRAIN_BATCHES]),
        "test": batches[TEST_BATCH],
        "label_names": _label_names(path, blobs[META]),
    }


def _unpickle(path: Path, name: str, blob: bytes) -> dict[Any, Any]:
    try:
        obj = _BatchUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:  # any unpickling failure means a foreign or damaged member
        raise DataError(
            f"{path}: {FOLDER}/{name} is not a CIFAR10 batch pickle ({one_line(e)})"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: {FOLDER}/{name} is not a dict but {type(obj).__name__}")
    return obj


def _parse_batch(path: Path, name: str, blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One batch as (uint8 [N, 32, 32, 3], int64 [N])."""
    batch = _unpickle(path, name, blob)
    data, labels = batch.get(b"data"), batch.get(b"labels")
    where = f"{path}: {FOLDER}/{name}"
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        found = getattr(data, "shape", type(data).__name__)
        raise DataError(f"{where}: b'data' is {found}, expected a uint8 array (N, 3072)")
    if data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{where}: b'data' has shape {data.shape}, expected (N, 3072)")
    labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels.shape != (len(data),) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise DataError(f"{where}: b'labels' must be {len(data)} integers in 0..9")
    return batch_to_images(data), labels


def batch_to_images(data: np.ndarray) -> np.ndarray:
    """(N, 3072) rows of R, G, B planes (each 32x32 row-major) -> uint8 [N, 32, 32, 3]."""
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _concatenate(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _label_names(path: Path, blob: bytes) -> list[str]:
    names = _unpickle(path, META, blob).get(b"label_names")
    if not isinstance(names, list):
        raise DataError(f"{path}: {FOLDER}/{META} has no b'label_names' list")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def prepare_cifar10(data: DataConfig, out: Path, archive: Path) -> dict[str, Any]:
    """Verify and read ``archive``, write both splits into ``out``; returns the manifest."""
    found = check_md5(archive, data.md5)
    arrays = read_archive(archive)
    splits = {}
    for split in ("train", "test"):
        images, labels = arrays[split]
        splits[split] = save_split(out, split, images)
        splits[split]["labels"] = save_labels(out, split, labels, arrays["label_names"])
    return {
        "dataset": "cifar10",
        "synthetic": False,
        "resolution": 32,
        "splits": splits,
        # the archive as named (data.source, or .cache/downloads/ in the project): no absolute
        # path, which would change with the project's folder (a Ray job's working directory)
        # and with it the hash dvc.lock records of data/<scale>/
        "source": {"kind": "archive", "file": str(archive), "md5": found},
    }
