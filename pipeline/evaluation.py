"""Evaluating one variant (stage ``evaluate``): FID/IS, the NLL bound, rate-distortion, figures.

- FID against the reference splits and IS of ``samples/<variant>/samples.npz`` through
  torch-fidelity (pipeline.fidelity), in this process, cached under ``work/fid/<variant>``.
- The NLL bound on the test set (and optionally a train subset) on Ray (pipeline.likelihood),
  resumable under ``work/nll/<variant>``; from its per-timestep sums the rate-distortion curve
  (pipeline.rate_distortion, Fig. 5, Table 4). ``eval.nll_images: 0`` skips both.
- Fig. 7 and Fig. 8 in one Ray task (pipeline.reconstruction), cached beside the NLL blocks.

Ray starts once, and only when a block or a figure must be computed. Outputs (written by
:func:`write_outputs`, all or nothing): ``metrics/<variant>.json``, ``plots/<variant>/`` (the
curve and the per-timestep terms as CSV) and ``figures/<variant>/`` (PNG), all logged to the
variant's MLflow run with the metric names the report reads (pipeline.tables).
"""

from __future__ import annotations

import contextlib
import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import layout, tables
from pipeline.atomic import atomic_dir, atomic_path, write_json
from pipeline.config import STAND_IN_NOTE, Config, Variant
from pipeline.data import open_split, read_manifest
from pipeline.errors import ConfigError, DataError
from pipeline.fidelity import (
    check_images,
    compute_fid_is,
    inception_options,
    reference_files,
    stand_in_label,
)
from pipeline.figures_eval import save_interpolation, save_rate_distortion, save_reconstructions
from pipeline.inception import resolve_inception_weights
from pipeline.likelihood import NllResult, compute_nll, eval_network, eval_resources
from pipeline.rate_distortion import rate_distortion, table4_rows
from pipeline.raycluster import init_ray
from pipeline.reconstruction import FigureSpec, lambdas, submit_figures
from pipeline.sampling import ModelInfo, load_model_info
from pipeline.tracking import TAG_STAND_IN, tracking_uri, variant_run

INCEPTION_CACHE = layout.WORK / "fidelity"  # the reference stage's (the stand-in weights)
CSV_COLUMNS = ("t", "steps", "rate_bpd", "distortion_rmse", "vb_bpd", "xstart_mse", "eps_mse")


# ---------------------------------------------------------------------------------------------
# Checks.


