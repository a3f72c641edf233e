"""The bare loop: one Python process doing a variant's work with diffusers and torch-fidelity.

    python -m benchmarks.bare_loop       # the smoke preset, in a project after make repro
    python -m benchmarks.bare_loop --root DIR --steps 120

The comparison point of the pipeline's per-variant time (issue 27): diffusers' ``UNet2DModel``
with the preset's network (same widths, norm groups, attention resolutions, dropout) and
``DDPMScheduler`` (the preset's T and linear betas, sigma_t^2 = beta_t), trained for
``train.steps`` steps of ``train.batch_size`` images of the prepared train split (uniform random
batches, random flips) with Adam at ``train.lr``, linear warmup, gradient clipping at
``train.grad_clip`` and an EMA at ``train.ema_decay``; then ``sample.n_samples`` samples of the EMA
weights with T ancestral steps at ``sample.batch_size``; then FID against both splits' reference
statistics and IS, with the project's feature network through torch-fidelity (the same call the
evaluate stage makes: ``pipeline.evaluation.fidelity.compute_fid_is``, when ``reference/<scale>``
and the feature network exist under ``--root``; else skipped and said so). No Ray, no DVC, no
MLflow, no checkpoints, no progress, no figures or bound. ``train.torch_threads`` torch threads.

Prints one JSON line: seconds of imports, data, training, sampling and FID/IS, steps/s and
network evaluations/s, and the load average before and after. See benchmarks/README.md for the
side-by-side comparison with ``stages.repro``.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="project (data, reference)")
    parser.add_argument("--scale", default=None, help="default: params.yaml's scale")
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--samples", type=int, default=None, help="default: the preset's")
    parser.add_argument("--sample-steps", type=int, default=None, help="default: T (all)")
    parser.add_argument("--threads", type=int, default=None, help="default: train.torch_threads")
    parser.add_argument(
        "--net",
        choices=("diffusers", "ours"),
        default="diffusers",
        help="the U-Net: diffusers' UNet2DModel (the comparison point) or the project's own, "
        "with its batch-invariant CPU kernels (to tell the network's share from the stage's)",
    )
    parser.add_argument(
        "--marks",
        action="store_true",
        help="print a line as each part starts and every 100 steps (benchmarks.side_by_side "
        "--interleave times them)",
    )
    args = parser.parse_args(argv)
    mark = (lambda text: print(f"bare: {text}", flush=True)) if args.marks else (lambda _: None)
    load_start = os.getloadavg()

    from diffusers import DDPMScheduler

    from benchmarks.baseline import diffusers_unet
    from pipeline.cli import quiet_environment
    from pipeline.config import load_config
    from pipeline.data import open_split, prepare
    from pipeline.layout import data_dir
    from pipeline.model.unet import build_unet

    quiet_environment()
    root = args.root.resolve()
    cfg = load_config(root / "params.yaml", scale=args.scale)
    t, s, d = cfg.train, cfg.sample, cfg.diffusion
    steps = args.steps if args.steps is not None else t.steps
    n_samples = args.samples if args.samples is not None else s.n_samples
    threads = args.threads or t.torch_threads
    torch.set_num_threads(threads)
    timings = {"imports": time.perf_counter() - STARTED}

    clock = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bare-loop-") as tmp:
        folder = root / data_dir(cfg.scale)
        if not (folder / "train").exists() and not any(folder.glob("train*")):
            folder = Path(tmp) / "data"  # no prepared data: prepare it (not the stage's)
            prepare(cfg, folder)
        images = np.ascontiguousarray(open_split(folder, "train")[:])
    data = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    timings["data"] = time.perf_counter() - clock

    clock = time.perf_counter()
    mark("train")
    torch.manual_seed(t.seed)
    unet = build_unet(cfg.model, cfg.data.resolution)
    unet = (diffusers_unet(unet) if args.net == "diffusers" else _Ours(unet)).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    scheduler = DDPMScheduler(num_train_timesteps=d.num_timesteps, beta_start=d.beta_start,
                              beta_end=d.beta_end, beta_schedule="linear",
                              variance_type="fixed_large", clip_sample=True)  # fmt: skip
    params, ema_params = list(unet.parameters()), list(ema.parameters())
    opt = torch.optim.Adam(params, lr=t.lr)
    warm = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(i / t.warmup, 1.0) if t.warmup > 0 else 1.0
    )
    g = torch.Generator().manual_seed(t.seed)
    for step in range(1, steps + 1):
        x = data[torch.randint(0, len(data), (t.batch_size,), generator=g)]
        flip = torch.rand(t.batch_size, generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        noise = torch.randn(x.shape, generator=g)
        ts = torch.randint(0, d.num_timesteps, (t.batch_size,), generator=g)
        opt.zero_grad(set_to_none=True)
        pred = unet(scheduler.add_noise(x, noise, ts), ts).sample
        torch.nn.functional.mse_loss(pred, noise).backward()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        warm.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - t.ema_decay)
        if step % 100 == 0 or step == steps:
            mark(f"step {step}/{steps}")
    timings["train"] = time.perf_counter() - clock

    clock = time.perf_counter()
    mark("sample")
    scheduler.set_timesteps(d.num_timesteps)
    timesteps = scheduler.timesteps[: args.sample_steps or d.num_timesteps]
    g = torch.Generator().manual_seed(s.seed)
    res, out = cfg.data.resolution, []
    with torch.inference_mode():
        for first in range(0, n_samples, s.batch_size):
            x = torch.randn(min(s.batch_size, n_samples - first), 3, res, res, generator=g)
            for step in timesteps:
                x = scheduler.step(ema(x, step).sample, step, x, generator=g).prev_sample
            out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    samples = torch.cat(out).permute(0, 2, 3, 1).numpy() if out else None
    timings["sample"] = time.perf_counter() - clock

    clock = time.perf_counter()
    mark("fid_is")
    metrics = fid_is(cfg, root, samples) if out else {"skipped": "no samples (--samples 0)"}
    timings["fid_is"] = time.perf_counter() - clock
    mark("end")
    timings["total"] = time.perf_counter() - STARTED
    result = {
        "benchmark": "bare_loop",
        "scale": cfg.scale,
        "threads": threads,
        "net": args.net,
        "steps": steps,
        "batch": t.batch_size,
        "samples": n_samples,
        "sample_steps": len(timesteps),
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "train_steps_per_s": round(steps / timings["train"], 2) if steps else None,
        "sample_evals_per_s": round(n_samples * len(timesteps) / timings["sample"], 1)
        if n_samples
        else None,
        "metrics": metrics,
        "load_start": [round(v, 2) for v in load_start],
        "load_end": [round(v, 2) for v in os.getloadavg()],
    }
    print(json.dumps(result))


class _Ours(torch.nn.Module):
    """The project's U-Net called as diffusers' is: ``net(x, t).sample``."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> types.SimpleNamespace:
        t = torch.as_tensor(t)  # the scheduler's loop passes one timestep for the batch
        return types.SimpleNamespace(
            sample=self.unet(x, t.expand(x.shape[0]) if t.dim() == 0 else t)
        )


def fid_is(cfg, root: Path, samples: np.ndarray) -> dict:
    """FID (train, test) and IS with the project's feature network, or why they were skipped."""
    from pipeline.evaluation.feature_weights import project_inception_weights
    from pipeline.evaluation.fidelity import compute_fid_is, inception_options, reference_files
    from pipeline.layout import classifier_path, reference_dir

    reference = root / reference_dir(cfg.scale)
    needs_classifier = cfg.eval.inception_weights == "classifier"
    if not (reference / "manifest.json").is_file() or (
        needs_classifier and not (root / classifier_path(cfg.scale)).is_file()
    ):
        return {"skipped": f"no reference statistics or feature network under {root}"}
    with tempfile.TemporaryDirectory(prefix="bare-fid-") as cache:
        weights = project_inception_weights(cfg, root)
        options = {"is_splits": cfg.eval.is_splits, **inception_options(cfg.eval)}
        return compute_fid_is(samples, reference_files(reference), weights, Path(cache), **options)


if __name__ == "__main__":
    main()
