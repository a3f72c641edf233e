"""Throughput of the ``prepare`` stage on generated data in the official formats.

    python -m benchmarks.prepare_data [--records 400] [--workers 0 1 2] [--cifar-full]

LSUN: an LMDB of photo-like JPEG (quality 75) and WebP (quality 80) records whose shorter side is
256 (as LSUN distributes them, a crop only) or 300-512 (a Lanczos downscale), aspect ratios 1 to
1.5; prepared to 256x256 shards with ``workers`` decode processes. CIFAR10: a full-size archive
of random images (50,000 + 10,000) in the official layout. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import pickle
import tarfile
import tempfile
import time
from pathlib import Path

import lmdb
import numpy as np
from PIL import Image

from pipeline.config import config_from_dict
from pipeline.data import prepare


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth colour regions plus fine texture: compresses like a photograph, not like noise."""
    coarse = rng.random((height // 32 + 2, width // 32 + 2, 3)) * 255
    image = Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BICUBIC)
    texture = rng.normal(0, 12, (height, width, 3))
    return np.clip(np.asarray(image) + texture, 0, 255).astype(np.uint8)


def make_lsun_lmdb(path: Path, records: int, seed: int = 0) -> dict[str, float]:
    """Write ``records`` encoded images; returns the mix (share resized, mean record size)."""
    rng = np.random.default_rng(seed)
    env = lmdb.open(str(path), map_size=1 << 32)
    resized, total_bytes = 0, 0
    with env.begin(write=True) as txn:
        for i in range(records):
            short = 256 if rng.random() < 0.6 else int(rng.integers(300, 513))
            long = int(short * rng.uniform(1.0, 1.5))
            height, width = (short, long) if rng.random() < 0.5 else (long, short)
            buffer = io.BytesIO()
            fmt, quality = ("JPEG", 75) if i % 2 else ("WEBP", 80)
            Image.fromarray(photo_like(rng, height, width)).save(buffer, fmt, quality=quality)
            txn.put(f"{i:010d}".encode(), buffer.getvalue())
            resized += short != 256
            total_bytes += buffer.tell()
    env.close()
    return {"resized_share": resized / records, "mean_record_kb": total_bytes / records / 1024}


def make_cifar_archive(path: Path, seed: int = 0) -> str:
    """A full-size archive of random images in the official layout; returns its md5."""
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
        for name in names:
            if name == "batches.meta":
                obj = {b"label_names": [f"class{i}".encode() for i in range(10)]}
            else:
                obj = {
                    b"data": rng.integers(0, 256, (10000, 3072), dtype=np.uint8),
                    b"labels": rng.integers(0, 10, 10000).tolist(),
                }
            blob = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return hashlib.md5(path.read_bytes()).hexdigest()


def timed_prepare(data: dict, out: Path) -> tuple[float, dict]:
    # only the data section matters: no NLL or FID against a test split (LSUN has none)
    preset = {"data": data, "eval": {"nll_images": 0, "fid_against": ["train"]}}
    cfg = config_from_dict({"scale": "bench", "presets": {"bench": preset}})
    start = time.perf_counter()
    manifest = prepare(cfg, out)
    return time.perf_counter() - start, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--cifar-full", action="store_true", help="also a 60,000-image archive")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mix = make_lsun_lmdb(tmp / "lmdb", args.records)
        for workers in args.workers:
            data = {
                "dataset": "lsun_bedroom",
                "resolution": 256,
                "source": str(tmp / "lmdb"),
                "workers": workers,
                "shard_size": 100,
            }
            seconds, _ = timed_prepare(data, tmp / f"lsun{workers}")
            print(
                json.dumps(
                    {
                        "lsun_records": args.records,
                        "workers": workers,
                        **mix,
                        "seconds": round(seconds, 2),
                        "images_per_s": round(args.records / seconds, 1),
                    }
                )
            )
        if args.cifar_full:
            md5 = make_cifar_archive(tmp / "cifar-10-python.tar.gz")
            data = {"dataset": "cifar10", "source": str(tmp / "cifar-10-python.tar.gz"), "md5": md5}
            seconds, _ = timed_prepare(data, tmp / "cifar")
            print(
                json.dumps(
                    {
                        "cifar_images": 60000,
                        "seconds": round(seconds, 2),
                        "images_per_s": round(60000 / seconds),
                    }
                )
            )


if __name__ == "__main__":
    main()
