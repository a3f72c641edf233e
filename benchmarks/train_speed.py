"""Training throughput through the real train stage: Ray Train workers, DDP, the paper's step.

(``--backend process`` or a scale whose preset trains in process, smoke: the stage's in-process
loop instead of Ray Train.)

    python -m benchmarks.train_speed --scale smoke --workers 1 --threads 1 --steps 60
    python -m benchmarks.train_speed --scale paper --workers 2 --steps 3 --log-every 1

Trains ``--steps`` steps of the scale's network and batch on synthetic images of the scale's
resolution in a temporary project (data, checkpoints and MLflow store are thrown away), and
prints one JSON line: the loop's own steps/s and images/s per logging interval (the first
interval, which includes warm-up, is left out of the mean when there are more), and the stage's
fixed cost (wall time less the time of the steps).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import mlflow
import yaml

from pipeline.cli import quiet_environment
from pipeline.config import config_from_dict
from pipeline.data import prepare
from pipeline.layout import data_dir
from pipeline.training.trainer import train_variant


def params(scale: str, args: argparse.Namespace) -> dict:
    """The repo's params at ``scale`` on synthetic data, with the benchmark's train keys."""
    raw = yaml.safe_load(Path("params.yaml").read_text())
    preset = copy.deepcopy(raw["presets"][scale])
    resolution = preset.get("data", {}).get("resolution", 32)
    preset["data"] = {"dataset": "synthetic", "resolution": resolution, "n_train": 512}
    train = preset.setdefault("train", {})
    train.update(
        steps=args.steps,
        num_workers=args.workers,
        torch_threads=args.threads,
        log_every=args.log_every,
        checkpoint_every=args.steps,
        use_gpu=args.gpu,
        bf16=args.bf16,
        channels_last=args.channels_last,
    )
    if args.backend:
        train["backend"] = args.backend
    if args.batch:
        train["batch_size"] = args.batch
    raw["presets"] = {scale: preset}
    raw["scale"] = scale
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", default="smoke")
    parser.add_argument("--variant", default="eps_fixed_mse")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: scale's)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument(
        "--backend", choices=("ray", "process"), default=None, help="default: the scale's"
    )
    args = parser.parse_args()
    quiet_environment()
    with tempfile.TemporaryDirectory(prefix="train-speed-") as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        cfg = config_from_dict(params(args.scale, args))
        prepare(cfg, root / data_dir(cfg.scale))
        start = time.perf_counter()
        summary = train_variant(cfg, cfg.variant(args.variant), root)
        wall = time.perf_counter() - start
        client = mlflow.MlflowClient()
        history = client.get_metric_history(summary.mlflow_run_id, "steps_per_s")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)]
    steady = rates[1:] or rates
    steps_per_s = sum(steady) / len(steady)
    stepping = sum(args.log_every / r for r in rates)
    print(
        json.dumps(
            {
                "scale": args.scale,
                "workers": args.workers,
                "threads": args.threads,
                "backend": cfg.train.backend,
                "batch": cfg.train.batch_size,
                "steps": args.steps,
                "steps_per_s": round(steps_per_s, 4),
                "images_per_s": round(steps_per_s * cfg.train.batch_size, 2),
                "intervals": [round(r, 4) for r in rates],
                "wall_s": round(wall, 1),
                "fixed_s": round(wall - stepping, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
