"""Per-step noise cost, before and after issue 16, as a fraction of one forward pass.

    python -m benchmarks.noise_cost                    # CPU, one torch thread
    python -m benchmarks.noise_cost --device cuda      # a GPU (same figures, device-side)

For each case (the paper's CIFAR10 network at sampling batches 256 and 1000, the LSUN 256x256
network at batch 64, and training batches of 128 and 64 split over 8 ranks) it measures:

- sampling, before: per-image CPU generators, a stack, then ``.to(device)`` (the old
  ``pipeline.sampling.noise.ImageNoise``, inlined here); after: per-image generators on the device.
- training, before: one generator draws the whole global batch's t and eps on the CPU and the
  rank keeps 1/8, then copies it to the device; after: ``diffusion_inputs`` draws only the
  rank's rows, on the device (``pipeline.training.randomness``).
- forward: one forward pass of the network in inference mode at ``--forward-batch`` images,
  scaled linearly to the case's batch (on a CPU a forward at batch 1000 takes minutes; the
  scaling is stated in the result).

Prints one JSON document and writes it to ``benchmarks/results/noise-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from functools import partial

import numpy as np
import torch

from benchmarks import results_dir
from benchmarks.run import machine, timed
from pipeline.config import ModelConfig
from pipeline.model.unet import build_unet
from pipeline.sampling.noise import ImageNoise, item_generator
from pipeline.training.randomness import NOISE_STREAM, diffusion_inputs, step_seed

LSUN = ModelConfig(ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0)
CASES = [  # (name, network config, resolution, sampling batch)
    ("cifar32-b256", ModelConfig(), 32, 256),
    ("cifar32-b1000", ModelConfig(), 32, 1000),
    ("lsun256-b64", LSUN, 256, 64),
]
TRAIN_CASES = [("cifar32-train-b128-w8", 128, 32), ("lsun256-train-b64-w8", 64, 256)]
RANKS = 8


def old_image_noise(seed: int, indices: list[int], device: str):
    """The pre-issue-16 ImageNoise: CPU generators, a stack, a copy to the device."""
    generators = [item_generator(seed, i) for i in indices]

    def draw(shape):
        draws = [torch.randn(shape[1:], generator=g) for g in generators]
        return torch.stack(draws).to(device=device, dtype=torch.float32)

    return draw


def old_diffusion_inputs(seed, step, num_timesteps, shape, rank, world_size, device):
    """The pre-issue-16 draw: the whole global batch on the CPU, this rank's slice copied."""
    generator = torch.Generator().manual_seed(step_seed(seed, step, NOISE_STREAM))
    t = torch.randint(0, num_timesteps, (shape[0],), generator=generator)
    noise = torch.randn(shape, generator=generator)
    b = shape[0] // world_size
    rows = slice(rank * b, (rank + 1) * b)
    return t[rows].to(device), noise[rows].to(device)


def measure(args) -> dict:
    device, repeats = args.device, args.repeats
    out: dict = {"sampling": {}, "training": {}}
    forward_ms: dict[tuple, float] = {}
    for name, cfg, resolution, batch in CASES:
        shape = (batch, 3, resolution, resolution)
        indices = list(range(batch))
        before = old_image_noise(0, indices, device)
        after = ImageNoise(0, indices, device=device)
        key = (cfg, resolution)
        if key not in forward_ms:
            torch.manual_seed(0)
            net = build_unet(cfg, resolution).to(device).eval()
            x = torch.randn(args.forward_batch, 3, resolution, resolution, device=device)
            t = torch.full((args.forward_batch,), 500, device=device)
            with torch.inference_mode():
                forward_ms[key] = 1e3 * timed(partial(net, x, t), args.forward_repeats, device)
            del net
        fwd = forward_ms[key] * batch / args.forward_batch
        row = {
            "batch": batch,
            "before_ms": 1e3 * timed(partial(before, shape), repeats, device),
            "after_ms": 1e3 * timed(partial(after, shape), repeats, device),
            "forward_ms": fwd,
            "forward_measured_at_batch": args.forward_batch,
        }
        row["before_share"] = row["before_ms"] / fwd
        row["after_share"] = row["after_ms"] / fwd
        out["sampling"][name] = row
        print(name, json.dumps(row), flush=True)
    for name, batch, resolution in TRAIN_CASES:
        shape = (batch, 3, resolution, resolution)
        before_ms = 1e3 * timed(
            partial(old_diffusion_inputs, 0, 7, 1000, shape, 0, RANKS, device), repeats, device
        )
        after_ms = 1e3 * timed(
            partial(diffusion_inputs, 0, 7, 1000, shape, 0, RANKS, device), repeats, device
        )
        row = {"global_batch": batch, "ranks": RANKS, "before_ms": before_ms, "after_ms": after_ms}
        out["training"][name] = row
        print(name, json.dumps(row), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--forward-batch", type=int, default=1)
    parser.add_argument("--forward-repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    result = {
        "benchmark": "noise_cost",
        "device": args.device,
        "machine": machine(args.device),
        "threads": args.threads,
        "load_before": os.getloadavg(),
        "settings": vars(args),
        **measure(args),
        "load_after": os.getloadavg(),
        "wall_s": round(time.time() - started, 1),
        "numpy": np.__version__,
    }
    day = datetime.date.today().isoformat()
    path = results_dir() / f"noise-{args.device}-{day}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
