"""Two reproductions side by side, from MLflow alone (``python -m stages.compare A B``).

A reproduction is the report stage's parent run (tag ``ddpm.role = reproduction``) and its
variant runs (``mlflow.parentRunId``). :func:`resolve` takes a run id or an experiment name
(its latest reproduction); :func:`side_by_side` sets each variant's figures of the two beside
each other as ``value ± error (n)``, with the difference (B - A), the combined error
sqrt(err_A^2 + err_B^2) and whether the difference is within K_ERRORS of it (the verdict's band,
pipeline.report.verdict.agree).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from pipeline.errors import UserError
from pipeline.report.tables import error_metrics, read_runs_by_parent
from pipeline.report.tracking import TAG_SCALE, TAG_STAND_IN
from pipeline.report.verdict import K_ERRORS, TAG_PREFIX, agree

ROLE_TAG, ROLE = "ddpm.role", "reproduction"
FIGURES = {  # metric -> its name in the comparison
    "fid_train": "FID train",
    "fid_test": "FID test",
    "is_mean": "IS",
    "nll_bpd": "NLL test bpd",
    "nll_train_bpd": "NLL train bpd",
}


@dataclass(frozen=True)
class Reproduction:
    """A reproduction's parent run and its variant runs (indexed by variant)."""

    run_id: str
    label: str  # experiment/run name, scale, stand-in
    tags: dict[str, str]
    runs: pd.DataFrame


def resolve(what: str) -> Reproduction:
    """The reproduction named by ``what``: a parent run's id, a variant run's id (its parent) or
    an experiment name (its latest reproduction run). UserError when there is none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    run = None
    with contextlib.suppress(MlflowException):
        run = client.get_run(what)
    if run is None:
        experiment = client.get_experiment_by_name(what)
        if experiment is None:
            raise UserError(
                f"{what!r}: neither a run id nor an experiment in {mlflow.get_tracking_uri()}"
            )
        found = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{ROLE_TAG}` = '{ROLE}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not found:
            raise UserError(f"experiment {what!r} has no reproduction run (run the report stage)")
        run = found[0]
    if run.data.tags.get(ROLE_TAG) != ROLE:
        parent = run.data.tags.get("mlflow.parentRunId")
        if not parent:
            raise UserError(f"run {what}: not a reproduction run and has no parent run")
        run = client.get_run(parent)
    tags = run.data.tags
    experiment_name = client.get_experiment(run.info.experiment_id).name
    stand_in = " (stand-in)" if tags.get(TAG_STAND_IN) == "true" else ""
    label = (
        f"{experiment_name}/{run.info.run_name} {run.info.run_id[:8]}, {tags.get(TAG_SCALE)} scale"
    )
    runs = read_runs_by_parent(run.info.experiment_id, run.info.run_id)
    return Reproduction(run.info.run_id, label + stand_in, tags, runs)


def _get(runs: pd.DataFrame, variant: str, metric: str | None) -> float | None:
    column = f"metrics.{metric}"
    if metric is None or variant not in runs.index or column not in runs.columns:
        return None
    value: Any = runs.at[variant, column]  # a cell of a mixed-type frame
    return None if value is None or math.isnan(value) else float(value)


def _cell(value: float | None, err: float | None, n: float | None) -> str:
    if value is None:
        return "—"
    text = f"{value:.3f}" + (f" ± {err:.3f}" if err is not None else "")
    return text + (f" ({int(n)})" if n is not None else "")


def side_by_side(a: Reproduction, b: Reproduction) -> pd.DataFrame:
    """One row per variant and figure that either reproduction measured: A's and B's cells,
    B - A, the combined error and ``within`` (yes / no / — when an error is unknown)."""
    rows = []
    variants = list(dict.fromkeys([*a.runs.index, *b.runs.index]))
    for variant in variants:
        for metric, figure in FIGURES.items():
            (err_a, n_a), (err_b, n_b) = (error_metrics(r.runs, variant, metric) for r in (a, b))
            va, vb = _get(a.runs, variant, metric), _get(b.runs, variant, metric)
            if va is None and vb is None:
                continue
            ea, eb = _get(a.runs, variant, err_a), _get(b.runs, variant, err_b)
            diff = None if va is None or vb is None else vb - va
            err = None if ea is None or eb is None else math.hypot(ea, eb)
            within = "—" if diff is None or err is None else ("yes" if agree(diff, err) else "no")
            rows.append(
                {
                    "variant": variant,
                    "figure": figure,
                    "A": _cell(va, ea, _get(a.runs, variant, n_a)),
                    "B": _cell(vb, eb, _get(b.runs, variant, n_b)),
                    "B - A": "—" if diff is None else f"{diff:+.3f}",
                    "combined error": "—" if err is None else f"{err:.3f}",
                    f"within {K_ERRORS:g} errors": within,
                }
            )
    return pd.DataFrame(rows)


def render(a: Reproduction, b: Reproduction) -> str:
    """The comparison as text: the two reproductions, their verdict counts, the table."""
    table = side_by_side(a, b)
    lines = [f"A: {a.label}", f"B: {b.label}"]
    for name, r in (("A", a), ("B", b)):
        lines.append(f"verdict {name}: {r.tags.get(TAG_PREFIX, 'none recorded')}")
    lines.append("")
    if table.empty:
        return "\n".join([*lines, "no figure in common or apart: nothing to compare"]) + "\n"
    columns = list(table.columns)
    lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(str(row[c]) for c in columns) + " |")
    lines += [
        "",
        f"value ± error (n); B - A within {K_ERRORS:g} x sqrt(err_A^2 + err_B^2): yes/no "
        "(— where an error is unknown). Stand-in numbers are not comparable to published ones.",
    ]
    return "\n".join(lines) + "\n"
