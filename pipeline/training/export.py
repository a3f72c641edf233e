"""The train stage's output: a finished run's weights in ``models/<variant>/``, atomically.

::

    models/<variant>/
      ema.pt      the EMA weights (what sampling and evaluation load, pipeline.model.weights)
      model.pt    the raw weights at the same step
      model.json  variant, types, scale, steps, resolution, run_name, ema_sha256, ...

The folder is written to a temporary sibling and renamed into place (pipeline.atomic), so an
interrupted export never leaves a folder that looks complete. Its bytes are a function of the
checkpoint, the params and the run's name only: DVC records their hash in dvc.lock, and two runs
of the same params (serial or side by side on a cluster) must record the same. So no MLflow run
id and no seconds here: the run id is in the run folder's ``mlflow_run.json`` and on the MLflow
run as the tag ``ddpm.ray_run`` = ``run_name`` (later stages find it from model.json's
``run_name``: pipeline.cluster.runrecord), the seconds in MLflow and the stage's output line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_dir, write_json
from pipeline.config import Config, Variant
from pipeline.model.unet import build_unet
from pipeline.model.weights import save_weights, sha256_file
from pipeline.training.checkpoint import read_checkpoint
from pipeline.training.loop import make_diffusion


def export_weights(
    checkpoint: str | Path,
    out: str | Path,
    cfg: Config,
    variant: Variant,
    run: dict[str, str],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ema.pt, model.pt and model.json from a checkpoint folder; returns model.json.

    ``extra`` is added to model.json (e.g. ``selection``: which checkpoint and why).
    """
    payload = read_checkpoint(checkpoint)
    step = int(payload["step"])
    meta = {
        **variant.describe(),
        "scale": cfg.scale,
        "diffusion": dataclasses.asdict(cfg.diffusion),
        "step": step,
        "run_name": run["name"],
        "source": "trained",
    }
    out_channels = make_diffusion(cfg, variant).model_output_channels(3)
    net = build_unet(cfg.model, cfg.data.resolution, out_channels=out_channels)
    with atomic_dir(out) as tmp:
        for name, key in (("ema.pt", "ema"), ("model.pt", "model")):
            net.load_state_dict(payload[key])
            save_weights(tmp / name, net, {**meta, "weights": key})
        info = {
            **variant.describe(),
            "scale": cfg.scale,
            "resolution": cfg.data.resolution,
            "steps": step,
            "ema_sha256": sha256_file(tmp / "ema.pt"),
            "model_sha256": sha256_file(tmp / "model.pt"),
            "source": "trained",
            "train_config_hash": run["config_hash"],
            "run_name": run["name"],
            "ema_decay": cfg.train.ema_decay,
            "stand_in": cfg.stand_in_reasons(),
            **(extra or {}),
        }
        write_json(tmp / "model.json", info)
    return info
