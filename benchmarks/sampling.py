"""Sampling throughput: ``python -m benchmarks.sampling --net smoke --threads 1 2``.

Times Algorithm 2 (pipeline.sampling.draw.sample_images, per-image seeded noise, inference mode) for
a network with random weights after a warm-up, in this process, and projects the time of a full
run: ``--samples`` images of ``--timesteps`` steps (default: the paper's 50,000 x 1000). With
``--workers N`` it runs the same blocks as N Ray tasks instead (what the sample stage does).
Throughput is in network evaluations per second (one image, one step); samples/s = that / T.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from pipeline.cli import quiet_environment
from pipeline.config import ModelConfig
from pipeline.model.diffusion import GaussianDiffusion, linear_beta_schedule
from pipeline.model.unet import UNet, build_unet
from pipeline.sampling.draw import sample_block, sample_images
from pipeline.sampling.job import SamplingJob

NETS = {
    "smoke": (ModelConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,)), 16),
    "paper": (ModelConfig(), 32),  # the 35.7M-parameter CIFAR10 network
}


def network(name: str) -> UNet:
    cfg, resolution = NETS[name]
    return build_unet(cfg, resolution).eval()


def in_process(model: UNet, threads: int, batch: int, steps: int) -> float:
    """Network evaluations per second of one process with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    diffusion = GaussianDiffusion(linear_beta_schedule(steps, 1e-3, 0.2))
    sample_images(model, GaussianDiffusion(linear_beta_schedule(2)), range(batch), 0, batch)
    start = time.perf_counter()
    sample_images(model, diffusion, range(batch), 0, batch)
    return batch * steps / (time.perf_counter() - start)


def on_ray(model: UNet, workers: int, threads: int, batch: int, steps: int) -> float:
    """Network evaluations per second of ``workers`` Ray tasks (one block of ``batch`` each)."""
    import ray

    from pipeline.cluster.blocks import run_blocks

    betas = tuple(linear_beta_schedule(steps, 1e-3, 0.2).tolist())
    job = SamplingJob(
        unet=model.init_kwargs,
        state_dict=model.state_dict(),
        betas=betas,
        mean_type="eps",
        var_type="fixedlarge",
        loss_type="mse",
        steps=None,
        seed=0,
        batch_size=batch,
        torch_threads=threads,
    )
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    warm = SamplingJob(**{**job.__dict__, "betas": betas[:1]})
    with tempfile.TemporaryDirectory() as d:  # start the workers: processes, imports
        run_blocks(sample_block, workers, 1, d, workers, desc="warm-up", shared=warm)
    with tempfile.TemporaryDirectory() as d:
        run = run_blocks(sample_block, workers * batch, batch, d, workers, shared=job)
    ray.shutdown()
    return run.items_computed * steps / run.elapsed_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--net", choices=sorted(NETS), default="smoke")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="steps timed (after a warm-up)")
    parser.add_argument("--workers", type=int, default=0, help="Ray tasks (0: in process)")
    parser.add_argument("--samples", type=int, default=50_000, help="projected run: samples")
    parser.add_argument("--timesteps", type=int, default=1000, help="projected run: T")
    args = parser.parse_args()
    quiet_environment()
    model = network(args.net)
    for threads in args.threads:
        if args.workers:
            rate = on_ray(model, args.workers, threads, args.batch, args.steps)
        else:
            rate = in_process(model, threads, args.batch, args.steps)
        secs = args.samples * args.timesteps / rate
        print(
            f"{args.net}: threads {threads}, batch {args.batch}, workers {args.workers or 'none'}: "
            f"{rate:.1f} evals/s = {rate / args.timesteps:.4g} samples/s at T={args.timesteps}; "
            f"{args.samples} samples: {secs:.0f} s = {secs / 3600:.1f} h = {secs / 86400:.1f} days"
        )


if __name__ == "__main__":
    main()
