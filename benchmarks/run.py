"""Throughput of training, sampling and the bound: ours against diffusers, beside the limit.

    python -m benchmarks.run                       # this machine's CPU, the paper's CIFAR10 net
    python -m benchmarks.run --device cuda --bf16  # a GPU: batch 128 training, big sampling batches

Each figure runs in a fresh process (its peak memory is its own), after a warm-up, as the median
of ``--repeats`` timings. diffusers' UNet2DModel + DDPMScheduler do the same work in the same run
(benchmarks/baseline.py). The limit is the device's measured matmul rate over the network's
FLOPs (counted by torch's FlopCounterMode: ~12.4 GFLOP per 32x32 image forward, ~3x that for a
training step). Results go to benchmarks/results/<device>-<net>-<date>.json, and the table in
benchmarks/README.md is rebuilt from every results file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import DEFAULT_RESULTS, results_dir
from benchmarks.baseline import diffusers_scheduler, diffusers_unet
from benchmarks.table import update_readme
from pipeline.cli import quiet_environment
from pipeline.config import ModelConfig
from pipeline.model.diffusion import GaussianDiffusion, linear_beta_schedule
from pipeline.model.unet import UNet, build_unet

NETS = {  # name: (model section, resolution)
    "paper": (ModelConfig(), 32),
    "smoke": (ModelConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,)), 16),
}
SETTINGS = ("batch", "steps", "repeats", "threads", "bf16", "channels_last", "compile")
PAPER = {"train_steps": 800_000, "samples": 50_000, "timesteps": 1000, "test_images": 10_000}


def network(name: str, device: str) -> UNet:
    cfg, resolution = NETS[name]
    torch.manual_seed(0)
    return build_unet(cfg, resolution).to(device)


def timed(fn, repeats: int, device: str, summary=statistics.median) -> float:
    """Seconds of ``fn()`` over ``repeats`` calls after one warm-up call (their median)."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return summary(times)


# ---------------------------------------------------------------------------------------------
# The measured work (each in a child process)


def _prepare(model: torch.nn.Module, args) -> torch.nn.Module:
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if args.compile else model


def train_ours(args) -> dict:
    """The pipeline's own train_step (Adam, warmup, clipping, EMA) on one worker."""
    from pipeline.config import Config, DataConfig, TrainConfig, Variant
    from pipeline.training.loop import make_diffusion, make_state, train_step

    model_cfg, resolution = NETS[args.net]
    train = TrainConfig(bf16=args.bf16, channels_last=args.channels_last)
    cfg = Config("bench", data=DataConfig(resolution=resolution), model=model_cfg, train=train)
    variant = Variant("eps_fixed_mse", "eps", "fixedlarge", "mse")
    state = make_state(cfg, variant, torch.device(args.device))
    diffusion = make_diffusion(cfg, variant)
    model = torch.compile(state.model) if args.compile else state.model
    x, t, noise = _batch(args, resolution)
    seconds = timed(
        lambda: train_step(model, state, diffusion, x, t, noise, cfg), args.repeats, args.device
    )
    return {"images_per_s": args.batch / seconds, "steps_per_s": 1 / seconds}


def _batch(args, resolution: int):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, resolution, resolution, generator=g).mul(2).sub(1)
    t = torch.randint(0, 1000, (args.batch,), generator=g)
    noise = torch.randn(x.shape, generator=g)
    return x.to(args.device), t.to(args.device), noise.to(args.device)


def train_diffusers(args) -> dict:
    unet = diffusers_unet(network(args.net, "cpu")).to(args.device).train()
    unet = _prepare(unet, args)
    scheduler = diffusers_scheduler()
    params = list(unet.parameters())
    opt = torch.optim.Adam(params, lr=2e-4)
    ema = [p.detach().clone() for p in params]
    x, t, noise = _batch(args, NETS[args.net][1])

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
            pred = unet(scheduler.add_noise(x, noise, t), t).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - 0.9999)

    seconds = timed(step, args.repeats, args.device)
    return {"images_per_s": args.batch / seconds, "steps_per_s": 1 / seconds}


def sample_ours(args) -> dict:
    """The pipeline's sampler (per-image seeded noise, inference mode) for a few steps."""
    from pipeline.sampling.draw import sample_images

    model = _prepare(network(args.net, args.device).eval(), args)
    steps = args.steps
    diffusion = GaussianDiffusion(linear_beta_schedule(steps, 1e-4, 0.02))

    def run():
        sample_images(model, diffusion, range(args.batch), 0, args.batch, bf16=args.bf16)

    with torch.device(args.device):
        seconds = timed(run, args.repeats, args.device)
    return {"evals_per_s": args.batch * steps / seconds}


def sample_diffusers(args) -> dict:
    unet = _prepare(diffusers_unet(network(args.net, "cpu")).to(args.device).eval(), args)
    scheduler = diffusers_scheduler()
    scheduler.set_timesteps(1000)
    g = torch.Generator(args.device).manual_seed(0)
    res = NETS[args.net][1]

    @torch.inference_mode()
    def run():
        x = torch.randn(args.batch, 3, res, res, generator=g, device=args.device)
        for t in scheduler.timesteps[: args.steps]:
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
                out = unet(x, t).sample
            x = scheduler.step(out.float(), t, x, generator=g).prev_sample

    return {"evals_per_s": args.batch * args.steps / timed(run, args.repeats, args.device)}


