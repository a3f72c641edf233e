"""Stage ``report``: the paper's tables of the scale's dataset beside ours, read from MLflow.

``python -m stages.report [--scale NAME]`` reads each variant's MLflow run (found from
models/<variant>/model.json's run name: pipeline.cluster.runrecord) with mlflow.search_runs and
writes, by dataset, Table 3 (LSUN 256x256 FIDs) for an LSUN scale or Tables 1, 2 and 4 (CIFAR10)
otherwise, as reports/table<N>.{md,csv}, each of the paper's numbers with a verdict
(pipeline.report.verdict) listed in reports/verdict.md, and reports/index.html (one
self-contained page with the tables, every variant's figures and the curves), then logs them to
a parent MLflow run for the whole reproduction, Table 2 (or 3) as its description, the verdicts
as its ``ddpm.verdict.*`` tags and their margins (params.yaml ``report``) as ``ddpm.margin.*``.
A number is only ever set beside the paper's number for the same dataset.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import pandas as pd

from pipeline import layout
from pipeline.atomic import write_text
from pipeline.cli import entry_point, run_stage
from pipeline.cluster.runrecord import model_run_id
from pipeline.config import Config, load_config, seed_key
from pipeline.errors import UserError
from pipeline.report import html, page, tables, tracking, verdict
from pipeline.training.published import is_skipped


def variant_run_ids(cfg: Config) -> dict[str, str]:
    """The MLflow run id of each variant and training seed that ran, found from
    models/<key>/model.json (pipeline.cluster.runrecord), by key (Config.run_key: the
    variant's name for the main seed ``seeds[0]``, <V>-s<k> else), each variant's main seed
    first."""
    ids, seeds = {}, cfg.seeds
    for name, seed in ((n, s) for n in cfg.variants for s in seeds):
        key = seed_key(name, seed, seeds[0])
        path = layout.model_dir(key) / "model.json"
        if not path.is_file():
            raise UserError(f"{path}: missing; run the pipeline first (dvc repro)")
        meta = json.loads(path.read_text())
        if is_skipped(meta):  # not run at this scale (published weights of another variant)
            continue
        run_id = model_run_id(cfg, key, meta)
        if not run_id:
            raise UserError(f"{path}: names no training run (run_name); rerun the train stage")
        ids[key] = run_id
    if not ids:
        raise UserError("no variant has run at this scale; nothing to report")
    return ids


def build_tables(
    cfg: Config, runs: pd.DataFrame, real: dict | None = None
) -> dict[str, tuple[pd.DataFrame, str]]:
    """The tables of the scale's dataset, {stem: (table, title)}, the headline table first.

    ``real`` is the reference stage's real-data row (see real_data); CIFAR10-style tables end
    with it. LSUN scales hold out no test split, so Table 3 has no such row.
    """
    if tables.is_lsun(cfg.data.dataset):
        return {
            "table3": (
                tables.table3(runs, cfg.data.dataset, cfg.report),
                f"Table 3: LSUN 256x256 FID ({cfg.data.dataset})",
            )
        }
    return {
        "table2": (
            tables.with_real_data(tables.table2(runs, cfg.report), real, "table2", runs),
            "Table 2: ablation over the mean and the objective",
        ),
        "table1": (
            tables.with_real_data(tables.table1(runs, cfg.report), real, "table1", runs),
            "Table 1: CIFAR10 sample quality and NLL",
        ),
        "table4": (
            tables.table4(runs, cfg.diffusion.num_timesteps, cfg.eval.rd_steps, cfg.report),
            "Table 4: rate and distortion along the reverse process (L_simple)",
        ),
    }


def real_data(scale: str) -> dict | None:
    """The reference stage's real-data row (reference/<scale>/manifest.json), if it has one."""
    path = layout.reference_dir(scale) / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    real = manifest.get("real_data")
    if real and manifest.get("stand_in"):
        real = {**real, "stand_in_note": _stand_in_note(manifest)}
    return real


def _stand_in_note(manifest: dict) -> str:
    reasons = ", ".join(manifest.get("stand_in_reasons", []))
    return manifest["stand_in_note"] + (f" ({reasons})" if reasons else "")


def write_index(
    cfg: Config, runs: pd.DataFrame, run_ids: dict[str, str], tables_md: list
) -> pathlib.Path:
    """reports/index.html: the tables, every variant's figures and the curves, one page."""
    built = page.build_page(
        cfg, runs, run_ids, [p.read_text() for p in tables_md], tracking.shown_uri(cfg),
        tracking.git_commit(),
    )  # fmt: skip
    path = layout.REPORTS / page.INDEX
    write_text(path, html.render_page(built))
    return path


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", help="a preset of params.yaml (default: its `scale` key)")
    parser.add_argument("--params", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    cfg = load_config(args.params, args.scale)
    run_ids = variant_run_ids(cfg)
    tracking.setup(cfg)
    per_seed = tables.read_runs(cfg.mlflow.experiment, run_ids)
    found = set(per_seed["run_id"]) if "run_id" in per_seed else set()
    missing = sorted(k for k, r in run_ids.items() if r not in found)
    if missing:
        raise UserError(
            f"MLflow store {tracking.shown_uri(cfg)} has no run for: {', '.join(missing)} "
            "(was MLFLOW_TRACKING_URI changed since training?)"
        )
    runs = tables.by_variant(per_seed)  # several seeds: mean ± std of the seeds
    built = build_tables(cfg, runs, real_data(cfg.scale))
    files = []
    for stem, (table, title) in built.items():
        path = layout.REPORTS / stem
        tables.write_table(table, path, f"{title} ({cfg.scale} scale)")
        files += [path.with_suffix(".md"), path.with_suffix(".csv")]
    headline = (layout.REPORTS / f"{next(iter(built))}.md").read_text()
    main_ids = {k: r for k, r in run_ids.items() if k in cfg.variants}  # the page: main seed's
    index = write_index(cfg, runs, main_ids, [p for p in files if p.suffix == ".md"])
    entries = verdict.collect(built)
    path = layout.REPORTS / "verdict.md"
    write_text(path, verdict.to_markdown(entries, f"Verdict ({cfg.scale} scale)", cfg.report))
    files.append(path)
    parent = tracking.log_reproduction(
        cfg, run_ids, files, index, headline, extra_tags=verdict.tags(entries, cfg.report)
    )
    print(headline)
    print(f"verdict: {verdict.summary(entries)} (reports/verdict.md)")
    print(f"verdict {verdict.margins_line(cfg.report)} (params.yaml report)")
    print(f"wrote {', '.join(str(f) for f in files)}; MLflow parent run {parent}")
    experiment = tracking.setup(cfg)
    print(
        f"MLflow UI: {tracking.ui_link(cfg, experiment)} "
        f"(mlflow ui; the variants under {cfg.scale}/reproduction)"
    )
    print(
        f"report: {index} ({index.stat().st_size / 1e3:,.0f} kB, one self-contained page; "
        "open it in a browser)"
    )


if __name__ == "__main__":
    run_stage(main)
