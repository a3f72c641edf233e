"""The train stage's per-worker loop, in this process: step time against everything around it.

    python -m benchmarks.stage_step --scale smoke --steps 300           # in process
    python -m benchmarks.stage_step --scale smoke --steps 300 --profile # + the top of cProfile

Runs :func:`pipeline.training.loop.run_worker` (what each Ray Train worker runs) through a
:class:`~pipeline.training.session.LocalSession` on the scale's synthetic data, with timers
around the two things a step is made of: ``StepInputs`` (the batch, t and noise, dropout
reseed) and ``train_step`` (forward, backward, clip, Adam, warmup, EMA). Everything else in the
loop (interval statistics, logging, checkpoints, start-up) is the rest. Then the bare step
(:func:`bare_step`: the maths alone on the scale's network and batch: q_sample, forward, MSE,
backward, clip, Adam, EMA lerp on fixed inputs) for as many steps, in the same
process and thread count; the two alternate ``--repeats`` times. Prints one JSON line with
steps/s of the loop, of its steps alone, and of the bare step, CPU seconds of this process, and
the load average; writes ``benchmarks/results/stage-step-<scale>-<date>.json``.
Ray's own costs (worker start-up, ``ray.train.report``) are what ``benchmarks.train_speed``
adds on top: compare its steps/s with this one's.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import pstats
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import results_dir
from benchmarks.run import machine
from benchmarks.train_speed import params
from pipeline.cli import quiet_environment
from pipeline.config import Config, Variant, config_from_dict
from pipeline.data import prepare
from pipeline.layout import data_dir
from pipeline.training import loop
from pipeline.training.session import LocalSession


class Timer:
    """Wall and CPU seconds spent inside a wrapped callable."""

    def __init__(self, fn):
        self.fn, self.wall, self.cpu, self.calls = fn, 0.0, 0.0, 0

    def __call__(self, *args, **kwargs):
        w, c = time.perf_counter(), time.process_time()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.wall += time.perf_counter() - w
            self.cpu += time.process_time() - c
            self.calls += 1


def run_loop(cfg, root: Path, tag: str) -> dict:
    """run_worker in process, timing its steps and inputs."""
    job = loop.TrainJob(cfg, cfg.variant("eps_fixed_mse"), str(root / data_dir(cfg.scale)),
                        str(root), {"name": tag, "config_hash": "0"})  # fmt: skip
    step_timer = Timer(loop.train_step)
    inputs_call = loop.StepInputs.__call__
    inputs_timer = Timer(inputs_call)
    loop.train_step = step_timer
    loop.StepInputs.__call__ = lambda self, step: inputs_timer(self, step)
    try:
        w, c = time.perf_counter(), time.process_time()
        outcome = loop.run_worker(job, LocalSession(root / f"ck-{tag}"))
        wall, cpu = time.perf_counter() - w, time.process_time() - c
    finally:
        loop.train_step = step_timer.fn
        loop.StepInputs.__call__ = inputs_call
    assert outcome["status"] == "finished", outcome
    steps = step_timer.calls
    return {
        "steps": steps,
        "loop_steps_per_s": steps / wall,
        "step_only_steps_per_s": steps / step_timer.wall,
        "wall_s": wall,
        "step_s": step_timer.wall,
        "inputs_s": inputs_timer.wall,
        "rest_s": wall - step_timer.wall - inputs_timer.wall,
        "cpu_s": cpu,
        "step_cpu_s": step_timer.cpu,
    }


VARIANT = Variant("eps_fixed_mse", "eps", "fixedlarge", "mse")


def bare_step(batch: int, cfg: Config) -> Callable[[int], None]:
    """A DDP-like step on ``cfg``'s network: nothing but a training step's maths."""
    state = loop.make_state(cfg, VARIANT, torch.device("cpu"))
    model, diffusion = state.model.train(), loop.make_diffusion(cfg, VARIANT)
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=cfg.train.lr)
    decay, clip = cfg.train.ema_decay, cfg.train.grad_clip
    res, T = cfg.data.resolution, cfg.diffusion.num_timesteps
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, res, res, generator=g) * 2 - 1
    t = torch.randint(0, T, (batch,), generator=g)
    noise = torch.randn(x.shape, generator=g)
    a = torch.as_tensor(diffusion.sqrt_alphas_cumprod, dtype=torch.float32)
    b = torch.as_tensor(diffusion.sqrt_one_minus_alphas_cumprod, dtype=torch.float32)

    def step(_: int) -> None:
        opt.zero_grad(set_to_none=True)
        x_t = a[t].view(-1, 1, 1, 1) * x + b[t].view(-1, 1, 1, 1) * noise
        loss = torch.nn.functional.mse_loss(model(x_t, t), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - decay)

    return step


def run_bare(cfg, steps: int) -> dict:
    """The bare step on the scale's network and batch (fixed inputs, nothing around it)."""
    step = bare_step(cfg.train.batch_size, cfg)
    step(0)
    w, c = time.perf_counter(), time.process_time()
    for s in range(steps):
        step(s)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    return {"steps_per_s": steps / wall, "wall_s": wall, "cpu_s": cpu}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="smoke")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=None, help="default: the scale's")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="print cProfile's top of a loop")
    args = parser.parse_args(argv)
    quiet_environment()
    raw = params(args.scale, argparse.Namespace(
        steps=args.steps, workers=1, threads=args.threads or 1, log_every=args.log_every,
        gpu=False, bf16=False, channels_last=False, batch=None, backend=None))  # fmt: skip
    if args.threads is None:  # the scale's own thread count
        del raw["presets"][args.scale]["train"]["torch_threads"]
        preset_threads = _preset_threads(args.scale)
        if preset_threads:
            raw["presets"][args.scale]["train"]["torch_threads"] = preset_threads
    raw["presets"][args.scale]["train"]["checkpoint_every"] = max(args.steps // 2, 1)
    cfg = config_from_dict(raw)
    torch.set_num_threads(cfg.train.torch_threads)
    load_start = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="stage-step-") as tmp:
        root = Path(tmp)
        prepare(cfg, root / data_dir(cfg.scale))
        for r in range(args.repeats):
            rows.append({"loop": run_loop(cfg, root, f"r{r}"), "bare": run_bare(cfg, args.steps)})
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            run_loop(cfg, root, "profile")
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
            print(text.getvalue())
    best = {
        "loop_steps_per_s": max(r["loop"]["loop_steps_per_s"] for r in rows),
        "step_only_steps_per_s": max(r["loop"]["step_only_steps_per_s"] for r in rows),
        "bare_steps_per_s": max(r["bare"]["steps_per_s"] for r in rows),
    }
    best["loop_over_bare"] = best["loop_steps_per_s"] / best["bare_steps_per_s"]
    result = {
        "benchmark": "stage_step",
        "date": datetime.date.today().isoformat(),
        "machine": machine("cpu"),
        "scale": args.scale,
        "threads": cfg.train.torch_threads,
        "batch": cfg.train.batch_size,
        "steps": args.steps,
        "load_start": [round(v, 2) for v in load_start],
        "load_end": [round(v, 2) for v in os.getloadavg()],
        "best": {k: round(v, 3) for k, v in best.items()},
        "runs": [{k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in r.items()}
                 for r in rows],
    }  # fmt: skip
    (results_dir() / f"stage-step-{args.scale}-{result['date']}.json").write_text(
        json.dumps(result, indent=2) + "\n"
    )
    print(json.dumps(result))


def _preset_threads(scale: str) -> int | None:
    import yaml

    raw = yaml.safe_load(Path("params.yaml").read_text())
    return raw["presets"][scale].get("train", {}).get("torch_threads")


if __name__ == "__main__":
    main()
