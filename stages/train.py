"""Stage ``train``: train one variant with Ray Train and write its weights to models/<variant>/.

python -m stages.train --variant NAME [--seed K] [--params params.yaml]

``--seed K`` (one of params.yaml's ``seeds`` after the first; stage train_seed@NAME-K) trains
with train.seed K into models/NAME-sK/ and checkpoints/NAME-sK/, its own MLflow run tagged
``ddpm.seed`` K; without it, the main seed (seeds[0] = train.seed) into models/NAME/.

Resumes the variant's run from its last checkpoint in checkpoints/<variant>/ when the params are
unchanged; set RAY_ADDRESS (or ray.address) to train on an existing Ray cluster. With
``model.source: checkpoint`` it imports published weights instead (pipeline.training.published).
"""

from __future__ import annotations

import argparse

from pipeline.cli import entry_point, run_stage
from pipeline.config import load_config
from pipeline.training.published import import_checkpoint, skip_reason, skip_train


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", required=True, help="a variant of params.yaml (Table 2 row)")
    parser.add_argument("--params", default=None, help="params file (default: params.yaml)")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="a further training seed of params.yaml's seeds (default: the main seed)",
    )
    args = parser.parse_args(argv)
    cfg = load_config(args.params).with_seed(args.seed)
    variant = cfg.variant(args.variant)
    if reason := skip_reason(cfg, variant.name):
        skip_train(cfg, variant.name, reason)
        print(f"{variant.name}: not run ({reason})")
        return
    if cfg.model.source == "checkpoint":
        info, run_id = import_checkpoint(cfg, variant)
        print(
            f"{variant.name}: published weights from {info['checkpoint']} (sha256 "
            f"{info['checkpoint_sha256'][:12]}) in models/{variant.name}; MLflow run {run_id}"
        )
        return
    from pipeline.training.trainer import train_variant  # torch and Ray: only when training

    summary = train_variant(cfg, variant)
    began = f"resumed at step {summary.start}" if summary.start else "from scratch"
    waited = "" if summary.eval_seconds is None else f" (+ {summary.eval_seconds:.0f} s scoring)"
    print(
        f"trained {summary.variant} ({began}): {summary.steps} steps in {summary.seconds:.0f} s"
        f"{waited}; EMA weights in {summary.model_dir / 'ema.pt'}; run {summary.run_name}, "
        f"MLflow run {summary.mlflow_run_id}"
    )


if __name__ == "__main__":
    run_stage(main)