def nll_ours(args) -> dict:
    """calc_bpd_loop (every term of the bound) over ``steps`` timesteps of a batch."""
    model = _prepare(network(args.net, args.device).eval(), args)
    diffusion = GaussianDiffusion(linear_beta_schedule(args.steps, 1e-4, 0.02), loss_type="kl")
    x, _, _ = _batch(args, NETS[args.net][1])
    x = (x * 127.5).round() / 127.5
    seconds = timed(lambda: diffusion.calc_bpd_loop(model, x), args.repeats, args.device)
    return {"image_steps_per_s": args.batch * args.steps / seconds}


WORK = {
    ("train", "ours"): train_ours,
    ("train", "diffusers"): train_diffusers,
    ("sample", "ours"): sample_ours,
    ("sample", "diffusers"): sample_diffusers,
    ("nll", "ours"): nll_ours,
}


def child(args) -> None:
    quiet_environment()
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = WORK[(args.figure, args.impl)](args)
    if args.device == "cuda":
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:  # the whole process's high-water mark, torch and Python included
        out["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


# ---------------------------------------------------------------------------------------------
# The driver


def forward_flops(net: str) -> float:
    """FLOPs of one forward pass per image (oneDNN off so FlopCounterMode sees the convs)."""
    model = network(net, "cpu").eval()
    res = NETS[net][1]
    x, t = torch.zeros(1, 3, res, res), torch.zeros(1, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with torch.backends.mkldnn.flags(enabled=False), counter, torch.no_grad():
        model(x, t)
    return float(counter.get_total_flops())


def matmul_peak(device: str, bf16: bool, threads: int) -> float:
    """Measured FLOP/s of a large matrix product in the benchmark's precision: the best of 10.

    The best, not the median: a limit must not be lowered by a noisy neighbour on a shared CPU.
    """
    torch.set_num_threads(threads)
    n = 4096 if device == "cuda" else 2048
    dtype = torch.bfloat16 if bf16 else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ a, 10, device, summary=min)


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    cores = len(os.sched_getaffinity(0))
    return f"{model} ({cores} cores), torch {torch.__version__}"


def run_child(args, figure: str, impl: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.run", "--child", figure, impl, *args.passthrough]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode or line is None:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(line.removeprefix("RESULT "))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--net", choices=NETS, default="paper")
    parser.add_argument("--batch", type=int, help="images per step (default: 128 on GPU, 8 on CPU)")
    parser.add_argument("--steps", type=int, default=3, help="timesteps timed for sample and nll")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--figures", default="train,sample,nll")
    parser.add_argument("--child", nargs=2, metavar=("FIGURE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch = args.batch or (128 if args.device == "cuda" else 8)
    if args.child:
        args.figure, args.impl = args.child
        return child(args)
    args.passthrough = [
        f"--device={args.device}", f"--net={args.net}", f"--batch={args.batch}",
        f"--steps={args.steps}", f"--repeats={args.repeats}", f"--threads={args.threads}",
        *(["--bf16"] if args.bf16 else []), *(["--channels-last"] if args.channels_last else []),
        *(["--compile"] if args.compile else []),
    ]  # fmt: skip
    report(args, measure(args))


def measure(args) -> dict:
    flops = forward_flops(args.net)
    peak = matmul_peak(args.device, args.bf16, args.threads)
    figures = {}
    for figure in args.figures.split(","):
        figures[figure] = {
            impl: run_child(args, figure, impl)
            for impl in ("ours", "diffusers")
            if (figure, impl) in WORK
        }
        print(f"{figure}: {json.dumps(figures[figure])}", flush=True)
    return {"forward_gflop_per_image": flops / 1e9, "matmul_tflops": peak / 1e12, "raw": figures}


def report(args, measured: dict) -> None:
    fwd = measured["forward_gflop_per_image"] * 1e9
    peak = measured["matmul_tflops"] * 1e12
    raw = measured["raw"]
    rows = []
    samples, test_images = PAPER["samples"], PAPER["test_images"]
    T = PAPER["timesteps"]
    specs = {  # label, result key, FLOPs per image, images of work projected, description
        "train": ("training images/s", "images_per_s", 3 * fwd,
                  PAPER["train_steps"] * args.batch, "800k steps of batch"),
        "sample": ("sampling image-steps/s", "evals_per_s", fwd,
                   samples * T, "50k samples x 1000 steps"),
        "nll": ("bound image-steps/s", "image_steps_per_s", fwd,
                test_images * T, "10k test images x 1000 terms"),
    }  # fmt: skip
    for figure, impls in raw.items():
        label, key, flops, work, what = specs[figure]
        ours = impls.get("ours", {}).get(key)
        theirs = impls.get("diffusers", {}).get(key)
        rows.append(
            {
                "figure": label,
                "ours": ours,
                "diffusers": theirs,
                "ratio": ours / theirs if ours and theirs else None,
                "limit": peak / flops,
                "projection_hours": work / ours / 3600 if ours else None,
                "projection": what + (f" {args.batch}" if figure == "train" else ""),
                "peak_memory_mb": impls.get("ours", {}).get("peak_memory_mb"),
                "errors": {k: v["error"] for k, v in impls.items() if "error" in v},
            }
        )
    result = {
        "date": datetime.date.today().isoformat(),
        "device": args.device,
        "machine": machine(args.device),
        "net": args.net,
        "settings": {k: getattr(args, k) for k in SETTINGS},
        **{k: v for k, v in measured.items() if k != "raw"},
        "rows": rows,
        "raw": measured["raw"],
    }  # fmt: skip
    results = results_dir()
    path = results / f"{args.device}-{args.net}-{result['date']}{'-bf16' if args.bf16 else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    if results == DEFAULT_RESULTS:  # the table is of the committed results only
        update_readme()
    print(f"wrote {path}" + (" and benchmarks/README.md" if results == DEFAULT_RESULTS else ""))


if __name__ == "__main__":
    main()
