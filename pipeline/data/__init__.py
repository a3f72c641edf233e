"""STUB (branch `fidelity` only): the two readers of prepared data that pipeline.fidelity uses.

The real data package (branch `data`) replaces this file; only the contract is implemented
here, for a split stored as one ``<split>.npy`` file: data/<scale>/manifest.json lists
``splits.<split>.files`` as ``{"path", "count", "sha256"}``, each a uint8 array [n, R, R, 3].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of a prepared data folder (dataset, synthetic, resolution, splits)."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: no prepared data (run `dvc repro prepare`)")
    return json.loads(path.read_text())


def open_split(data_dir: str | Path, split: str) -> np.ndarray:
    """A split as a memory-mapped uint8 array [N, R, R, 3] (single-file splits only)."""
    manifest = read_manifest(data_dir)
    if split not in manifest.get("splits", {}):
        raise DataError(f"{data_dir}: no split {split!r} in manifest.json")
    files = manifest["splits"][split]["files"]
    if len(files) != 1:
        raise DataError(f"{data_dir}: split {split!r} is sharded; this stub reads one file")
    return np.load(Path(data_dir) / files[0]["path"], mmap_mode="r")
