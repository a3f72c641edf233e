"""Host overhead of a training step: ours against a bare DDP-like step, on a network so thin that
compute is negligible (the paper's U-Net layout, 32x32, ch 4: the same ~220 parameter tensors).

    python -m benchmarks.step_overhead                # batch 16 (the paper's per-GPU batch)
    python -m benchmarks.step_overhead --steps 50 --repeats 3

Per step, in one process, one torch thread, the cases interleaved (A/B/A/B) so that a loaded
machine slows them alike:

- ``kernel_launches_per_step``: top-level aten ops the profiler records (each is at least one
  kernel launch on a GPU; a foreach op is one launch per ~chunk of tensors there),
- ``python_calls_per_step``: Python function calls (cProfile),
- ``cpu_ms_per_step``: this process's CPU time (``time.process_time``) per step, the best of
  ``--repeats`` (robust to other processes on a shared machine), and ``wall_ms_per_step``.

Cases: ``bare`` (zero_grad, q_sample, forward, MSE, backward, clip_grad_norm_, Adam, foreach EMA
lerp, on given t and noise); ``ours`` (``StepInputs``-equivalent draws of t and noise, dropout
reseed, ``train_step``: warmup schedule, EMA, interval statistics) with the whole batch clipped
(``clip_replicas: 1``); ``ours_replica`` (one clipped replica per worker: the paper's 8 GPUs of 16
images; the all-reduce itself is not run) and ``ours_replicas8`` (one worker holding 8 replicas of
2 images); each ``*_old`` the same with the per-parameter replica accumulation that issue 27
replaced. Also the noise draw alone, per row (CPU default) and batched (GPU default). Prints one
JSON line; writes ``benchmarks/results/step-overhead-<date>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import json
import os
import pstats
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import results_dir
from benchmarks.run import machine
from pipeline.config import Config, DataConfig, DiffusionConfig, ModelConfig, TrainConfig, Variant
from pipeline.training.loop import (
    IntervalStats,
    clip_gradients,
    make_diffusion,
    make_state,
    train_step,
)
from pipeline.training.randomness import diffusion_inputs, seed_dropout
from pipeline.training.replicas import ReplicaClipping

THIN = ModelConfig(ch=4, norm_groups=4, dropout=0.1)


class PerParameterReplicas(ReplicaClipping):
    """Replica clipping as it was before issue 27: per-parameter accumulation, a concatenation
    and per-parameter clones back (the reference of tests/test_replicas.py's bit-identity test).
    """

    def backward(self, model, module, loss_fn, x_start, t, noise, step):
        module.zero_grad(set_to_none=True)  # what the old train_step did before calling it
        params = [p for p in module.parameters() if p.requires_grad]
        total = [torch.zeros_like(p) for p in params]
        n = x_start.shape[0] // self.local
        losses, norms = [], []
        sync = model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()
        with sync:
            for i in range(self.local):
                rows = slice(i * n, (i + 1) * n)
                seed_dropout(self.seed, step, self.first + i)
                loss = loss_fn(model, x_start[rows], t[rows], noise[rows])
                loss.backward()
                norms.append(clip_gradients(module, self.grad_clip))
                for acc, p in zip(total, params, strict=True):
                    if p.grad is not None:
                        acc.add_(p.grad)
                        p.grad = None
                losses.append(loss.detach())
        flat = torch.cat([g.reshape(-1) for g in total]) / self.replicas
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        return torch.stack(losses).mean(), torch.stack(norms).mean()


def _config(batch: int, replicas: int) -> Config:
    train = TrainConfig(batch_size=batch, clip_replicas=replicas, warmup=10, ema_decay=0.9999)
    return Config("bench", data=DataConfig(resolution=32), model=THIN, train=train,
                  diffusion=DiffusionConfig())  # fmt: skip


VARIANT = Variant("eps_fixed_mse", "eps", "fixedlarge", "mse")


def bare_step(batch: int, cfg: Config | None = None) -> Callable[[int], None]:
    """A DDP-like step on the same network (or ``cfg``'s): nothing but a training step's maths."""
    cfg = cfg or _config(batch, 1)
    state = make_state(cfg, VARIANT, torch.device("cpu"))
    model, diffusion = state.model.train(), make_diffusion(cfg, VARIANT)
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


def our_step(batch: int, replicas: int, world: int = 1, old: bool = False) -> Callable[[int], None]:
    """The pipeline's step as run_worker runs it (inputs drawn, dropout reseeded, stats)."""
    cfg = _config(batch * world, replicas)
    state = make_state(cfg, VARIANT, torch.device("cpu"))
    model, diffusion = state.model.train(), make_diffusion(cfg, VARIANT)
    cls = PerParameterReplicas if old else ReplicaClipping
    clip = cls(replicas, 0, world, 1.0, 0) if replicas > 1 else None
    if replicas == world > 1:  # one replica per worker: this worker's share, without the all-reduce
        clip = cls(1, 0, 1, 1.0, 0)
        clip.replicas = replicas
    stats = IntervalStats(torch.device("cpu"))
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    shape = (batch * world, 3, 32, 32)

    def step(s: int) -> None:
        t, noise = diffusion_inputs(0, s, 1000, shape, 0, world)
        seed_dropout(0, s, 0, "cpu")
        loss, norm = train_step(model, state, diffusion, x, t, noise, cfg, clip)
        stats.add(s, loss, norm)

    return step


def noise_draw(batch: int, per_row: bool) -> Callable[[int], None]:
    return lambda s: diffusion_inputs(0, s, 1000, (batch, 3, 32, 32), per_row=per_row)


def count_ops(fn: Callable[[int], None], step: int) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(step)
    return sum(e.cpu_parent is None and e.name.startswith("aten::")
               for e in prof.profiler.function_events)  # fmt: skip


def count_calls(fn: Callable[[int], None], step: int) -> int:
    profiler = cProfile.Profile()
    profiler.enable()
    fn(step)
    profiler.disable()
    return pstats.Stats(profiler).total_calls  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="images per worker")
    parser.add_argument("--steps", type=int, default=20, help="steps per timing")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    b = args.batch
    cases = {
        "bare": bare_step(b),
        "ours": our_step(b, 1),
        "ours_replica": our_step(b, 8, world=8),
        "ours_replica_old": our_step(b, 8, world=8, old=True),
        "ours_replicas8": our_step(b, 8),
        "ours_replicas8_old": our_step(b, 8, old=True),
        "noise_per_row": noise_draw(b, True),
        "noise_batched": noise_draw(b, False),
    }
    load_start = os.getloadavg()
    rows: dict[str, dict[str, float]] = {name: {} for name in cases}
    for name, fn in cases.items():
        fn(0)  # warm-up
        rows[name]["kernel_launches_per_step"] = count_ops(fn, 1)
        rows[name]["python_calls_per_step"] = count_calls(fn, 2)
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    wall: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(args.repeats):  # interleaved: every case once per round
        for name, fn in cases.items():
            c0, w0 = time.process_time(), time.perf_counter()
            for s in range(args.steps):
                fn(10 + r * args.steps + s)
            cpu[name].append((time.process_time() - c0) / args.steps * 1e3)
            wall[name].append((time.perf_counter() - w0) / args.steps * 1e3)
    for name in cases:
        rows[name]["cpu_ms_per_step"] = round(min(cpu[name]), 3)
        rows[name]["wall_ms_per_step"] = round(min(wall[name]), 3)
    result = {
        "benchmark": "step_overhead",
        "date": datetime.date.today().isoformat(),
        "machine": machine("cpu"),
        "network": "paper U-Net layout, ch 4, 32x32",
        "parameter_tensors": sum(1 for _ in make_state(_config(b, 1), VARIANT,
                                                       torch.device("cpu")).model.parameters()),
        "batch": b,
        "steps": args.steps,
        "repeats": args.repeats,
        "load_start": [round(v, 2) for v in load_start],
        "load_end": [round(v, 2) for v in os.getloadavg()],
        "rows": rows,
    }  # fmt: skip
    path = results_dir() / f"step-overhead-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
