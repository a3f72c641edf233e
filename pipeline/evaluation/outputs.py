"""What the evaluate stage writes for a variant, and what it logs to the variant's MLflow run.

- ``figures/<variant>/``: reconstructions.png (Fig. 7), interpolation.png (Fig. 8),
  rate_distortion.png (Fig. 5); titled with the scale and, where it applies, the stand-in note.
- ``plots/<variant>/rate_distortion.csv``: one row per 1-based t (DVC plots).
- ``metrics/<variant>.json`` (DVC metrics).
- MLflow: the metrics the report reads (pipeline.report.tables names), the Table-4 values, timings,
  the
  curve as metric history (step = reverse steps), the ``stand_in`` tags and every file above.

:func:`write_outputs` writes all of them or none: the folders are built in temporary siblings,
the MLflow logging happens before they are renamed into place, and the metrics file comes last.
"""

from __future__ import annotations

import contextlib
import csv
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import layout
from pipeline.atomic import atomic_dir, atomic_path, write_json
from pipeline.config import STAND_IN_NOTE, Config
from pipeline.errors import DataError
from pipeline.evaluation.evaluate import Evaluation
from pipeline.evaluation.featurenet import CLASSIFIER_SCORES
from pipeline.evaluation.figures import (
    save_interpolation,
    save_rate_distortion,
    save_reconstructions,
)
from pipeline.evaluation.reconstruction import lambdas
from pipeline.report import tables
from pipeline.report.tracking import TAG_STAND_IN, tracking_uri, variant_run
from pipeline.uri import redact_uri

CSV_COLUMNS = (
    "t",
    "steps",
    "T_minus_t",
    "rate_bpd",
    "distortion_rmse",
    "distortion_rmse_per_image",
    "vb_bpd",
    "xstart_mse",
    "eps_mse",
)


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
        assert spec is not None  # the figures were drawn from it
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
        assert spec is not None
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
                c["distortion_rmse_per_image"][j],
                s["vb_bpd"][j],
                s["xstart_mse"][j],
                s["mse"][j],
            )
            counts = [j + 1, int(c["steps"][j]), int(c["T_minus_t"][j])]
            writer.writerow([*counts, *(f"{v:.10g}" for v in values)])


def write_outputs(cfg: Config, result: Evaluation, root: Path = Path(".")) -> None:
    """figures/, plots/ and metrics/ of the variant, and its MLflow run, all or nothing."""
    name = result.key  # the variant's name, or <V>-s<k> for a further training seed
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
    """The run's metrics: pipeline.report.tables names, Table 4 values and the timings."""
    m = result.metrics
    out = {k: float(m[k]) for k in tables.METRICS if m.get(k) is not None}
    for n, row in m.get("table4", {}).items():
        for kind in tables.RD_KINDS:  # the value and its standard error, where there is one
            for name in (kind, f"{kind}_se"):
                if row.get(name) is not None:
                    out[tables.rd_metric(name, int(n))] = row[name]
    for k in ("nll_prior_bpd", "nll_decoder_bpd", *CLASSIFIER_SCORES):
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
            redact_uri(
                f"MLflow run {result.run_id} of models/{result.key}/model.json cannot be logged "
                f"to at {tracking_uri(cfg)} ({str(e).splitlines()[0]}); point "
                "MLFLOW_TRACKING_URI at the store the train stage used, or rerun it"
            )
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
