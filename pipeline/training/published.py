"""Published weights in place of training: ``model.source: checkpoint``.

A scale whose model section says ``source: checkpoint`` evaluates a converted published
checkpoint (diffusers format, pipeline.model.convert) instead of training: the train stage of the
variant named by ``model.checkpoint_variant`` (the paper's released CIFAR10 and LSUN models are
L_simple, ``eps_fixed_mse``) imports the weights into models/<variant>/ and opens an MLflow run
tagged "published weights" with the checkpoint's sha256; sampling, evaluation and the report
then treat it like a trained variant. The other variants are not run at that scale: their
stages write small markers (every declared DVC output exists, each says why it is empty) and the
report shows them as not run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

from pipeline import layout
from pipeline.atomic import atomic_dir, write_json, write_text
from pipeline.config import Config, Variant
from pipeline.errors import ConfigError
from pipeline.report import tracking

PUBLISHED = "published weights"
SKIPPED_KEY = "skipped"
SKIPPED_FILE = "SKIPPED.txt"
# diffusers' prediction_type for each mean_type it has (it has no x_{t-1}-mean prediction)
PREDICTION_TYPES = {"eps": "epsilon", "xstart": "sample"}
# diffusers' variance_type -> ours (the _log forms are the same variance, another parameterisation)
VARIANCE_TYPES = {
    "fixed_small": "fixedsmall",
    "fixed_small_log": "fixedsmall",
    "fixed_large": "fixedlarge",
    "fixed_large_log": "fixedlarge",
    "learned": "learned",
    "learned_range": "learned_range",
}


def skip_reason(cfg: Config, variant: str) -> str | None:
    """Why ``variant`` is not run at this scale, or None when it is."""
    chosen = cfg.train.variants
    if chosen is not None and variant not in chosen:
        names = ", ".join(chosen)
        return f"scale {cfg.scale} trains {names} only (presets.{cfg.scale}.train.variants)"
    if cfg.model.source == "checkpoint" and variant != cfg.model.checkpoint_variant:
        return (
            f"scale {cfg.scale} evaluates the published weights of "
            f"{cfg.model.checkpoint_variant} only"
        )
    return None


def is_skipped(meta: dict[str, Any]) -> bool:
    """Whether a model.json / manifest / metrics file is a not-run marker."""
    return SKIPPED_KEY in meta


def _mark_folder(folder: Path, reason: str) -> None:
    """A persistent work folder of a variant not run: it exists and says why it is empty."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / SKIPPED_FILE, reason + "\n")


def _marker(cfg: Config, variant: str, reason: str) -> dict[str, Any]:
    return {"variant": variant, "scale": cfg.scale, SKIPPED_KEY: reason}


def skip_train(cfg: Config, variant: str, reason: str) -> None:
    """The train stage's outputs for a variant that is not run: a marker model.json."""
    key = cfg.run_key(variant)  # this training seed's folders
    with atomic_dir(layout.model_dir(key)) as tmp:
        write_json(tmp / "model.json", _marker(cfg, variant, reason))


def skip_sample(cfg: Config, variant: str, reason: str) -> None:
    """The sample stage's outputs for a variant that is not run."""
    key = cfg.run_key(variant)  # this training seed's folders
    with atomic_dir(layout.samples_dir(key)) as tmp:
        write_json(tmp / "manifest.json", _marker(cfg, variant, reason))
    _mark_folder(layout.work_dir("sample", key), reason)


def skip_evaluate(cfg: Config, variant: str, reason: str) -> None:
    """The evaluate stage's outputs for a variant that is not run (DVC needs every one)."""
    from pipeline.evaluation.outputs import CSV_COLUMNS

    key = cfg.run_key(variant)  # this training seed's folders
    with atomic_dir(layout.figures_dir(key)) as tmp:
        write_text(tmp / SKIPPED_FILE, reason + "\n")
    with atomic_dir(layout.plots_dir(key)) as tmp:  # header only: what DVC plots can read
        write_text(tmp / "rate_distortion.csv", ",".join(CSV_COLUMNS) + "\n")
    for stage in ("nll", "fid"):
        _mark_folder(layout.work_dir(stage, key), reason)
    write_json(layout.metrics_path(key), _marker(cfg, variant, reason))


def _check_schedule(cfg: Config, scheduler: dict[str, Any] | None, where: str) -> None:
    """The checkpoint's DDPMScheduler must describe the params' forward process."""
    if scheduler is None:
        return
    d = cfg.diffusion
    want = {
        "num_train_timesteps": d.num_timesteps,
        "beta_start": d.beta_start,
        "beta_end": d.beta_end,
        "beta_schedule": d.schedule,
    }
    wrong = {
        k: scheduler.get(k)
        for k, v in want.items()
        if not (
            math.isclose(cast(float, scheduler.get(k)), v, rel_tol=1e-9)
            if isinstance(v, float) and isinstance(scheduler.get(k), int | float)
            else scheduler.get(k) == v
        )
    }
    if wrong:
        raise ConfigError(
            f"{where}: the checkpoint was trained with {wrong}, but presets.{cfg.scale}.diffusion "
            f"says { ({k: want[k] for k in wrong}) }"
        )
    if scheduler.get("trained_betas") is not None:
        raise ConfigError(f"{where}: the checkpoint uses trained_betas; only a linear schedule is")


