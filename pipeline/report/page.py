"""The parts of reports/index.html, collected from the pipeline's outputs and MLflow.

Read (all optional: a missing file is shown as "not produced"):

- the report stage's Markdown tables (reports/table<N>.md);
- samples/<V>/grid.png, samples/<V>/progressive.png and samples/<V>/manifest.json (sampler);
- figures/<V>/{reconstructions,interpolation,rate_distortion}.png (Figs. 7, 8, 5);
- plots/<V>/rate_distortion.csv (Fig. 5 across the variants);
- the first ``sample.grid_size`` training images of data/<scale> (the real grid);
- the variant runs' MLflow histories ``loss`` and ``fid_during_training``.

Everything is labelled stand-in where the run (tag ``stand_in``) or the scale is.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pandas as pd

from pipeline import layout
from pipeline.config import STAND_IN_NOTE, Config
from pipeline.report.html import (
    Figure,
    Page,
    VariantPart,
    compact,
    image_grid_png,
    line_plot_png,
)
from pipeline.report.tracking import TAG_STAND_IN, TAG_WORLD_SIZES
from pipeline.uri import redact_uri

log = logging.getLogger(__name__)

INDEX = "index.html"
FIGURES = (  # file in figures/<V>/, title, caption
    ("reconstructions.png", "Fig. 7: reconstructions", "x_0 reconstructed from x_t"),
    ("interpolation.png", "Fig. 8: interpolations", "between two test images at step t"),
    ("rate_distortion.png", "Fig. 5: distortion against rate", "test images"),
)
MEAN = {"xprev": "x_{t-1} prediction", "xstart": "x_0 prediction", "eps": "eps prediction"}
VAR = {"fixedlarge": "fixed variance (beta_t)", "fixedsmall": "fixed variance (beta~_t)"}
VAR["learned"] = "learned diagonal Sigma"
LOSS = {"kl": "L (true bound)", "mse": "L_simple (MSE)"}


def _read(path: Path) -> bytes | None:
    return compact(path.read_bytes()) if path.is_file() else None


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _stand_in(runs: pd.DataFrame, name: str, cfg: Config) -> bool:
    column = f"tags.{TAG_STAND_IN}"
    if name in runs.index and column in runs.columns:
        return str(runs.at[name, column]).lower() == "true"
    return bool(cfg.stand_in_reasons())


def variant_label(cfg: Config, name: str) -> str:
    """The variant's Table-2 row in words, e.g. 'eps prediction, fixed variance (beta_t), L_simple
    (MSE)'."""
    v = cfg.variants[name]
    parts = (
        MEAN.get(v.mean_type, v.mean_type),
        VAR.get(v.var_type, v.var_type),
        LOSS.get(v.loss_type, v.loss_type),
    )
    return ", ".join(parts)


def variant_part(cfg: Config, runs: pd.DataFrame, name: str, root: Path = Path(".")) -> VariantPart:
    """The figures of one variant."""
    stand_in = _stand_in(runs, name, cfg)
    samples = root / layout.samples_dir(name)
    manifest = _json(samples / "manifest.json")
    sampler = manifest.get("sampler", "")
    count = min(int(manifest.get("count", cfg.sample.grid_size)), cfg.sample.grid_size)
    grid = Figure(
        f"{name}: samples",
        _read(samples / "grid.png"),
        f"{count} samples; sampler: {sampler}" if sampler else "",
        stand_in,
    )
    figures = [
        Figure(
            f"{name}: Fig. 6, progressive generation",
            _read(samples / "progressive.png"),
            "x_0 predicted from x_t, t from T (left) to 1 (right)",
            stand_in,
        )
    ]
    folder = root / layout.figures_dir(name)
    for file, title, caption in FIGURES:
        figures.append(Figure(f"{name}: {title}", _read(folder / file), caption, stand_in))
    notes = []
    if name in runs.index:
        selection = runs.loc[name].get("tags.ddpm.selection")
        if isinstance(selection, str) and selection:
            notes.append(f"checkpoint: {selection}")
        eval_sampler = runs.loc[name].get("tags.ddpm.eval_sampler")
        if isinstance(eval_sampler, str) and eval_sampler:
            notes.append(f"FID during training sampled with: {eval_sampler}")
        notes += world_size_notes(runs.loc[name].get(f"tags.{TAG_WORLD_SIZES}"))
    if stand_in:
        notes.append(STAND_IN_NOTE)
    return VariantPart(name, variant_label(cfg, name), grid, figures, "; ".join(notes))


def world_size_notes(changes: object) -> list[str]:
    """One note per change of the training's world size (elastic training), from the run's tag
    ``STEP: FROM -> TO; ...`` (pipeline.training.worldsize): "world size 2 -> 1 at step 4"."""
    if not isinstance(changes, str):
        return []
    notes = []
    for change in changes.split(";"):
        step, _, sizes = change.partition(":")
        if sizes.strip():
            notes.append(f"world size {sizes.strip()} at step {step.strip()}")
    return notes


