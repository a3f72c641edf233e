"""Stage ``report``: the paper's Tables 1, 2 and 4 beside ours, read back from MLflow.

``python -m stages.report [--scale NAME]`` reads each variant's MLflow run (its id is in
models/<variant>/model.json) with mlflow.search_runs and writes reports/table{1,2,4}.{md,csv},
then logs them to a parent MLflow run for the whole reproduction.
"""

from __future__ import annotations

import argparse
import json

from pipeline import layout, tables, tracking
from pipeline.cli import entry_point, run_stage
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.published import is_skipped


def variant_run_ids(variants: list[str]) -> dict[str, str]:
    """The MLflow run id of each variant that ran, from models/<variant>/model.json."""
    ids = {}
    for name in variants:
        path = layout.model_dir(name) / "model.json"
        if not path.is_file():
            raise UserError(f"{path}: missing; run the pipeline first (dvc repro)")
        meta = json.loads(path.read_text())
        if is_skipped(meta):  # not run at this scale (published weights of another variant)
            continue
        if not meta.get("mlflow_run_id"):
            raise UserError(f"{path}: no mlflow_run_id; rerun the train stage")
        ids[name] = meta["mlflow_run_id"]
    if not ids:
        raise UserError("no variant has run at this scale; nothing to report")
    return ids


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


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", help="a preset of params.yaml (default: its `scale` key)")
    parser.add_argument("--params", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    cfg = load_config(args.params, args.scale)
    run_ids = variant_run_ids(list(cfg.variants))
    tracking.setup(cfg)
    runs = tables.read_runs(cfg.mlflow.experiment, run_ids)
    missing = sorted(set(run_ids) - set(runs.index))
    if missing:
        raise UserError(
            f"MLflow store {tracking.tracking_uri(cfg)} has no run for: {', '.join(missing)} "
            "(was MLFLOW_TRACKING_URI changed since training?)"
        )
    real = real_data(cfg.scale)
    built = {
        "table1": (
            tables.with_real_data(tables.table1(runs), real, "table1", runs),
            "Table 1: CIFAR10 sample quality and NLL",
        ),
        "table2": (
            tables.with_real_data(tables.table2(runs), real, "table2", runs),
            "Table 2: ablation over the mean and the objective",
        ),
        "table4": (
            tables.table4(runs, cfg.diffusion.num_timesteps, cfg.eval.rd_steps),
            "Table 4: rate and distortion along the reverse process (L_simple)",
        ),
    }
    files = []
    for stem, (table, title) in built.items():
        path = layout.REPORTS / stem
        tables.write_table(table, path, f"{title} ({cfg.scale} scale)")
        files += [path.with_suffix(".md"), path.with_suffix(".csv")]
    parent = tracking.log_reproduction(cfg, run_ids, files)
    print((layout.REPORTS / "table2.md").read_text())
    print(f"wrote {', '.join(str(f) for f in files)}; MLflow parent run {parent}")


if __name__ == "__main__":
    run_stage(main)
