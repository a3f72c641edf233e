"""Stage ``evaluate``: FID, IS, the NLL bound, rate-distortion and figures of one variant.

python -m stages.evaluate --variant NAME [--seed K] [--params params.yaml]

Reads models/<V>/, samples/<V>/samples.npz, reference/<scale>/ and data/<scale>/; writes
metrics/<V>.json, plots/<V>/rate_distortion.csv and figures/<V>/*.png, and logs them to the
variant's MLflow run. NLL blocks and figure pixels are cached in work/nll/<V>/ (a rerun or an
interrupted run resumes), Inception statistics in work/fid/<V>/. ``--seed K`` (a further
training seed, stage evaluate_seed@V-K): every <V> above is <V>-sK.
"""

from __future__ import annotations

import argparse

from pipeline.cli import entry_point, run_stage
from pipeline.config import load_config
from pipeline.training.published import skip_evaluate, skip_reason


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", required=True, help="a variant of params.yaml")
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
        skip_evaluate(cfg, variant.name, reason)
        print(f"{variant.name}: not run ({reason})")
        return
    from pipeline.evaluation.evaluate import check_eval_config, evaluate_variant
    from pipeline.evaluation.outputs import write_outputs

    check_eval_config(cfg)
    result = evaluate_variant(cfg, variant)
    write_outputs(cfg, result)
    print(summary_line(result.metrics, result.timings))


def summary_line(metrics: dict, timings: dict[str, float]) -> str:
    """One line: the headline numbers, the stand-in mark and where the time went."""
    parts = [f"{metrics['variant']}: FID train {_fmt(metrics['fid_train'])}"]
    parts += [f"FID test {_fmt(metrics['fid_test'])}"]
    parts += [f"IS {_fmt(metrics['is_mean'])} ± {_fmt(metrics['is_std'])}"]
    if metrics["nll_bpd"] is not None:
        parts.append(f"NLL {metrics['nll_bpd']:.4f} bits/dim ({metrics['nll_images']} test images)")
    text = ", ".join(parts)
    if metrics["stand_in"]:
        text += f" [{metrics['stand_in_note']}]"
    seconds = ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
    return f"{text}; seconds: {seconds}"


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    run_stage(main)