def check_eval_config(cfg: Config) -> None:
    """ConfigError for eval settings that params' types alone cannot rule out."""
    e, T, where = cfg.eval, cfg.diffusion.num_timesteps, f"presets.{cfg.scale}.eval"
    counts = {
        "nll_images": e.nll_images,
        "nll_train_images": e.nll_train_images,
        "recon_images": e.recon_images,
        "interp_pairs": e.interp_pairs,
        "seed": e.seed,
    }
    for key, value in counts.items():
        if value < 0:
            raise ConfigError(f"{where}.{key} must be >= 0 (got {value})")
    positive = {
        "recon_draws": e.recon_draws,
        "torch_threads": e.torch_threads,
        "cpus_per_worker": e.cpus_per_worker,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{where}.{key} must be positive (got {value})")
    if e.interp_lambdas < 2:
        raise ConfigError(f"{where}.interp_lambdas must be at least 2 (0 and 1)")
    steps_1based = {"recon_ts": e.recon_ts, "rd_steps": e.rd_steps, "interp_t": [e.interp_t]}
    for key, steps in steps_1based.items():
        bad = [t for t in steps if not 1 <= t <= T]
        if bad:
            raise ConfigError(f"{where}.{key}: {bad} outside [1, {T}] (1-based, T = {T})")
    if e.use_gpu and e.gpus_per_worker <= 0:
        raise ConfigError(f"{where}.gpus_per_worker must be positive with use_gpu (got 0)")


def load_samples(variant: str, info: ModelInfo, root: Path = Path(".")) -> tuple[np.ndarray, dict]:
    """samples/<variant>/samples.npz (``images``) and its manifest; DataError when missing/stale."""
    folder = root / layout.samples_dir(variant)
    path, manifest_path = folder / "samples.npz", folder / "manifest.json"
    hint = f"run `dvc repro sample@{variant}`"
    for p in (path, manifest_path):
        if not p.is_file():
            raise DataError(f"{p}: not found ({hint})")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("weights_sha256") not in (None, info.sha256):
        raise DataError(f"{path}: drawn from other weights than {info.weights} ({hint})")
    try:
        with np.load(path, allow_pickle=False) as f:
            images = f["images"]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: unreadable samples ({type(e).__name__}); {hint}") from None
    return images, manifest


def check_resolution(
    cfg: Config, info: ModelInfo, samples: np.ndarray, variant: str, root: Path = Path(".")
) -> None:
    """DataError unless the network, the samples and the prepared data share one resolution."""
    data = int(read_manifest(root / layout.data_dir(cfg.scale))["resolution"])
    found = {"the network": info.meta.get("resolution", data), "the samples": samples.shape[1]}
    bad = {k: v for k, v in found.items() if v != data}
    if bad:
        what = ", ".join(f"{k} {v}x{v}" for k, v in bad.items())
        raise DataError(
            f"{variant}: {what}, but data/{cfg.scale} holds {data}x{data} images; "
            f"rerun `dvc repro train@{variant} sample@{variant}`"
        )


# ---------------------------------------------------------------------------------------------
# The evaluation.


@dataclass
class Evaluation:
    """Everything the evaluate stage writes for one variant."""

    variant: str
    metrics: dict[str, Any]  # metrics/<variant>.json
    label: dict[str, Any]  # stand_in_label
    nll: dict[str, NllResult] = field(default_factory=dict)  # by split
    curve: dict[str, np.ndarray] | None = None  # rate_distortion over the test split
    figures: dict[str, np.ndarray] = field(default_factory=dict)  # reconstruction arrays
    spec: FigureSpec | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds
    run_id: str | None = None


class _Clock:
    """Seconds spent per part, and a Ray connect that counts its own start-up."""

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.seconds = cfg, {}

    def add(self, part: str, started: float) -> None:
        self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - started

    def connect(self) -> None:
        import ray

        if not ray.is_initialized():
            started = time.perf_counter()
            init_ray(self.cfg.ray)
            self.add("ray_init", started)


def evaluate_variant(cfg: Config, variant: Variant, root: Path = Path(".")) -> Evaluation:
    """Compute every metric and figure of ``variant`` (see the module docstring).

    Every input is checked (one-line DataError) before any long computation starts.
    """
    clock, started = _Clock(cfg), time.perf_counter()
    info = load_model_info(root / layout.model_dir(variant.name), variant, cfg.scale)
    samples, sample_manifest = load_samples(variant.name, info, root)
    hint = f"rerun `dvc repro sample@{variant.name}`"
    check_images(samples, f"samples/{variant.name}", max(2, cfg.sample.n_samples), hint=hint)
    check_resolution(cfg, info, samples, variant.name, root)
    weights = resolve_inception_weights(cfg.eval, root / INCEPTION_CACHE)
    synthetic = bool(read_manifest(root / layout.data_dir(cfg.scale)).get("synthetic"))
    result = Evaluation(variant.name, {}, stand_in_label(cfg, weights, synthetic))
    result.run_id = info.meta.get("mlflow_run_id")
    t0 = time.perf_counter()
    fid = compute_fid_is(
        samples,
        reference_files(root / layout.reference_dir(cfg.scale)),
        weights,
        cache_root=root / layout.work_dir("fid", variant.name),
        is_splits=cfg.eval.is_splits,
        expected=cfg.sample.n_samples,
        **inception_options(cfg.eval),
    )
    clock.add("fid_is", t0)
    t0 = time.perf_counter()
    run_on_ray(cfg, variant, info, result, clock, root)
    clock.add("nll_and_figures", t0)
    result.metrics = metrics_json(cfg, variant, fid, result, sample_manifest)
    clock.add("total", started)
    result.timings = clock.seconds
    return result


def run_on_ray(
    cfg: Config, variant: Variant, info: ModelInfo, result: Evaluation, clock: _Clock, root: Path
) -> None:
    """The figures' task and the NLL blocks (test, then train), sharing the Ray workers.

    Fills ``result.figures``, ``result.spec``, ``result.nll`` and ``result.curve``.
    """
    network = eval_network(cfg, variant, info.weights)
    digest = network.weights_digest()
    result.spec = figure_spec(cfg, root)
    work = root / layout.work_dir("nll", variant.name)
    resources = eval_resources(cfg)
    pending = submit_figures(network, digest, result.spec, work, resources, clock.connect)
    for split, count in (("test", cfg.eval.nll_images), ("train", cfg.eval.nll_train_images)):
        if count > 0:
            result.nll[split] = compute_nll(
                cfg, variant.name, network, digest, split, count, root, clock.connect
            )
    result.figures = pending.result()
    if "test" in result.nll:
        s = result.nll["test"].summary
        result.curve = rate_distortion(s["vb_sum"], s["prior_sum"], s["xstart_mse_sum"], s["count"])


def figure_spec(cfg: Config, root: Path = Path(".")) -> FigureSpec:
    """Fig. 7 and 8 settings with their test images (the first images of the test split)."""
    e = cfg.eval
    test = open_split(root / layout.data_dir(cfg.scale), "test")
    n_recon = min(e.recon_images, len(test))
    pairs = min(e.interp_pairs, len(test) // 2)
    both = test[: 2 * pairs]
    return FigureSpec(
        recon_images=test[:n_recon],
        recon_ts=tuple(e.recon_ts),
        recon_draws=e.recon_draws,
        interp_sources=both[0::2],
        interp_targets=both[1::2],
        interp_t=e.interp_t,
        interp_lambdas=e.interp_lambdas,
        seed=e.seed,
    )


def metrics_json(
    cfg: Config, variant: Variant, fid: dict[str, Any], result: Evaluation, samples: dict
) -> dict[str, Any]:
    """The content of metrics/<variant>.json: deterministic (no timings), flat where it can be."""
    test, train = result.nll.get("test"), result.nll.get("train")
    out: dict[str, Any] = {
        "fid_train": fid["fid_train"],
        "fid_test": fid["fid_test"],
        "is_mean": fid["is_mean"],
        "is_std": fid["is_std"],
        "n_samples": fid["n_samples"],
        "sampler": samples.get("sampler"),
        "nll_bpd": test.summary["nll_bpd"] if test else None,
        "nll_train_bpd": train.summary["nll_bpd"] if train else None,
        "nll_images": test.summary["count"] if test else 0,
        "nll_train_images": train.summary["count"] if train else 0,
    }
    if test:
        s = test.summary
        out["nll_prior_bpd"] = s["prior_sum"] / s["count"]
        out["nll_decoder_bpd"] = float(s["vb_bpd"][0])  # L_0, the distortion term in bits
        rows = table4_rows(result.curve, tuple(cfg.eval.rd_steps))
        out["table4"] = {
            str(r["steps"]): {"rate_bpd": r["rate_bpd"], "rmse": r["distortion_rmse"]} for r in rows
        }
    out.update(result.label)
    return {"variant": variant.name, "scale": cfg.scale, **out}


# ---------------------------------------------------------------------------------------------
# Outputs.


def figure_title(cfg: Config, result: Evaluation) -> str:
    """``<variant> (<scale> scale)``, with the stand-in note where it applies."""
    title = f"{result.variant} ({cfg.scale} scale)"
    if result.label["stand_in"]:
        reasons = ", ".join(result.label["stand_in_reasons"])
        title += f": {STAND_IN_NOTE} ({reasons})"
    return title


def write_figures(cfg: Config, result: Evaluation, folder: Path) -> list[Path]:
    """reconstructions.png (Fig. 7), interpolation.png (Fig. 8), rate_distortion.png (Fig. 5)."""
    title, spec, arrays, paths = figure_title(cfg, result), result.spec, result.figures, []
    if "recon_x_0" in arrays:
        paths.append(folder / "reconstructions.png")
        save_reconstructions(
            paths[-1],
            spec.recon_images,
            arrays["recon_x_t"],
            arrays["recon_x_0"],
            spec.recon_ts,
            title,
        )
    if "interp" in arrays:
        paths.append(folder / "interpolation.png")
        save_interpolation(
            paths[-1],
            spec.interp_sources,
            spec.interp_targets,
            arrays["interp"],
            lambdas(spec.interp_lambdas),
            spec.interp_t,
            title,
        )
    if result.curve is not None:
        paths.append(folder / "rate_distortion.png")
        n = result.nll["test"].summary["count"]
        save_rate_distortion(paths[-1], result.curve, f"{title}\nrate-distortion, {n} test images")
    return paths


def write_curve_csv(path: Path, result: Evaluation) -> None:
    """The curve and the per-timestep means, one row per 1-based t (header only without NLL)."""
    with atomic_path(path, ".csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        if result.curve is None:
            return
        s, c = result.nll["test"].summary, result.curve
        for j in range(len(c["steps"])):
            values = (
                c["rate_bpd"][j],
                c["distortion_rmse"][j],
                s["vb_bpd"][j],
                s["xstart_mse"][j],
                s["mse"][j],
            )
            writer.writerow([j + 1, int(c["steps"][j]), *(f"{v:.10g}" for v in values)])


def write_outputs(cfg: Config, result: Evaluation, root: Path = Path(".")) -> None:
    """figures/, plots/ and metrics/ of the variant, and its MLflow run, all or nothing."""
    name = result.variant
    with (
        atomic_dir(root / layout.figures_dir(name)) as figures,
        atomic_dir(root / layout.plots_dir(name)) as plots,
    ):
        pngs = write_figures(cfg, result, figures)
        write_curve_csv(plots / "rate_distortion.csv", result)
        log_to_mlflow(cfg, result, pngs, [plots / "rate_distortion.csv"])
    write_json(root / layout.metrics_path(name), result.metrics)


# ---------------------------------------------------------------------------------------------
# MLflow.


def mlflow_metrics(cfg: Config, result: Evaluation) -> dict[str, float]:
    """The run's metrics: pipeline.tables names, Table 4 values and the timings."""
    m = result.metrics
    out = {k: float(m[k]) for k in tables.METRICS if m.get(k) is not None}
    for n, row in m.get("table4", {}).items():
        out[tables.rd_metric("rate_bpd", int(n))] = row["rate_bpd"]
        out[tables.rd_metric("rmse", int(n))] = row["rmse"]
    for k in ("nll_prior_bpd", "nll_decoder_bpd"):
        if k in m:
            out[k] = m[k]
    out.update({f"eval_{k}_s": v for k, v in result.timings.items()})
    test = result.nll.get("test")
    if test is not None and test.run.items_per_s is not None:
        out["nll_images_per_s"] = test.run.items_per_s
    return out


def stand_in_tags(label: dict[str, Any]) -> dict[str, str]:
    """The report's tags: ``stand_in`` (true/false) and ``stand_in_reason``."""
    tags = {TAG_STAND_IN: str(bool(label["stand_in"])).lower()}
    if label["stand_in"]:
        tags["stand_in_reason"] = "; ".join(label["stand_in_reasons"])
    return tags


def log_to_mlflow(cfg: Config, result: Evaluation, figures: list[Path], plots: list[Path]) -> bool:
    """Metrics, tags, the curve as metric history and the files; False if there is no run."""
    if not result.run_id:
        return False
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        with variant_run(cfg, result.run_id):
            client, now = mlflow.MlflowClient(), int(time.time() * 1000)
            tags = stand_in_tags(result.label)
            mlflow.set_tags(tags)
            if "stand_in_reason" not in tags:
                with contextlib.suppress(MlflowException):
                    client.delete_tag(result.run_id, "stand_in_reason")
            mlflow.log_metrics(mlflow_metrics(cfg, result))
            history = _curve_history(result.curve, now) if result.curve is not None else []
            for i in range(0, len(history), 1000):  # log_batch takes 1000 metrics a call
                client.log_batch(result.run_id, metrics=history[i : i + 1000])
            for path in figures:
                mlflow.log_artifact(str(path), "figures")
            for path in plots:
                mlflow.log_artifact(str(path), "plots")
            mlflow.log_dict(result.metrics, f"metrics/{result.variant}.json")
    except MlflowException as e:
        raise DataError(
            f"MLflow run {result.run_id} of models/{result.variant}/model.json cannot be logged "
            f"to at {tracking_uri(cfg)} ({str(e).splitlines()[0]}); point MLFLOW_TRACKING_URI "
            f"at the store the train stage used, or rerun it"
        ) from None
    return True


def _curve_history(curve: dict[str, np.ndarray], timestamp: int) -> list:
    """rd_curve_rate_bpd and rd_curve_rmse with step = reverse steps (MLflow's chart view)."""
    from mlflow.entities import Metric

    out = []
    for j in range(len(curve["steps"])):
        step = int(curve["steps"][j])
        out.append(Metric("rd_curve_rate_bpd", float(curve["rate_bpd"][j]), timestamp, step))
        out.append(Metric("rd_curve_rmse", float(curve["distortion_rmse"][j]), timestamp, step))
    return out
