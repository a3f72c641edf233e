"""Stage ``train_reference``: what training reads of the reference, for DVC to depend on.

python -m stages.train_reference [--scale NAME] [--params params.yaml]
(pipeline/training/reference_gate.py says why the stage exists.)
"""

from __future__ import annotations

import argparse

from pipeline.cli import entry_point, run_stage
from pipeline.config import load_config
from pipeline.training.reference_gate import write_gate


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", help="a preset of params.yaml (default: its `scale` key)")
    parser.add_argument("--params", default=None, help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    cfg = load_config(args.params, args.scale)
    path = write_gate(cfg)
    print(f"wrote {path}: {path.read_text().strip()}")


if __name__ == "__main__":
    run_stage(main)