def real_grid(cfg: Config, root: Path = Path("."), stand_in: bool = False) -> Figure:
    """The first ``sample.grid_size`` training images of the scale's prepared data."""
    from pipeline.data.loaders import open_split

    title = f"real training images ({cfg.data.dataset})"
    try:
        images = open_split(root / layout.data_dir(cfg.scale), "train")
        n = min(len(images), cfg.sample.grid_size)
        png = compact(image_grid_png(images[:n]))
    except Exception as e:  # the page is still written; the figure says why it is missing
        log.warning("real images: %s", e)
        return Figure(title, None, f"could not read data/{cfg.scale}: {e}", stand_in)
    return Figure(title, png, f"the first {n} images of the training split", stand_in)


def _history(client, run_id: str, metric: str) -> tuple[list[float], list[float]]:
    points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))
    return [float(s) for s, _ in points], [float(v) for _, v in points]


def _curve_csv(path: Path, column: str) -> tuple[list[float], list[float]]:
    if not path.is_file():
        return [], []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [float(r["T_minus_t"]) for r in rows], [float(r[column]) for r in rows]


def curve_plots(
    cfg: Config, run_ids: dict[str, str], stand_in: bool, root: Path = Path(".")
) -> list[Figure]:
    """Training loss and FID during training (MLflow histories), Fig. 5 across the variants."""
    from mlflow import MlflowClient

    client = MlflowClient()
    label = f" ({cfg.scale} scale)"
    loss = {n: _history(client, r, "loss") for n, r in run_ids.items()}
    fid = {n: _history(client, r, "fid_during_training") for n, r in run_ids.items()}
    plots = [
        Figure(
            "Training loss",
            line_plot_png(loss, "training loss" + label, "training step", "loss", logy=True),
            "the variant's own objective (L or L_simple), every train.log_every steps",
            stand_in,
        )
    ]
    fid_png = line_plot_png(fid, "FID during training" + label, "training step", "FID")
    if fid_png is not None:  # only when train.eval_every > 0
        caption = f"{cfg.train.eval_samples} samples of the EMA weights per checkpoint"
        plots.append(Figure("FID during training", fid_png, caption, stand_in))
    for column, ylabel in (
        ("distortion_rmse", "distortion (RMSE, [0, 255])"),
        ("rate_bpd", "rate (bits/dim)"),
    ):
        series = {
            n: _curve_csv(root / layout.plots_dir(n) / "rate_distortion.csv", column)
            for n in run_ids
        }
        png = line_plot_png(series, f"Fig. 5: {ylabel}" + label, "reverse steps (T - t)", ylabel)
        plots.append(Figure(f"Fig. 5: {ylabel} across the variants", png, "test images", stand_in))
    return plots


def build_page(
    cfg: Config,
    runs: pd.DataFrame,
    run_ids: dict[str, str],
    tables_md: list[str],
    tracking_uri: str,
    commit: str | None = None,
    root: Path = Path("."),
) -> Page:
    """Every part of the page (the MLflow store must be set up: tracking.setup)."""
    reasons = cfg.stand_in_reasons()
    stand_in_note = f"{STAND_IN_NOTE} ({', '.join(reasons)})" if reasons else None
    stand_in = bool(reasons) or any(_stand_in(runs, n, cfg) for n in run_ids)
    sampler = f"respaced, {cfg.sample.steps} steps" if cfg.sample.steps else "all T steps"
    facts = [
        ("scale", cfg.scale),
        ("dataset", f"{cfg.data.dataset}, {cfg.data.resolution}x{cfg.data.resolution}"),
        ("diffusion", f"T = {cfg.diffusion.num_timesteps}"),
        ("training", f"{cfg.train.steps} steps, batch {cfg.train.batch_size}"),
        ("sampling", f"{cfg.sample.n_samples} samples, {sampler}"),
        ("variants", ", ".join(run_ids)),
        ("MLflow", f"{redact_uri(tracking_uri)}, experiment {cfg.mlflow.experiment}"),
        # the models leaving the pipeline (stage export, docs/export.md); <V>: a variant
        (
            "load with diffusers",
            'DDPMPipeline.from_pretrained("export/<V>")'
            f"(batch_size=4, num_inference_steps={cfg.diffusion.num_timesteps}).images",
        ),
        (
            "load from MLflow",
            f'mlflow.pyfunc.load_model("models:/ddpm-{cfg.scale}-<V>@best")'
            '.predict({"n": 4, "seed": 0})',
        ),
    ]  # no time of writing: DVC hashes the page into dvc.lock, equal for equal inputs
    if commit:
        facts.append(("git commit", commit))
    return Page(
        title=f"DDPM reproduction: {cfg.scale} scale",
        stand_in_note=stand_in_note,
        facts=facts,
        tables_md=tables_md,
        real_grid=real_grid(cfg, root, stand_in),
        variants=[variant_part(cfg, runs, n, root) for n in run_ids],
        plots=curve_plots(cfg, run_ids, stand_in, root),
    )
