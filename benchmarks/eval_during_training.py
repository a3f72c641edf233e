"""Seconds one evaluation during training costs (train.eval_every): score_checkpoint on a
checkpoint of the scale's network, twice (the first also builds the Inception network).

    python -m benchmarks.eval_during_training [--scale smoke] [--samples 64]

Needs reference/<scale>/train-stats.pt (the reference stage). Prints one line per evaluation
and writes benchmarks/results/eval-during-training-<scale>-<date>.json with the load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import results_dir
from pipeline.atomic import write_json
from pipeline.cli import entry_point
from pipeline.config import load_config
from pipeline.errors import DataError
from pipeline.layout import reference_dir
from pipeline.training.checkpoint import read_checkpoint, save_checkpoint
from pipeline.training.eval_during import driver_weights, score_checkpoint
from pipeline.training.loop import make_state


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="smoke")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--variant", default="eps_fixed_mse")
    args = parser.parse_args(argv)
    cfg = load_config(scale=args.scale)
    train = dataclasses.replace(cfg.train, eval_every=1, eval_samples=args.samples)
    cfg = dataclasses.replace(cfg, train=train)
    variant = cfg.variant(args.variant)
    reference = reference_dir(cfg.scale) / "train-stats.pt"
    if not reference.is_file():
        raise DataError(f"{reference}: missing (run `dvc repro reference` at this scale first)")
    seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        state = make_state(cfg, variant, torch.device("cpu"))  # the cost does not depend on it
        save_checkpoint(tmp, state, {"name": "bench", "config_hash": "0"}, 0)
        ema = read_checkpoint(tmp)["ema"]
        weights = driver_weights(cfg, Path("."))
        data = Path(weights.path).read_bytes() if weights.path else None
        for i in range(2):
            start = time.perf_counter()
            score_checkpoint(cfg, variant, 1, ema, reference.read_bytes(), weights, data)
            seconds.append(time.perf_counter() - start)
            print(f"evaluation {i}: {seconds[-1]:.1f} s ({args.samples} samples)", flush=True)
    result = {
        "benchmark": "eval_during_training",
        "scale": cfg.scale,
        "samples": args.samples,
        "seconds": seconds,
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "torch": torch.__version__,
    }
    day = datetime.date.today().isoformat()
    write_json(results_dir() / f"eval-during-training-{cfg.scale}-{day}.json", result)


if __name__ == "__main__":
    main()