def _check_variance(
    cfg: Config, variant: Variant, scheduler: dict[str, Any] | None, where: str
) -> None:
    """The checkpoint's sampler variance (scheduler ``variance_type``) must be the one we sample
    with (``sample.var_type``, else the variant's): one line naming both otherwise."""
    from pipeline.sampling.job import sampler_var_type

    if scheduler is None:
        return
    theirs: Any = scheduler.get("variance_type")  # a JSON value: a str in a valid file
    ours = sampler_var_type(cfg, variant)
    if VARIANCE_TYPES.get(theirs, theirs) != ours:
        raise ConfigError(
            f"{where}: the checkpoint's scheduler samples with variance_type {theirs!r}, but "
            f"this scale samples with {ours!r}; set presets.{cfg.scale}.sample.var_type to "
            f"{VARIANCE_TYPES.get(theirs, theirs)!r} (fixedsmall: beta~_t, fixedlarge: beta_t)"
        )


def import_checkpoint(cfg: Config, variant: Variant) -> tuple[dict[str, Any], str]:
    """Convert ``cfg.model.checkpoint`` into models/<variant>/; returns its model.json and the
    MLflow run id (tagged with model.json's run_name, not written into it: dvc.lock hashes it)."""
    from pipeline.model.convert import SCHEDULER_DEFAULTS, load_diffusers_unet, scheduler_info
    from pipeline.model.diffusion import GaussianDiffusion, linear_beta_schedule
    from pipeline.model.weights import save_weights, sha256_file

    source = cfg.model.checkpoint
    where = f"presets.{cfg.scale}.model.checkpoint"
    if not source:
        raise ConfigError(f"{where}: set it to the folder of a diffusers-format DDPM checkpoint")
    model, info = load_diffusers_unet(source)
    if model.resolution != cfg.data.resolution:
        raise ConfigError(
            f"{where}: the checkpoint is for {model.resolution}x{model.resolution} images, "
            f"but presets.{cfg.scale}.data.resolution is {cfg.data.resolution}"
        )
    d = cfg.diffusion
    betas = linear_beta_schedule(d.num_timesteps, d.beta_start, d.beta_end)
    diffusion = GaussianDiffusion(betas, variant.mean_type, variant.var_type, variant.loss_type)
    needed = diffusion.model_output_channels(3)
    if model.out_channels != needed:
        raise ConfigError(
            f"{where}: the checkpoint outputs {model.out_channels} channels; variant "
            f"{variant.name} ({variant.var_type} variance) needs {needed}"
        )
    scheduler = scheduler_info(source)
    _check_schedule(cfg, scheduler, where)
    predicts = (scheduler or SCHEDULER_DEFAULTS)["prediction_type"]  # no config: diffusers' default
    if PREDICTION_TYPES.get(variant.mean_type) != predicts:
        raise ConfigError(
            f"{where}: the checkpoint predicts {predicts!r} (scheduler prediction_type), but "
            f"presets.{cfg.scale}.model.checkpoint_variant {variant.name} predicts "
            f"{variant.mean_type!r}; use a variant whose mean_type matches (eps for 'epsilon')"
        )
    _check_variance(cfg, variant, scheduler, where)
    # the run's name (model.json's run_name, the MLflow tag ddpm.ray_run): how the later
    # stages find the MLflow run (pipeline.cluster.runrecord; model.json holds no run id)
    run_name = f"{variant.name}-published-{info['sha256'][:12]}"
    run_id = tracking.start_variant_run(
        cfg,
        variant,
        tags={
            "ddpm.checkpoint": str(Path(source).resolve()),
            "ddpm.checkpoint_sha256": info["sha256"],
            tracking.TAG_RUN: run_name,
        },
    )
    meta = {
        **variant.describe(),
        "scale": cfg.scale,
        "source": PUBLISHED,
        "weights": "ema",
    }
    with atomic_dir(layout.model_dir(variant.name)) as tmp:
        save_weights(tmp / "ema.pt", model, {**meta, "checkpoint": info})
        model_json = {
            **meta,
            "resolution": model.resolution,
            "run_name": run_name,
            "ema_sha256": sha256_file(tmp / "ema.pt"),
            "checkpoint": str(source),  # as params say it (resolved: the MLflow tag)
            "checkpoint_weights": info["weights"],
            "checkpoint_sha256": info["sha256"],
            "scheduler": {k: v for k, v in (scheduler or {}).items() if not k.startswith("_")},
            "stand_in": cfg.stand_in_reasons(),
        }
        write_json(tmp / "model.json", model_json)
    return model_json, run_id
