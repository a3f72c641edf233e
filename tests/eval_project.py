"""A throwaway project for the evaluation tests: tiny params, prepared data, weights, samples.

The tiny preset (8x8 synthetic images, T = 20) with the data made by the real ``prepare`` code,
a U-Net of the tiny architecture with random non-zero weights (so that its outputs depend on
them) saved in the train stage's format, and samples either drawn by the real sample stage or
written by hand (for the error cases).
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from repo_copy import PARAMS

from pipeline.atomic import save_npz
from pipeline.config import Config, config_from_dict
from pipeline.data import prepare
from pipeline.layout import data_dir
from pipeline.model.unet import UNet
from pipeline.model.weights import save_weights, sha256_file

ROOT = Path(__file__).resolve().parents[1]
VARIANT = "eps_fixed_mse"


@functools.cache
def _repo_params() -> dict[str, Any]:
    return yaml.safe_load(PARAMS.read_text())


def tiny_params(**eval_: Any) -> dict[str, Any]:
    """The repo's params.yaml at scale tiny, ``eval_`` overriding its eval keys.

    The He-initialised stand-in Inception unless ``eval_`` says otherwise: these projects have
    no featurenet stage (tests/test_featurenet.py covers the classifier).
    """
    raw = copy.deepcopy(_repo_params())
    raw["scale"] = "tiny"
    raw["presets"]["tiny"]["eval"].update({"inception_weights": "stand-in", **eval_})
    return raw


def tiny_config(**eval_: Any) -> Config:
    return config_from_dict(tiny_params(**eval_))


def tiny_unet(out_channels: int = 3, seed: int = 0, resolution: int = 8) -> UNet:
    """The tiny preset's network with random weights of scale 0.05."""
    model = UNet(resolution, 3, out_channels, 32, (1, 2), 1, (4,), 0.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def make_project(root: Path, **eval_: Any) -> Config:
    """params.yaml (scale tiny) and data/tiny in ``root``; returns the config."""
    raw = tiny_params(**eval_)
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    cfg = config_from_dict(raw)
    prepare(cfg, root / data_dir(cfg.scale))
    return cfg


def make_model(
    root: Path, variant: str = VARIANT, seed: int = 0, run_id: str | None = None, **meta: Any
) -> Path:
    """models/<variant>/ema.pt and model.json as the train stage leaves them."""
    types = _repo_params()["variants"][variant]
    folder = root / "models" / variant
    folder.mkdir(parents=True, exist_ok=True)
    out = 6 if types["var_type"] == "learned" else 3
    resolution = meta.pop("resolution", 8)
    save_weights(folder / "ema.pt", tiny_unet(out, seed, resolution), {"variant": variant})
    info = {"variant": variant, **types, "scale": "tiny", "mlflow_run_id": run_id}
    info.update(ema_sha256=sha256_file(folder / "ema.pt"), resolution=resolution, source="test")
    info.update(meta)
    (folder / "model.json").write_text(json.dumps(info))
    return folder


def write_samples(
    root: Path, images: np.ndarray, variant: str = VARIANT, block_size: int = 4
) -> Path:
    """samples/<variant>/ as the sample stage leaves it: block shards of ``block_size`` images
    (hard-linked from work/sample/<variant>/test/) and a manifest naming the variant's weights.
    Returns the folder."""
    from pipeline.atomic import write_json
    from pipeline.cluster.blocks import block_ranges, shard_path
    from pipeline.sampling.shards import publish_shards

    blocks = root / "work" / "sample" / variant / "test"
    for start, stop in block_ranges(len(images), block_size):
        save_npz(shard_path(blocks, start, stop), images=images[start:stop])
    folder = root / "samples" / variant
    folder.mkdir(parents=True, exist_ok=True)
    weights = sha256_file(root / "models" / variant / "ema.pt")
    manifest = {"variant": variant, "weights_sha256": weights}
    manifest.update(publish_shards(blocks, len(images), block_size, folder))
    write_json(folder / "manifest.json", manifest)
    return folder


def link_stand_in(root: Path, weights_path: Path) -> None:
    """The reference stage's stand-in Inception weights, hard-linked into ``root``."""
    folder = root / "work" / "fidelity" / "weights"
    folder.mkdir(parents=True, exist_ok=True)
    os.link(weights_path, folder / weights_path.name)
