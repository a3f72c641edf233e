"""Stage ``prepare``: the scale's images as uint8 arrays and a manifest in ``data/<scale>/``.

python -m stages.prepare [--scale NAME] [--params params.yaml]
"""

from __future__ import annotations

import argparse
import time

from pipeline.cli import entry_point, run_stage
from pipeline.config import load_config
from pipeline.data import prepare, summary
from pipeline.layout import data_dir


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", help="a preset of params.yaml (default: its `scale` key)")
    parser.add_argument("--params", default=None, help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    cfg = load_config(args.params, args.scale)
    start = time.perf_counter()
    manifest = prepare(cfg)
    print(summary(manifest, data_dir(cfg.scale), time.perf_counter() - start))


if __name__ == "__main__":
    run_stage(main)
