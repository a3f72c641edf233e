"""Small files in the official formats, for the data tests.

- :func:`make_cifar_archive`: a ``cifar-10-python.tar.gz`` laid out as the official one
  (``cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta``: pickled dicts, bytes keys).
- :func:`make_lmdb`: an LMDB as the LSUN project distributes it (key -> encoded image bytes).
- :func:`ddpm_unet`: a diffusers UNet2DModel laid out as the published DDPM checkpoints.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import lmdb
import numpy as np
from PIL import Image

from pipeline.config import Config, config_from_dict

LABEL_NAMES = [
    *(b"airplane", b"automobile", b"bird", b"cat", b"deer"),
    *(b"dog", b"frog", b"horse", b"ship", b"truck"),
]


def py2_pickle(obj: object) -> bytes:
    """Protocol-2 pickle bytes as Python 2's cPickle wrote the official archive.

    Strings are Python 2 ``str`` (SHORT_BINSTRING/BINSTRING opcodes, read back as bytes with
    ``encoding="bytes"``) and arrays refer to ``numpy.core.multiarray._reconstruct``, which
    Python 3's pickler cannot produce. Handles dicts, lists, ints, bytes and uint8 arrays.
    """
    return b"\x80\x02" + _py2(obj) + b"."


def _py2(obj: object) -> bytes:
    if isinstance(obj, dict):
        return b"}(" + b"".join(_py2(k) + _py2(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, list):
        return b"](" + b"".join(_py2(v) for v in obj) + b"e"
    if isinstance(obj, int):
        return b"K" + bytes([obj]) if 0 <= obj < 256 else b"J" + struct.pack("<i", obj)
    if isinstance(obj, bytes):
        size = len(obj)
        return b"U" + bytes([size]) + obj if size < 256 else b"T" + struct.pack("<i", size) + obj
    assert isinstance(obj, np.ndarray) and obj.dtype == np.uint8
    glob = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
    dtype = b"cnumpy\ndtype\n" + _py2(b"u1") + b"K\x00K\x01\x87R(K\x03" + _py2(b"|")
    dtype += b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    shape = b"(" + b"".join(_py2(int(d)) for d in obj.shape) + b"t"
    state = b"(K\x01" + shape + dtype + b"\x89" + _py2(obj.tobytes()) + b"tb"
    return glob + b"(K\x00t" + _py2(b"b") + b"\x87R" + state


def cifar_batch(rng: np.random.Generator, n: int, name: str) -> dict:
    """One batch dict as in the archive: b'data' (n, 3072) uint8 R, G, B planes, row-major."""
    return {
        b"batch_label": f"{name} of 5".encode(),
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{name}_{i:05d}.png".encode() for i in range(n)],
    }


def make_cifar_archive(
    path: Path,
    per_batch: int = 40,
    n_test: int = 60,
    seed: int = 0,
    override: dict[str, dict] | None = None,
    skip: tuple[str, ...] = (),
    py2: bool = True,
) -> tuple[str, dict[str, dict]]:
    """Write a CIFAR-style archive; returns (its md5, {batch name: batch dict}).

    ``override`` replaces entries of a batch dict (e.g. a b'data' of the wrong shape), ``skip``
    leaves members out; ``py2=False`` pickles with Python 3 (protocol 2) instead.
    """
    rng = np.random.default_rng(seed)
    batches = {
        f"data_batch_{i}": cifar_batch(rng, per_batch, f"training batch {i}") for i in range(1, 6)
    }
    batches["test_batch"] = cifar_batch(rng, n_test, "testing batch 1")
    for name, entries in (override or {}).items():
        batches[name] = {**batches[name], **entries}
    meta = {b"num_cases_per_batch": per_batch, b"label_names": LABEL_NAMES, b"num_vis": 3072}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in [*batches.items(), ("batches.meta", meta)]:
            if name in skip:
                continue
            blob = py2_pickle(obj) if py2 else pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return hashlib.md5(path.read_bytes()).hexdigest(), batches


def encode(image: np.ndarray, fmt: str, **options: object) -> bytes:
    """Encode uint8 [H, W, C] (or [H, W]) as JPEG or WEBP bytes (Pillow save options)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **({"quality": 95} | options))
    return buffer.getvalue()


def make_lmdb(path: Path, values: list[bytes]) -> list[bytes]:
    """Write an LMDB folder of ``values`` under sortable hex keys; returns the keys in order."""
    keys = [hashlib.sha1(str(i).encode()).hexdigest().encode() for i in range(len(values))]
    keys = [f"{i:08d}".encode() + k[:8] for i, k in enumerate(keys)]
    env = lmdb.open(str(path), map_size=1 << 28)
    with env.begin(write=True) as txn:
        for key, value in zip(keys, values, strict=True):
            txn.put(key, value)
    env.close()
    return keys


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random colour field, uint8 [H, W, 3] (compresses well, survives JPEG)."""
    y = np.linspace(0, 1, height)[:, None, None]
    x = np.linspace(0, 1, width)[None, :, None]
    a, b, c = rng.random((3, 1, 1, 3))
    return np.rint(255 * np.clip(a + (b - a) * x * 0.7 + (c - a) * y * 0.3, 0, 1)).astype(np.uint8)


def one_preset(data: dict, scale: str = "t") -> dict:
    """params.yaml's content with one preset, ``scale``, whose data section is ``data``; other
    sections default, but for the evaluation, which must fit the splits (params are checked
    across sections when loaded): no NLL (the default 10,000 test images are CIFAR10's), and
    for LSUN without a test split, FID against the training set only."""
    preset: dict = {"data": data}
    dataset = str(data.get("dataset", "cifar10"))
    if dataset != "cifar10":
        preset["eval"] = {"nll_images": 0}
    if dataset.startswith("lsun_") and not data.get("test_fraction"):
        preset["eval"]["fid_against"] = ["train"]
    return {"scale": scale, "presets": {scale: preset}}


def data_config(**data: object) -> Config:
    """A resolved config (scale ``t``) whose data section is ``data``, other sections default."""
    return config_from_dict(one_preset(data))


def ddpm_unet(layout: dict, out_channels: int = 3, seed: int = 0, layers_per_block: int = 2):
    """A randomly initialised diffusers UNet2DModel in the published DDPM configuration."""
    import diffusers
    import torch

    model = diffusers.UNet2DModel(
        in_channels=3,
        out_channels=out_channels,
        layers_per_block=layers_per_block,
        attention_head_dim=None,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_eps=1e-6,
        norm_num_groups=32,
        act_fn="silu",
        **layout,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every tensor random: a mapping error cannot hide behind zeros
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()
