"""Stage ``export``'s work: a trained variant as a diffusers folder, a model card and an MLflow
model (docs/export.md).

:func:`write_export` writes ``export/<V>/`` atomically from ``models/<V>/`` (the selected EMA
weights), ``metrics/<V>.json``, the report stage's table CSV and ``samples/<V>/grid.png``:

::

    export/<V>/
      model_index.json, unet/, scheduler/  the diffusers pipeline (unet/ only where diffusers
                                           cannot sample the variant: diffusers_export)
      ddpm.json                            our sampler's settings and the weights' sha256
      README.md                            the model card (pipeline.report.model_card)
      samples.png                          the sample stage's grid

Its bytes are a function of the weights, the params, the metrics and the git commit (on the
card). :func:`register` then logs the folder to the variant's MLflow run and registers it
(pipeline.report.registry).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import layout
from pipeline.atomic import atomic_dir
from pipeline.choices import VarType
from pipeline.config import Config, Variant
from pipeline.errors import DataError
from pipeline.model.diffusers_export import scheduler_config, write_diffusers_folder
from pipeline.model.weights import load_weights, sha256_file
from pipeline.report import model_card, tables
from pipeline.report.tracking import git_commit

TRAIN_KEYS = ("steps", "batch_size", "lr", "warmup", "grad_clip", "ema_decay", "seed")


@dataclass
class Exported:
    """What :func:`write_export` wrote."""

    folder: Path
    facts: model_card.CardFacts
    run_name: str | None  # model.json's: the MLflow run to log the model into


def report_table(cfg: Config, root: Path) -> tuple[str, pd.DataFrame | None]:
    """The report stage's headline table of the scale's dataset: (title, its CSV or None)."""
    lsun = tables.is_lsun(cfg.data.dataset)
    stem, title = ("table3", "Table 3") if lsun else ("table2", "Table 2")
    path = root / layout.REPORTS / f"{stem}.csv"
    return title, pd.read_csv(path) if path.is_file() else None


def weights_lock_hash(cfg: Config, variant: str, root: Path) -> str | None:
    """The hash dvc.lock records for ``models/<V>`` (stage train@V's output, e.g.
    ``md5 9b05...dir``), or None when dvc.lock has no such entry yet."""
    import yaml

    path = root / "dvc.lock"
    try:
        stages = yaml.safe_load(path.read_text()).get("stages", {})
        outs = stages[cfg.stage_name("train", variant)]["outs"]
    except (OSError, AttributeError, KeyError, TypeError, yaml.YAMLError):
        return None
    for out in outs:
        if out.get("path") == str(layout.model_dir(variant)) and out.get("hash") in out:
            return f"{out['hash']} {out[out['hash']]}"
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found (run the pipeline first: dvc repro)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object")
    return value


def write_export(
    cfg: Config, variant: Variant, sampler_var_type: VarType, root: Path = Path(".")
) -> Exported:
    """Write ``export/<V>/`` (see the module docstring), all or nothing."""
    name = variant.name
    weights = root / layout.model_dir(name) / "ema.pt"
    model, _ = load_weights(weights)
    meta = _read_json(root / layout.model_dir(name) / "model.json")
    metrics = _read_json(root / layout.metrics_path(name))
    d = cfg.diffusion
    scheduler, reason = scheduler_config(
        d.num_timesteps, d.beta_start, d.beta_end, variant.mean_type, sampler_var_type
    )
    title, table = report_table(cfg, root)
    train = {k: getattr(cfg.train, k) for k in TRAIN_KEYS if hasattr(cfg.train, k)}
    facts = model_card.CardFacts(
        name=registry_name(cfg, name),
        variant=name,
        scale=cfg.scale,
        dataset=cfg.data.dataset,
        types={
            "mean_type": variant.mean_type,
            "var_type": variant.var_type,
            "sampler_var_type": sampler_var_type,
            "loss_type": variant.loss_type,
        },
        resolution=cfg.data.resolution,
        num_timesteps=d.num_timesteps,
        betas=(d.beta_start, d.beta_end),
        train=train,
        steps_trained=meta.get("steps", meta.get("step")),
        weights_sha256=sha256_file(weights),
        weights_lock=weights_lock_hash(cfg, name, root),
        git_commit=git_commit(root),
        metrics=metrics,
        table=title,
        row=model_card.table_row(table, name) if table is not None else {},
        diffusers_reason=reason,
        stand_in_reasons=cfg.stand_in_reasons(),
    )
    spec = {
        "variant": name,
        "scale": cfg.scale,
        **facts.types,
        "diffusion": {
            "num_timesteps": d.num_timesteps,
            "beta_start": d.beta_start,
            "beta_end": d.beta_end,
            "schedule": "linear",
        },
        "clip_denoised": True,
        "diffusers": {"pipeline": scheduler is not None, "reason": reason},
        "ema_sha256": facts.weights_sha256,
    }
    folder = root / layout.export_dir(name)
    with atomic_dir(folder) as tmp:
        write_diffusers_folder(tmp, model, scheduler)
        (tmp / "ddpm.json").write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card.render_card(facts))
        grid = root / layout.samples_dir(name) / "grid.png"
        if grid.is_file():
            shutil.copyfile(grid, tmp / "samples.png")
    return Exported(folder, facts, meta.get("run_name"))


def registry_name(cfg: Config, variant: str) -> str:
    """``ddpm-<scale>-<variant>`` (pipeline.report.registry.model_name without mlflow)."""
    return f"ddpm-{cfg.scale}-{variant}"
