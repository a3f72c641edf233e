"""A throwaway project folder for the training tests: params at the tiny scale, prepared data.

The tiny preset (8x8 synthetic images, U-Net ch 32, ch_mult [1, 2], T = 20, dropout 0) with a
few overrides; its data comes from the real ``prepare`` code (64 images, milliseconds).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml
from repo_copy import PARAMS

from pipeline.config import Config, config_from_dict
from pipeline.data import prepare
from pipeline.layout import data_dir

ROOT = Path(__file__).resolve().parents[1]
VARIANT = "eps_fixed_mse"
# 12 steps of batch 8 over two workers; a checkpoint and a log line every 4 steps.
TRAIN = {
    "steps": 12,
    "batch_size": 8,
    "log_every": 4,
    "checkpoint_every": 4,
    "keep_checkpoints": 2,
    "num_workers": 2,
    "max_failures": 2,
}


@functools.cache
def _repo_params() -> dict[str, Any]:
    return yaml.safe_load(PARAMS.read_text())


def tiny_params(**train: Any) -> dict[str, Any]:
    """The repo's params.yaml at scale tiny, with TRAIN and ``train`` overriding its train keys."""
    raw = copy.deepcopy(_repo_params())
    raw["scale"] = "tiny"
    raw["presets"]["tiny"]["train"].update({**TRAIN, **train})
    if "seed" in train:  # the main seed is seeds[0] (params check): one seed, this one
        raw["seeds"], raw["extra_seeds"] = [train["seed"]], []
    return raw


def tiny_config(**train: Any) -> Config:
    return config_from_dict(tiny_params(**train))


def make_project(root: Path, **train: Any) -> Config:
    """params.yaml and data/tiny in ``root``; returns the config."""
    raw = tiny_params(**train)
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    cfg = config_from_dict(raw)
    prepare(cfg, root / data_dir(cfg.scale))
    return cfg


def registered(runs: Path, name: str) -> bool:
    """Whether Ray Train's controller has recorded checkpoint ``name`` in a run's snapshot
    (``checkpoint_manager_snapshot.json``, written asynchronously: maybe not there yet)."""
    for snapshot in runs.glob("*/checkpoint_manager_snapshot.json"):
        try:
            if name in snapshot.read_text():
                return True
        except FileNotFoundError:  # replaced meanwhile
            continue
    return False
