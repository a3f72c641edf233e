"""CPU time of one U-Net forward pass: ours (batch-invariant kernels), ours with the standard
kernels, and diffusers' UNet2DModel of the same architecture.

    python -m benchmarks.forward_cpu                      # smoke at batch 32 and paper at batch 8
    python -m benchmarks.forward_cpu --nets smoke --batch 4 --repeats 1 --calls 1   # smallest

The sampling loop's cost is the network's forward pass; this isolates it. Ours computes every
convolution with oneDNN directly and the timestep-embedding layers row by row, so that sample i
is bit-identical at any batch size (``pipeline/model/unet.py``); "standard" swaps those two
layers for ``F.conv2d`` and ``F.linear`` (what ``nn.Conv2d``/``nn.Linear`` run) to measure what
the invariance costs. The three are interleaved ``--repeats`` times and each figure is the best
of them, in this thread's CPU time (``time.thread_time``) with ``--threads`` torch threads: on a
shared machine CPU time moves less than wall time (cache and frequency effects remain; give the
load average, printed, beside any figure). Prints one JSON line and writes
``results/forward-cpu-<date>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from benchmarks import results_dir
from benchmarks.baseline import diffusers_unet
from benchmarks.run import machine
from pipeline.config import load_config
from pipeline.model import unet as unet_module
from pipeline.model.unet import build_unet

BATCH = {"smoke": 32, "paper": 8}  # the presets' sample.batch_size order of magnitude


@contextlib.contextmanager
def standard_kernels() -> Iterator[None]:
    """Our Conv2d and Dense layers computed as nn.Conv2d and nn.Linear compute them."""
    conv, dense = unet_module.Conv2d.forward, unet_module.Dense.forward
    unet_module.Conv2d.forward = lambda self, x: F.conv2d(
        x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
    )
    unet_module.Dense.forward = lambda self, x: F.linear(x, self.weight, self.bias)
    try:
        yield
    finally:
        unet_module.Conv2d.forward, unet_module.Dense.forward = conv, dense


def cpu_ms(call: Callable[[], object], calls: int) -> float:
    """This thread's CPU milliseconds per call (after one warm-up call)."""
    call()
    start = time.thread_time()
    for _ in range(calls):
        call()
    return (time.thread_time() - start) / calls * 1000


def measure(net: str, batch: int, repeats: int, calls: int) -> dict:
    """Best CPU ms per forward of ours, ours with standard kernels, and diffusers."""
    cfg = load_config("params.yaml", scale=net)
    ours = build_unet(cfg.model, cfg.data.resolution).eval()
    theirs = diffusers_unet(ours).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, cfg.data.resolution, cfg.data.resolution, generator=generator)
    t = torch.randint(0, cfg.diffusion.num_timesteps, (batch,), generator=generator)
    best = {"ours": float("inf"), "ours_standard_kernels": float("inf"), "diffusers": float("inf")}
    with torch.no_grad():
        for _ in range(repeats):
            best["ours"] = min(best["ours"], cpu_ms(lambda: ours(x, t), calls))
            with standard_kernels():
                ms = cpu_ms(lambda: ours(x, t), calls)
            best["ours_standard_kernels"] = min(best["ours_standard_kernels"], ms)
            best["diffusers"] = min(best["diffusers"], cpu_ms(lambda: theirs(x, t).sample, calls))
    row = {f"{k}_ms": round(v, 2) for k, v in best.items()}
    row["ours_over_diffusers_speed"] = round(best["diffusers"] / best["ours"], 3)
    row["invariance_cost"] = round(best["ours"] / best["ours_standard_kernels"] - 1, 3)
    return {"net": net, "batch": batch, **row}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="smoke,paper", help="comma-separated presets")
    parser.add_argument("--batch", type=int, default=None, help="default: 32 smoke, 8 paper")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (best kept)")
    parser.add_argument("--calls", type=int, default=3, help="forward passes per measurement")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    rows = [
        measure(net, args.batch or BATCH.get(net, 8), args.repeats, args.calls)
        for net in args.nets.split(",")
    ]
    result = {
        "benchmark": "forward_cpu",
        "date": datetime.date.today().isoformat(),
        "machine": machine("cpu"),
        "threads": args.threads,
        "load_start": [round(v, 2) for v in load_start],
        "load_end": [round(v, 2) for v in os.getloadavg()],
        "rows": rows,
    }
    path = results_dir() / f"forward-cpu-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
