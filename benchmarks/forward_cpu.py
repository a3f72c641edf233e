"""CPU time of one U-Net forward pass: ours (batch-invariant kernels), ours with the standard
kernels, and diffusers' UNet2DModel of the same architecture; and of the sampling loop.

    python -m benchmarks.forward_cpu                      # smoke at batch 32 and paper at batch 8
    python -m benchmarks.forward_cpu --nets smoke --batch 4 --repeats 1 --calls 1 --loop-steps 2

The sampling loop's cost is the network's forward pass; this isolates it. Ours computes every
convolution with oneDNN directly and the timestep-embedding layers row by row, so that sample i
is bit-identical at any batch size (``pipeline/model/unet.py``); "standard" swaps those two
layers for ``F.conv2d`` and ``F.linear`` (what ``nn.Conv2d``/``nn.Linear`` run) to measure what
the invariance costs. The sampling loop: ``--loop-steps`` steps of our sampler
(``pipeline.sampling.draw.sample_images``: per-image seeded noise, Algorithm 2) against
diffusers' ``DDPMScheduler`` loop with its network, same betas (the paper's 1e-4 to 0.02 over
the loop's steps) and batch. All are interleaved ``--repeats`` times and each figure is the best
of them, in this thread's CPU time (``time.thread_time``) with ``--threads`` torch threads: on a
shared machine CPU time moves less than wall time (cache and frequency effects remain; give the
load average, printed, beside any figure). Prints one JSON line and writes
``results/forward-cpu-<date>.json``.

``--train`` adds a training step's network part, forward and backward of an MSE loss in train
mode, for the same three networks (wall-clock ms, best of the rounds, ``--threads`` torch
threads): whether the train stage's step can reach the bare loop's speed with our network
(issue 27), apart from everything around the step.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import results_dir
from benchmarks.baseline import diffusers_scheduler, diffusers_unet
from benchmarks.run import machine
from pipeline.config import load_config
from pipeline.model import unet as unet_module
from pipeline.model.diffusion import GaussianDiffusion, linear_beta_schedule
from pipeline.model.unet import build_unet
from pipeline.sampling.draw import sample_images

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


def networks_and_batch(net: str, batch: int) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    """Our U-Net of preset ``net``, diffusers' of the same architecture, and a seeded batch:
    images x [batch, 3, R, R] and timesteps t [batch]."""
    cfg = load_config("params.yaml", scale=net)
    ours = build_unet(cfg.model, cfg.data.resolution)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, cfg.data.resolution, cfg.data.resolution, generator=generator)
    t = torch.randint(0, cfg.diffusion.num_timesteps, (batch,), generator=generator)
    return ours, diffusers_unet(ours), x, t


def measure(net: str, batch: int, repeats: int, calls: int, loop_steps: int) -> dict:
    """Best CPU ms per forward of ours, ours with standard kernels, and diffusers; and per
    sampling step of ours' and diffusers' loops over ``loop_steps`` steps."""
    ours, theirs, x, t = networks_and_batch(net, batch)
    ours.eval()
    theirs.eval()
    diffusion = GaussianDiffusion(linear_beta_schedule(loop_steps), "eps", "fixedlarge", "mse")
    scheduler = diffusers_scheduler(loop_steps)
    scheduler = type(scheduler).from_config(scheduler.config, beta_start=1e-4, beta_end=0.02)
    scheduler.set_timesteps(loop_steps)

    def diffusers_loop() -> None:
        g = torch.Generator().manual_seed(0)
        sample = torch.randn(x.shape, generator=g)
        for step in scheduler.timesteps:
            eps = theirs(sample, step).sample
            sample = scheduler.step(eps, step, sample, generator=g).prev_sample

    cases = {
        "ours": lambda: ours(x, t),
        "ours_standard_kernels": lambda: ours(x, t),
        "diffusers": lambda: theirs(x, t).sample,
        "ours_sampling_step": lambda: sample_images(ours, diffusion, range(batch), 0, batch),
        "diffusers_sampling_step": diffusers_loop,
    }
    best = dict.fromkeys(cases, float("inf"))
    with torch.inference_mode():
        for _ in range(repeats):
            for name, call in cases.items():
                loop = name.endswith("_sampling_step")
                with standard_kernels() if name == "ours_standard_kernels" else nullcontext():
                    ms = cpu_ms(call, 1 if loop else calls) / (loop_steps if loop else 1)
                best[name] = min(best[name], ms)
    row = {f"{k}_ms": round(v, 2) for k, v in best.items()}
    row["ours_over_diffusers_speed"] = round(best["diffusers"] / best["ours"], 3)
    row["invariance_cost"] = round(best["ours"] / best["ours_standard_kernels"] - 1, 3)
    speed = best["diffusers_sampling_step"] / best["ours_sampling_step"]
    row["sampling_ours_over_diffusers_speed"] = round(speed, 3)
    return {"net": net, "batch": batch, "loop_steps": loop_steps, **row}


def measure_train(net: str, batch: int, repeats: int, calls: int) -> dict:
    """Best wall ms of forward + MSE backward (train mode, gradients cleared) per call: ours,
    ours with the standard kernels, diffusers; and ours' speed relative to diffusers'."""
    torch.manual_seed(0)
    ours, theirs, x, t = networks_and_batch(net, batch)
    ours.train()
    theirs.train()

    def step(model: torch.nn.Module, forward: Callable[[], torch.Tensor]) -> None:
        F.mse_loss(forward(), x).backward()
        for p in model.parameters():
            p.grad = None

    cases = {
        "ours": (ours, lambda: ours(x, t)),
        "ours_standard_kernels": (ours, lambda: ours(x, t)),
        "diffusers": (theirs, lambda: theirs(x, t).sample),
    }
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(repeats):
        for name, (model, forward) in cases.items():
            with standard_kernels() if name == "ours_standard_kernels" else nullcontext():
                step(model, forward)  # warm-up
                start = time.perf_counter()
                for _ in range(calls):
                    step(model, forward)
                best[name] = min(best[name], (time.perf_counter() - start) / calls * 1000)
    row = {f"{k}_ms": round(v, 2) for k, v in best.items()}
    row["ours_over_diffusers_speed"] = round(best["diffusers"] / best["ours"], 3)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="smoke,paper", help="comma-separated presets")
    parser.add_argument("--batch", type=int, default=None, help="default: 32 smoke, 8 paper")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (best kept)")
    parser.add_argument("--calls", type=int, default=3, help="forward passes per measurement")
    parser.add_argument("--loop-steps", type=int, default=10, help="sampling steps per loop")
    parser.add_argument(
        "--train", action="store_true", help="also forward + backward in train mode (wall ms)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    rows = [
        measure(net, args.batch or BATCH.get(net, 8), args.repeats, args.calls, args.loop_steps)
        for net in args.nets.split(",")
    ]
    if args.train:
        for row in rows:
            row["train_step"] = measure_train(row["net"], row["batch"], args.repeats, args.calls)
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
