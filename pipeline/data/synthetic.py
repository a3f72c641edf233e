"""Procedurally generated images for the smoke scale and the tests (offline, any size).

Each image is a smooth two-colour gradient at a random angle with one or two filled shapes
(discs or squares) of random colour, size and position, drawn with anti-aliased edges. Image i of
a split depends only on (seed, split, i), never on how many images are generated, because its
parameters come from a counter-based hash (SplitMix64) of those numbers; generation is
vectorised numpy, thousands of 16x16 images in a few milliseconds.

Each image also has a class (``synthetic_labels``), read off the same draws: the background's
brightness (dark or light) x the direction in which the gradient brightens (right, down, left,
up): 8 classes named in ``LABEL_NAMES``, saved like CIFAR10's labels (``<split>-labels.npy``).
The feature network of the smoke and tiny scales learns them. The shapes are left out: a small
classifier trained in seconds on 2,048 16x16 images told disc from square and one shape from
two hardly better than chance (44% and 58% on the test split), the background at 95-100%.

Everything computed on these images is a stand-in: the manifest says ``"synthetic": true``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.config import STAND_IN_NOTE, DataConfig
from pipeline.data.manifest import NpyWriter, file_entry, save_labels, split_entry

GENERATOR_VERSION = 1  # bump when the drawing changes (the manifest records it)
STREAMS = {"train": 0, "test": 1}  # splits draw from disjoint hash streams
CHUNK = 1024  # images generated at a time (bounds memory for any size)

# Parameter layout of one image (columns of the uniform draws).
_BG_A, _BG_B, _BG_ANGLE = slice(0, 3), slice(3, 6), 6
_SHAPE_COLUMNS = 8  # per shape: present, kind, cx, cy, size, r, g, b
_N_PARAMS = 7 + 2 * _SHAPE_COLUMNS

BACKGROUND_NAMES = ("dark", "light")
DIRECTION_NAMES = ("brighter right", "brighter down", "brighter left", "brighter up")
LABEL_NAMES = [f"{bg} background {d}" for bg in BACKGROUND_NAMES for d in DIRECTION_NAMES]
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luma weights

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 arrays (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    out: np.ndarray = (x ^ (x >> np.uint64(31))) & _M64
    return out


def uniforms(seed: int, stream: int, indices: np.ndarray, n: int) -> np.ndarray:
    """float64 [len(indices), n] in [0, 1): a pure function of (seed, stream, index, column)."""
    h = _splitmix64(np.array([seed], dtype=np.uint64))
    h = _splitmix64(h ^ np.uint64(stream))
    h = _splitmix64(h ^ np.asarray(indices, dtype=np.uint64)[:, None])
    h = _splitmix64(h ^ np.arange(n, dtype=np.uint64)[None, :])
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def synthetic_images(
    seed: int, indices: np.ndarray, resolution: int, split: str = "train"
) -> np.ndarray:
    """uint8 [len(indices), R, R, 3]: image i is a function of (seed, split, i) only."""
    u = uniforms(seed, STREAMS[split], indices, _N_PARAMS)[:, :, None, None]  # [n, P, 1, 1]
    centres = (np.arange(resolution) + 0.5) / resolution
    y, x = centres[:, None], centres[None, :]  # [R, 1], [1, R] in (0, 1)
    image = _gradient(u, x, y)
    for k in range(2):
        image = _draw_shape(image, u[:, 7 + k * _SHAPE_COLUMNS :], x, y, resolution, first=k == 0)
    return np.rint(image * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)


def synthetic_labels(seed: int, indices: np.ndarray, split: str = "train") -> np.ndarray:
    """int64 [len(indices)]: the class of each image, from the draws that drew it.

    class = 4 * background + direction (``LABEL_NAMES``): background 1 when the luma of the
    gradient's mid colour (a + b) / 2 exceeds 0.5; direction the quarter (0 right, 1 down,
    2 left, 3 up, in image x and y) nearest to the direction in which the luma grows (from
    colour a towards b along the gradient's angle).
    Resolution-free: the same class at every size.
    """
    u = uniforms(seed, STREAMS[split], indices, _N_PARAMS)
    luma_a, luma_b = u[:, _BG_A] @ _LUMA, u[:, _BG_B] @ _LUMA
    background = (0.5 * (luma_a + luma_b) > 0.5).astype(np.int64)
    angle = 2.0 * np.pi * u[:, _BG_ANGLE] + np.where(luma_b >= luma_a, 0.0, np.pi)
    direction = np.floor(angle / (0.5 * np.pi) + 0.5).astype(np.int64) % 4
    labels: np.ndarray = 4 * background + direction
    return labels


def _gradient(u: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Background [n, 3, R, R]: colour a to colour b along a random direction."""
    angle = 2.0 * np.pi * u[:, _BG_ANGLE]
    t = 0.5 + ((x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle)) / np.sqrt(2.0)
    a, b = u[:, _BG_A], u[:, _BG_B]  # [n, 3, 1, 1]
    background: np.ndarray = a + (b - a) * t[:, None]
    return background


def _draw_shape(
    image: np.ndarray, p: np.ndarray, x: np.ndarray, y: np.ndarray, resolution: int, first: bool
) -> np.ndarray:
    """Composite a disc or a square with anti-aliased edges (the second one half the time)."""
    present = np.ones_like(p[:, 0]) if first else (p[:, 0] < 0.5)
    cx, cy = 0.15 + 0.7 * p[:, 2], 0.15 + 0.7 * p[:, 3]
    size = 0.1 + 0.2 * p[:, 4]  # radius or half side, in image widths
    dx, dy = np.abs(x - cx), np.abs(y - cy)
    disc = np.sqrt(dx**2 + dy**2)
    square = np.maximum(dx, dy)
    distance = np.where(p[:, 1] < 0.5, disc, square)
    alpha = (np.clip((size - distance) * resolution + 0.5, 0.0, 1.0) * present)[:, None]
    colour = p[:, 5:8]
    return image * (1.0 - alpha) + colour * alpha


def prepare_synthetic(data: DataConfig, out: Path) -> dict[str, Any]:
    """Write the train and test splits into ``out``; returns the manifest (without params)."""
    splits = {}
    for split, count in (("train", data.n_train), ("test", data.n_test)):
        if count:
            splits[split] = _write_split(data, out, split, count)
    return {
        "dataset": "synthetic",
        "synthetic": True,
        "note": f"procedurally generated images: {STAND_IN_NOTE}",
        "resolution": data.resolution,
        "splits": splits,
        "source": {"kind": "procedural", "generator_version": GENERATOR_VERSION, "seed": data.seed},
    }


def _write_split(data: DataConfig, out: Path, split: str, count: int) -> dict[str, Any]:
    path = out / f"{split}.npy"
    writer = NpyWriter(path, data.resolution)
    for start in tqdm(range(0, count, CHUNK), desc=f"synthetic {split}", disable=None):
        indices = np.arange(start, min(start + CHUNK, count))
        writer.add(synthetic_images(data.seed, indices, data.resolution, split))
    writer.close()
    entry = split_entry([file_entry(path, out, count)], data.resolution)
    labels = synthetic_labels(data.seed, np.arange(count), split)
    entry["labels"] = save_labels(out, split, labels, LABEL_NAMES)
    return entry
