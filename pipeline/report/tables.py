"""The paper's Tables 1, 2 and 4 beside ours: runs read back from MLflow, written as MD and CSV.

``read_runs`` uses ``mlflow.search_runs`` (a pandas DataFrame with ``metrics.*``, ``params.*``
and ``tags.*`` columns). Each table builder takes that frame, indexed by variant, and returns a
DataFrame with, for every figure, the paper's number, ours and the difference (ours - paper).
Rows whose runs carry ``stand_in = true`` are labelled with STAND_IN_NOTE; rows the paper leaves
empty (unstable training) say so; rows from published weights say so. A variant trained with
several seeds (params.yaml ``seeds``) is one row (:func:`by_variant`): the mean over the seeds,
with the std of the seeds as its error and the number of seeds as its n.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.atomic import write_text
from pipeline.config import STAND_IN_NOTE, ReportConfig
from pipeline.report import paper
from pipeline.report.tracking import TAG_SEED, TAG_SOURCE, TAG_STAND_IN, TAG_VARIANT
from pipeline.report.verdict import (
    amount,
    direction,
    figure_key,
    judge,
    margin_text,
    ours_error,
    sampling_se,
)

TAG_SELECTION = "ddpm.selection"  # = pipeline.training.selection.TAG_SELECTION (no torch here)

# Metric names every variant run carries (evaluate stage): MLflow metrics and metrics JSON keys.
METRICS = (
    *("fid_train", "fid_test", "is_mean", "is_std", "nll_bpd", "nll_train_bpd"),
    # their errors and counts (docs/report-and-mlflow.md, "Reading the verdict")
    *("fid_train_se", "fid_test_se", "fid_bootstrap", "n_samples", "is_splits"),
    *("nll_bpd_se", "nll_images", "nll_train_bpd_se", "nll_train_images"),
)
# metric -> (its error, the count the error is over): "value ± error (n)" in the tables
ERRORS = {
    "fid_train": ("fid_train_se", "n_samples"),
    "fid_test": ("fid_test_se", "n_samples"),
    "is_mean": ("is_std", "is_splits"),  # IS's error: the std over its splits, as the paper's
    "nll_bpd": ("nll_bpd_se", "nll_images"),
    "nll_train_bpd": ("nll_train_bpd_se", "nll_train_images"),
}
UNSTABLE = "not reported in the paper (training unstable)"
SEEDS_TAG = "ddpm.seeds"  # by_variant's: the seeds a row's means are over ("0, 1")
SEED_STD, SEED_N = "_seed_std", "_seed_n"  # by_variant's columns: metrics.<m>_seed_std ...
PUBLISHED = "published weights"


# Table 4's figures: rate, RMS distortion over the images, mean of the per-image RMSEs
RD_KINDS = ("rate_bpd", "rmse", "rmse_per_image")


def rd_metric(kind: str, steps: int) -> str:
    """MLflow metric name of a Table-4 value after ``steps`` steps: kind 'rate_bpd', 'rmse'
    (RMS over the images) or 'rmse_per_image' (mean of per-image RMSEs), each also with '_se'
    (its standard error over the ``nll_images`` test images)."""
    return f"rd_{kind}_{steps}"


def error_of(metric: str) -> tuple[str | None, str | None]:
    """The metrics holding ``metric``'s error and the count it is over (None, None: none)."""
    if metric in ERRORS:
        return ERRORS[metric]
    for kind in RD_KINDS:
        prefix = f"rd_{kind}_"
        if metric.startswith(prefix) and metric[len(prefix) :].isdigit():
            return rd_metric(f"{kind}_se", int(metric[len(prefix) :])), "nll_images"
    return None, None


def read_runs(experiment: str, run_ids: dict[str, str]) -> pd.DataFrame:
    """The runs (``mlflow.search_runs``) as a DataFrame indexed by variant name, in the order of
    ``run_ids`` (a variant's main seed first); several seeds of a variant: one row each
    (:func:`by_variant` makes them one)."""
    import mlflow

    ids = ", ".join(f"'{r}'" for r in run_ids.values())
    runs = mlflow.search_runs(
        experiment_names=[experiment], filter_string=f"attributes.run_id IN ({ids})"
    )
    if runs.empty:
        return pd.DataFrame(index=pd.Index([], name="variant"))
    order = {r: i for i, r in enumerate(run_ids.values())}
    runs = runs.sort_values("run_id", key=lambda ids: ids.map(order), ignore_index=True)
    return runs.set_index(f"tags.{TAG_VARIANT}", drop=False).rename_axis("variant")


