"""Stage ``prepare``: a scale's data source -> ``data/<scale>/`` (uint8 arrays and a manifest).

The dataset is ``presets.<scale>.data.dataset``. The output folder is written through
:func:`pipeline.atomic.atomic_dir` with the manifest last, and an existing one is removed first
(as ``dvc repro`` does), so a failed or interrupted run never leaves a folder that looks
complete. Downloads (cifar10) and LSUN's finished shards live outside it and are reused.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_dir
from pipeline.choices import LSUN_DATASETS
from pipeline.config import Config, DataConfig
from pipeline.data import cifar10, lsun, synthetic
from pipeline.data.manifest import FORMAT, write_manifest
from pipeline.errors import ConfigError
from pipeline.layout import data_dir


def check_data_config(data: DataConfig, where: str) -> None:
    """The data section's values that only this stage can judge; ConfigError naming the key."""
    if data.dataset == "cifar10" and data.resolution != 32:
        raise ConfigError(f"{where}.resolution: cifar10 images are 32x32 (got {data.resolution})")
    if data.dataset in LSUN_DATASETS and data.resolution != lsun.RESOLUTION:
        raise ConfigError(
            f"{where}.resolution: LSUN is prepared at 256x256 (got {data.resolution})"
        )
    checks = {
        "resolution": (data.resolution >= 4, "at least 4"),
        "n_train": (data.n_train > 0, "positive"),
        "n_test": (data.n_test >= 0, "0 or more"),
        "seed": (data.seed >= 0, "0 or more"),
        "shard_size": (data.shard_size > 0, "positive"),
        "workers": (data.workers >= 0, "0 (decode in this process) or more"),
        "max_images": (data.max_images is None or data.max_images > 0, "null or positive"),
        "max_corrupt_fraction": (0.0 <= data.max_corrupt_fraction <= 1.0, "in [0, 1]"),
        "test_fraction": (0.0 <= data.test_fraction < 1.0, "in [0, 1)"),
    }
    for key, (ok, expected) in checks.items():
        if not ok:
            raise ConfigError(f"{where}.{key} must be {expected} (got {getattr(data, key)!r})")


def partial_dir(out: Path) -> Path:
    """Where LSUN's finished shards wait for the rest (a hidden sibling of the output)."""
    return out.with_name(f".{out.name}.partial")


def prepare(
    cfg: Config, out: str | Path | None = None, downloads: Path = cifar10.DOWNLOADS
) -> dict[str, Any]:
    """Prepare ``cfg.data``'s dataset in ``out`` (default ``data/<scale>``); its manifest."""
    data, where = cfg.data, f"presets.{cfg.scale}.data"
    check_data_config(data, where)
    out = Path(out) if out is not None else data_dir(cfg.scale)
    if out.exists():
        shutil.rmtree(out)
    archive = cifar10.locate_archive(data, where, downloads) if data.dataset == "cifar10" else None
    with atomic_dir(out) as tmp:
        if data.dataset == "synthetic":
            manifest = synthetic.prepare_synthetic(data, tmp)
        elif data.dataset == "cifar10":
            assert archive is not None  # located above, before the output was removed
            manifest = cifar10.prepare_cifar10(data, tmp, archive)
        else:
            manifest = lsun.prepare_lsun(data, tmp, where, partial_dir(out))
        manifest = {"format": FORMAT, **manifest, "params": dataclasses.asdict(data)}
        write_manifest(tmp, manifest)
    return manifest


def summary(manifest: dict[str, Any], out: str | Path, seconds: float) -> str:
    """One line: what was prepared where, how many images, how fast."""
    parts = [
        f"{name} {s['count']} x {'x'.join(map(str, s['shape'][1:]))}"
        for name, s in manifest["splits"].items()
    ]
    total = sum(s["count"] for s in manifest["splits"].values())
    line = f"prepared {manifest['dataset']} in {out}: {', '.join(parts)} uint8"
    if manifest.get("corrupt", {}).get("count"):
        line += f", {manifest['corrupt']['count']} corrupt records skipped"
    line += f"; {total} images in {seconds:.1f} s ({total / max(seconds, 1e-9):.0f} images/s)"
    if manifest.get("synthetic"):
        line += f" [{manifest['note']}]"
    return line
