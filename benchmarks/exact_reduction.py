"""The exact reduction's cost: a replica-clipped training step, int64 fixed point against fp32.

    python -m benchmarks.exact_reduction                      # tiny, 4 replicas, 1 thread
    python -m benchmarks.exact_reduction --scale smoke --replicas 8 --seconds 10
    python -m benchmarks.exact_reduction --device cuda --scale paper --replicas 8   # on a GPU
    python -m benchmarks.exact_reduction --device cuda --scale paper --replicas 8 --deterministic

Times :func:`pipeline.training.loop.train_step` (each replica's forward and backward, its clip,
the sum over the replicas, Adam, the warmup, the EMA) on the scale's network and batch with
``clip_replicas`` R, one worker, on fixed inputs: with the exact sum
(:class:`~pipeline.training.replicas.ReplicaClipping`: int64 fixed point) and with the fp32 sum
it replaced (:class:`Fp32Sum`), in turns (A/B/A/B...) of ``--seconds`` each, ``--rounds`` times,
after one warm-up step each. Prints one JSON line with steps/s of each turn, the exact over fp32
ratio per round and overall, this process's CPU milliseconds a step (steadier than steps/s on
a shared machine), the machine and the load average (start and end); writes
``benchmarks/results/exact-reduction-<scale>-<device>-<date>.json``. One worker: the
all-reduce's int64 (8 bytes a parameter instead of 4) is not in this figure. With
``--deterministic`` the process first asks for the training workers' deterministic kernels
(:func:`pipeline.cluster.devices.deterministic_training`: on a GPU; nothing on the CPU): run it
with and without on a GPU for their cost.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from dataclasses import replace

import torch

from benchmarks import results_dir
from benchmarks.run import machine
from pipeline.cli import quiet_environment
from pipeline.cluster import devices
from pipeline.config import Variant, load_config
from pipeline.training import loop
from pipeline.training.randomness import diffusion_inputs
from pipeline.training.replicas import ReplicaClipping

VARIANT = Variant("eps_fixed_mse", "eps", "fixedlarge", "mse")


class Fp32Sum(ReplicaClipping):
    """The accumulation the exact one replaced: each clipped replica gradient added into the
    flat fp32 ``.grad`` buffer (one ``_foreach_add_``), divided by R, all-reduced in fp32."""

    def _add(self, i: int, grads: tuple[torch.Tensor, ...], views: list[torch.Tensor]):
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        coef = torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(list(grads), coef)
        if i == 0:
            self._grad.zero_()
        torch._foreach_add_(views, grads)
        return norm

    def _reduce(self) -> None:
        self._grad.div_(self.replicas)
        if self.world_size > 1:
            torch.distributed.all_reduce(self._grad)


def stepper(cfg, device: torch.device, replicas: int, cls: type[ReplicaClipping]):
    """One train_step of ``cfg``'s network on fixed inputs, summing with ``cls``."""
    state = loop.make_state(cfg, VARIANT, device)
    diffusion = loop.make_diffusion(cfg, VARIANT)
    clipping = cls(replicas, 0, 1, cfg.train.grad_clip, cfg.train.seed)
    res, batch = cfg.data.resolution, cfg.train.batch_size
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 3, res, res, generator=g) * 2 - 1).to(device)
    t, noise = diffusion_inputs(0, 0, cfg.diffusion.num_timesteps, tuple(x.shape), device=device)

    def step() -> None:
        loop.train_step(state.model, state, diffusion, x, t, noise, cfg, clipping)

    return step


def timed(step, seconds: float, device: torch.device) -> dict:
    """Steps of ``step`` for at least ``seconds``: steps/s in wall and CPU time."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    steps, w, c = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - w < seconds:
        step()
        steps += 1
    sync()
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    return {"steps": steps, "wall_s": round(wall, 3), "steps_per_s": round(steps / wall, 3),
            "cpu_s": round(cpu, 3), "cpu_ms_per_step": round(1000 * cpu / steps, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="tiny")
    parser.add_argument("--replicas", type=int, default=4, help="clip_replicas (divides batch)")
    parser.add_argument("--seconds", type=float, default=3.0, help="per turn")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--deterministic", action="store_true", help="GPU: deterministic kernels")
    args = parser.parse_args(argv)
    quiet_environment()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.deterministic:
        devices.deterministic_training(device.type)
    cfg = load_config(None, args.scale)
    cfg = replace(cfg, train=replace(cfg.train, clip_replicas=args.replicas))
    steps = {"exact": stepper(cfg, device, args.replicas, ReplicaClipping),
             "fp32": stepper(cfg, device, args.replicas, Fp32Sum)}  # fmt: skip
    for step in steps.values():
        step()  # warm-up
    load_start = os.getloadavg()
    rounds = []
    for _ in range(args.rounds):
        turns = {name: timed(step, args.seconds, device) for name, step in steps.items()}
        turns["ratio"] = round(turns["exact"]["steps_per_s"] / turns["fp32"]["steps_per_s"], 3)
        rounds.append(turns)
    exact, fp32 = (sum(r[k]["steps"] for r in rounds) / sum(r[k]["wall_s"] for r in rounds)
                   for k in ("exact", "fp32"))  # fmt: skip
    result = {
        "benchmark": "exact_reduction",
        "date": datetime.date.today().isoformat(),
        "machine": machine(device.type),
        "scale": args.scale,
        "device": device.type,
        "threads": args.threads,
        "batch": cfg.train.batch_size,
        "replicas": args.replicas,
        "deterministic": args.deterministic,
        "seconds_per_turn": args.seconds,
        "load_start": [round(v, 2) for v in load_start],
        "load_end": [round(v, 2) for v in os.getloadavg()],
        "rounds": rounds,
        "steps_per_s": {"exact": round(exact, 3), "fp32": round(fp32, 3)},
        "exact_over_fp32": round(exact / fp32, 3),
        "cpu_ms_per_step": {
            k: round(
                1000 * sum(r[k]["cpu_s"] for r in rounds) / sum(r[k]["steps"] for r in rounds), 1
            )
            for k in ("exact", "fp32")
        },
    }
    kernels = "-deterministic" if args.deterministic else ""
    name = f"exact-reduction-{args.scale}-{device.type}{kernels}-{result['date']}.json"
    (results_dir() / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
