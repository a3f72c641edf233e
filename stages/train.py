"""Stage ``train``: train one variant with Ray Train and write its weights to models/<variant>/.

python -m stages.train --variant NAME [--params params.yaml]

Resumes the variant's run from its last checkpoint in checkpoints/<variant>/ when the params are
unchanged; set RAY_ADDRESS (or ray.address) to train on an existing Ray cluster.
"""

from __future__ import annotations

import argparse

from pipeline.cli import entry_point
from pipeline.config import load_config
from pipeline.training import train_variant


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", required=True, help="a variant of params.yaml (Table 2 row)")
    parser.add_argument("--params", default=None, help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    cfg = load_config(args.params)
    summary = train_variant(cfg, cfg.variant(args.variant))
    info = summary.model_json
    began = f"resumed at step {summary.start}" if summary.start else "from scratch"
    print(
        f"trained {summary.variant} ({began}): {summary.steps} steps in {summary.seconds:.0f} s; "
        f"EMA weights in {summary.model_dir / 'ema.pt'}; run {summary.run_name}, "
        f"MLflow run {info['mlflow_run_id']}"
    )


if __name__ == "__main__":
    main()
