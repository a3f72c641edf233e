"""Stage ``sample``: draw the variant's samples on Ray (``python -m stages.sample --variant V``).

Reads models/<V>/ema.pt and model.json, computes the missing blocks under work/sample/<V>/ and
writes samples/<V>/ (samples.npz, manifest.json, grid.png, progressive.png). ``--seed K`` (a
further training seed, stage sample_seed@V-K): the same from models/<V>-sK/ into samples/<V>-sK/.
"""

from __future__ import annotations

import argparse

from pipeline import layout
from pipeline.cli import entry_point, run_stage
from pipeline.config import load_config
from pipeline.training.published import skip_reason, skip_sample


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
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
        skip_sample(cfg, variant.name, reason)
        print(f"{variant.name}: not run ({reason})")
        return
    from pipeline.sampling.draw import (
        check_sample_config,
        draw_samples,
        load_model_info,
        write_outputs,
    )

    check_sample_config(cfg)
    key = cfg.run_key(variant.name)  # <V>, or <V>-s<k> for a further training seed
    info = load_model_info(layout.model_dir(key), variant, cfg.scale)
    result = draw_samples(cfg, variant, info)
    out_dir = layout.samples_dir(key)
    write_outputs(cfg, out_dir, result)
    rate = result.run.items_per_s
    print(
        f"{variant.name}: {result.manifest['count']} samples ({result.manifest['sampler']}) "
        f"in {out_dir}; {len(result.run.computed)} blocks computed, "
        f"{len(result.run.skipped)} reused" + (f", {rate:.2f} samples/s" if rate else "")
    )


if __name__ == "__main__":
    run_stage(main)