def by_variant(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per variant. A variant with runs of several training seeds (tag ``ddpm.seed``)
    becomes one row: every metric the mean over the seeds that have it, beside it
    ``metrics.<m>_seed_std`` (the std of the seeds, ddof 1: the spread of one training run) and
    ``metrics.<m>_seed_n`` (how many seeds), the tags of the variant's first run (its main seed in
    :func:`read_runs`' order) and ``tags.ddpm.seeds`` ("0, 1"). One run per variant: unchanged."""
    if runs.index.is_unique:
        return runs
    metrics = [
        c
        for c in runs.columns
        if c.startswith("metrics.") and not c.endswith((SEED_STD, SEED_N))
        and pd.api.types.is_numeric_dtype(runs[c])
    ]  # fmt: skip
    rows = []
    for _, group in runs.groupby(level=0, sort=False):
        row = group.iloc[0].copy()
        if len(group) > 1:
            for c in metrics:
                values = group[c].dropna().to_numpy(dtype=float)
                row[c] = values.mean() if len(values) else math.nan
                row[c + SEED_STD] = values.std(ddof=1) if len(values) > 1 else math.nan
                row[c + SEED_N] = float(len(values))
            seeds = group.get(f"tags.{TAG_SEED}", pd.Series(["?"] * len(group)))
            row[f"tags.{SEEDS_TAG}"] = ", ".join(str(s) for s in seeds)
        rows.append(row)
    return pd.DataFrame(rows).rename_axis("variant")


def error_metrics(runs: pd.DataFrame, variant: str, metric: str) -> tuple[str | None, str | None]:
    """The metrics that are ``metric``'s error and count for ``variant``: the seeds' std and
    number where the variant ran with several seeds (:func:`by_variant`), else ERRORS'."""
    if (_value(runs, variant, metric + SEED_N) or 0) > 1:
        return metric + SEED_STD, metric + SEED_N
    return error_of(metric)


def read_runs_by_parent(experiment_id: str, parent_id: str) -> pd.DataFrame:
    """The variant runs nested under reproduction run ``parent_id``, indexed by variant."""
    import mlflow

    runs = mlflow.search_runs(
        experiment_ids=[experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    if runs.empty or f"tags.{TAG_VARIANT}" not in runs.columns:
        return pd.DataFrame(index=pd.Index([], name="variant"))
    runs = (
        runs.sort_values(f"tags.{TAG_SEED}", key=_seed_order)
        if f"tags.{TAG_SEED}" in runs
        else runs
    )
    return by_variant(runs.set_index(f"tags.{TAG_VARIANT}", drop=False).rename_axis("variant"))


def _seed_order(seeds: pd.Series) -> pd.Series:
    return pd.to_numeric(seeds, errors="coerce")


def _value(runs: pd.DataFrame, variant: str, metric: str) -> float | None:
    column = f"metrics.{metric}"
    if variant not in runs.index or column not in runs.columns:
        return None
    value: Any = runs.at[variant, column]  # a cell of a mixed-type frame
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return None if missing else float(value)


def _note(runs: pd.DataFrame, variant: str, *, paper_empty: bool = False) -> str:
    notes = []
    if paper_empty:
        notes.append(UNSTABLE)
    if variant not in runs.index:
        notes.append("not run")
        return "; ".join(notes)
    tags = runs.loc[variant]
    if str(tags.get(f"tags.{TAG_SOURCE}", "")) == PUBLISHED:
        notes.append(PUBLISHED)
    selection = tags.get(f"tags.{TAG_SELECTION}")  # which checkpoint (train.select)
    if isinstance(selection, str) and selection != "last checkpoint":
        notes.append(selection)
    seeds = tags.get(f"tags.{SEEDS_TAG}")  # several training seeds (by_variant)
    if isinstance(seeds, str):
        notes.append(f"{SEEDS_NOTE} over {len(seeds.split(','))} training seeds ({seeds})")
    if str(tags.get(f"tags.{TAG_STAND_IN}", "")).lower() == "true":
        reason = tags.get("tags.stand_in_reason")
        notes.append(STAND_IN_NOTE + (f" ({reason})" if isinstance(reason, str) else ""))
    return "; ".join(notes)


def _diff(ours: float | None, theirs: float | None) -> float | None:
    return None if ours is None or theirs is None else ours - theirs


def _is_stand_in(runs: pd.DataFrame, variant: str) -> bool:
    column = f"tags.{TAG_STAND_IN}"
    if variant not in runs.index or column not in runs.columns:
        return False
    return str(runs.at[variant, column]).lower() == "true"


def _is_published(runs: pd.DataFrame, variant: str) -> bool:
    column = f"tags.{TAG_SOURCE}"
    if variant not in runs.index or column not in runs.columns:
        return False
    return str(runs.at[variant, column]) == PUBLISHED


def _figure(
    name: str,
    runs: pd.DataFrame,
    variant: str,
    metric: str,
    theirs: float | None,
    theirs_err: float | None = None,
    report: ReportConfig | None = None,
) -> dict[str, object]:
    """One figure's columns: paper (and its error, where the paper states one), ours, our error
    and its count, the difference, the margin (params ``report.margin``, in the figure's units)
    and the verdict with what its error rests on and its reason (pipeline.report.verdict)."""
    report = report or ReportConfig()
    ours = _value(runs, variant, metric)
    err_metric, n_metric = error_metrics(runs, variant, metric)
    err = _value(runs, variant, err_metric) if err_metric else None
    n = _value(runs, variant, n_metric) if n_metric else None
    margin = None if theirs is None else amount(getattr(report.margin, figure_key(name)), theirs)
    seeds = int(_value(runs, variant, metric + SEED_N) or 1)
    error = ours_error(
        name,
        err,
        n,
        seeds=seeds,
        paper=theirs,
        report=report,
        published=_is_published(runs, variant),
    )
    found = judge(
        ours,
        error.se,
        theirs,
        None if theirs_err is None else sampling_se(name, theirs_err, paper.IS_SPLITS),
        margin=math.nan if margin is None else margin,
        lower_is_better=direction(name),
        stand_in=_is_stand_in(runs, variant),
        confidence=report.confidence,
        df=error.df,
        basis=error.basis,
    )
    out: dict[str, object] = {f"{name} paper": theirs}
    if theirs_err is not None:
        out[f"{name} paper err"] = theirs_err
    out.update({f"{name} ours": ours, f"{name} ours err": err, f"{name} ours n": n})
    out[f"{name} diff"] = _diff(ours, theirs)
    out[f"{name} margin"] = margin
    out[f"{name} verdict"] = found.outcome if found else None
    out[f"{name} verdict basis"] = found.basis if found else None
    out[f"{name} verdict reason"] = found.reason if found else None
    return out


def table1(runs: pd.DataFrame, report: ReportConfig | None = None) -> pd.DataFrame:
    """Table 1 (CIFAR10): IS, FID against train and test, NLL test (train), paper's two rows;
    verdicts with ``report``'s margins (default: ReportConfig's)."""
    rows = []
    for row in paper.TABLE1:
        v = row.variant
        rows.append(
            {
                "model": row.model,
                "variant": v,
                **_figure("IS", runs, v, "is_mean", row.is_mean, row.is_std, report),
                **_figure("FID train", runs, v, "fid_train", row.fid_train, None, report),
                **_figure("FID test", runs, v, "fid_test", row.fid_test, None, report),
                **_figure("NLL test bpd", runs, v, "nll_bpd", row.nll_test, None, report),
                **_figure("NLL train bpd", runs, v, "nll_train_bpd", row.nll_train, None, report),
                "note": _note(runs, v),
            }
        )
    return pd.DataFrame(rows)


def table2(runs: pd.DataFrame, report: ReportConfig | None = None) -> pd.DataFrame:
    """Table 2 (ablation): IS and FID for the six mean/objective combinations; verdicts with
    ``report``'s margins."""
    rows = []
    for row in paper.TABLE2:
        v = row.variant
        rows.append(
            {
                "mean": row.mean,
                "objective": row.objective,
                "variant": v,
                **_figure("IS", runs, v, "is_mean", row.is_mean, row.is_std, report),
                **_figure("FID", runs, v, "fid_train", row.fid, None, report),
                "note": _note(runs, v, paper_empty=row.fid is None),
            }
        )
    return pd.DataFrame(rows)


def table4(
    runs: pd.DataFrame,
    num_timesteps: int,
    steps: tuple[int, ...],
    report: ReportConfig | None = None,
) -> pd.DataFrame:
    """Table 4: rate and distortion of the L_simple model after n reverse steps.

    Distortion: "RMSE" compares the mean of the per-image RMSEs (Sec. 4.3's per-image
    definition, averaged) with the paper; "RMSE (RMS) ours" is sqrt of the mean MSE beside it.
    With T != 1000 (smoke scales), our row n is set beside the paper's row at the same fraction
    of the reverse process (n * 1000 / T), when the paper has one.
    """
    published = {n: (rate, rmse) for n, rate, rmse in paper.TABLE4}
    v = paper.TABLE4_VARIANT
    note = _note(runs, v)
    if num_timesteps != 1000:
        scaled = f"T = {num_timesteps}: matched to the paper's row at the same fraction of T"
        note = "; ".join(x for x in (note, scaled) if x)
    rows = []
    for n in steps:
        theirs = published.get(round(n * 1000 / num_timesteps), (None, None))
        rows.append(
            {
                "steps": n,
                **_figure("rate bpd", runs, v, rd_metric("rate_bpd", n), theirs[0], None, report),
                **_figure("RMSE", runs, v, rd_metric("rmse_per_image", n), theirs[1], None, report),
                "RMSE (RMS) ours": _value(runs, v, rd_metric("rmse", n)),
                "note": note,
            }
        )
    return pd.DataFrame(rows)


def is_lsun(dataset: str) -> bool:
    """Whether the report of ``dataset`` is Table 3 (LSUN 256x256) rather than Tables 1, 2, 4."""
    return dataset in paper.LSUN_FID


def table3(runs: pd.DataFrame, dataset: str, report: ReportConfig | None = None) -> pd.DataFrame:
    """Table 3 (LSUN 256x256): FID against the training set, only beside the same dataset's.

    One row per variant run at this scale (the LSUN presets run L_simple only); the paper's
    FID is that of ``dataset`` (paper.LSUN_FID), never a CIFAR10 number.
    """
    theirs = paper.LSUN_FID[dataset]
    rows = []
    for v in runs.index:
        note = _note(runs, v)
        if dataset == "lsun_bedroom":
            note = "; ".join(x for x in (note, "paper's large model: 4.90") if x)
        rows.append(
            {
                "dataset": dataset,
                "variant": v,
                **_figure("FID", runs, v, "fid_train", theirs, None, report),
                "note": note,
            }
        )
    figure = [f"FID {c}" for c in FIGURE_COLUMNS]
    return pd.DataFrame(rows, columns=["dataset", "variant", *figure, "note"])


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e4 else f"{value:.3f}"
    return str(value).replace("|", "\\|")  # a literal pipe would split the cell


# one figure's columns in the CSV (table3's when no run holds a row)
FIGURE_COLUMNS = (
    *("paper", "ours", "ours err", "ours n", "diff", "margin"),
    *("verdict", "verdict basis", "verdict reason"),
)
# shown inside another cell of the Markdown (the CSV keeps them apart): suffix -> the suffix of
# the cell it is shown in (<X> ours err in <X> ours, <X> margin in <X> verdict)
MERGED = {
    " err": "",
    " n": "",
    " margin": " verdict",
    " verdict basis": " verdict",
    " verdict reason": " verdict",
}


def _merged(row: pd.Series, column: str) -> str:
    """``<X> ours`` / ``<X> paper`` with its error and count: ``value ± error (n)``;
    ``<X> verdict`` with its margin: ``reproduced; ± 0.317``."""
    if column.endswith(" verdict"):
        text, margin = _cell(row[column]), row.get(column.removesuffix("verdict") + "margin")
        if text == "—" or margin is None or _cell(margin) == "—":
            return text
        return f"{text}; {margin_text(float(margin))}"
    text = _cell(row[column])
    err, n = row.get(f"{column} err"), row.get(f"{column} n")
    if text != "—" and _cell(err) != "—":
        text += f" ± {_cell(err)}"
    if text != "—" and n is not None and _cell(n) != "—":
        text += f" ({int(n)})"
    return text


def _hidden(column: str, columns: pd.Index) -> bool:
    """Whether ``column`` is shown inside another one's cell in the Markdown."""
    return any(
        column.endswith(suffix) and column.removesuffix(suffix) + into in columns
        for suffix, into in MERGED.items()
    )


def to_markdown(table: pd.DataFrame, title: str) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency), with notes below it.

    ``<X> ours`` and ``<X> paper`` cells show ``value ± error (n)`` from their ``err`` and ``n``
    columns (kept apart in the CSV)."""
    columns = [c for c in table.columns if c != "note" and not _hidden(c, table.columns)]
    lines = [f"## {title}", "", "| " + " | ".join(columns) + " | note |"]
    lines.append("|" + " --- |" * (len(columns) + 1))
    for _, row in table.iterrows():
        cells = [_merged(row, c) for c in columns] + [_cell(row.get("note") or "")]
        lines.append("| " + " | ".join(cells) + " |")
    note = ERROR_NOTE
    if table["note"].str.contains(SEEDS_NOTE, regex=False).any():
        note += SEEDS_ERROR_NOTE
    lines += ["", "diff = ours - paper; — = no value; value ± error (n): " + note, ""]
    if table["note"].str.contains(STAND_IN_NOTE, regex=False).any():
        lines.append(f"**Rows noted stand-in are {STAND_IN_NOTE.removeprefix('stand-in, ')}.**")
    return "\n".join(lines) + "\n"


ERROR_NOTE = (
    "FID: bootstrap standard error over the n samples' features; IS: std over n splits; "
    "NLL: standard error over n images; verdict; ± its margin (params.yaml report): "
    "docs/report-and-mlflow.md, Reading the verdict."
)
SEEDS_NOTE = "mean ± std"  # a row over several training seeds (its note says which)
SEEDS_ERROR_NOTE = (
    " Rows noted mean ± std over training seeds: the mean over the seeds ± the std of the seeds "
    "(ddof 1), n = seeds; that std is the verdict's error for them."
)


def write_table(table: pd.DataFrame, stem: Path, title: str) -> None:
    """Write ``stem``.md and ``stem``.csv atomically."""
    write_text(stem.with_suffix(".md"), to_markdown(table, title))
    write_text(stem.with_suffix(".csv"), table.to_csv(index=False))


# ---------------------------------------------------------------------------------------------
# The real-data row (reference stage's ``real_data``): the floor and ceiling of the variants.

REAL_DATA = "real data"


def real_data_note(real: dict) -> str:
    """The real-data row's note: which images, against what, and the stand-in label."""
    note = (
        f"{real['count']} real {real['images']} images against the train reference, same extractor"
    )
    if real.get("stand_in_note"):
        note += f"; {real['stand_in_note']}"
    return note


def with_real_data(
    table: pd.DataFrame, real: dict | None, name: str, runs: pd.DataFrame | None = None
) -> pd.DataFrame:
    """``table`` (table1 or table2) with the real-data row appended (when ``real`` is given):
    IS of real test images and their FID against the train reference. With the feature network
    (runs carry ``classifier_confidence``) a column of it for every row, real data included."""
    table = table.copy()
    if runs is not None and "metrics.classifier_confidence" in runs.columns:
        found = [_value(runs, v, "classifier_confidence") for v in table["variant"]]
        table.insert(len(table.columns) - 1, "classifier confidence", found)
    if not real:
        return table
    row: dict = {c: None for c in table.columns}
    row.update({"model" if name == "table1" else "mean": REAL_DATA})
    row.update({"variant": f"{real['images']} split", "note": real_data_note(real)})
    if "objective" in row:
        row["objective"] = "—"
    row.update({"IS ours": real.get("is_mean"), "IS ours err": real.get("is_std")})
    row["FID train ours" if name == "table1" else "FID ours"] = real.get("fid_train")
    if "classifier confidence" in row:
        row["classifier confidence"] = real.get("classifier_confidence")
    return pd.concat([table, pd.DataFrame([row])], ignore_index=True)
