"""Print the resolved configuration of a scale: ``python -m stages.config [--scale NAME]``."""

from __future__ import annotations

import argparse
import json

from pipeline.cli import entry_point
from pipeline.config import load_config


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", help="a preset of params.yaml (default: its `scale` key)")
    parser.add_argument("--params", default=None, help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    cfg = load_config(args.params, args.scale)
    print(json.dumps(cfg.flat(), indent=2, default=str))
    print(f"variants: {', '.join(cfg.variants)}")
    if cfg.stand_in_reasons():
        print(f"note: metrics at this scale are stand-in ({', '.join(cfg.stand_in_reasons())})")


if __name__ == "__main__":
    main()
