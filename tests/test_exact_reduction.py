"""The exact reduction over workers (pipeline/training/replicas.py): the same bits for any W.

The tiny U-Net with dropout, 4 virtual replicas, a clip that bites: the gradient left in .grad
and the weights after a few Adam steps are bit-identical with 1, 2 and 4 real gloo workers and
when the worker count changes at a checkpoint; the fp32 sum they replaced is not (its order
follows W); the fixed-point result equals an independent numpy computation of
round(clip(g_r) 2^k) summed as integers, and is within the documented resolution of the float64
mean of the clipped gradients.
"""

from __future__ import annotations

import math
import multiprocessing as mp
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.training import replicas as replicas_module
from pipeline.training.replicas import FIXED_POINT_BITS, ReplicaClipping, fixed_point_exponent

R, BATCH, CLIP, STEPS = 4, 8, 0.5, 3


def _setup():
    """The tiny preset's config (dropout 0.2, 4 replicas, clip 0.5), its diffusion and x_0."""
    from train_project import tiny_config

    from pipeline.training.loop import make_diffusion

    cfg = tiny_config(clip_replicas=R, grad_clip=CLIP, num_workers=1)
    cfg = replace(cfg, model=replace(cfg.model, dropout=0.2))
    variant = cfg.variant("eps_fixed_mse")
    x = torch.rand(BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return cfg, variant, make_diffusion(cfg, variant), x


def _inputs(cfg, x, step: int, rank: int, world_size: int):
    from pipeline.training.randomness import diffusion_inputs

    b = BATCH // world_size
    t, noise = diffusion_inputs(cfg.train.seed, step, cfg.diffusion.num_timesteps,
                                tuple(x.shape), rank, world_size)  # fmt: skip
    return x[rank * b : (rank + 1) * b], t, noise


def _flat(tensors) -> np.ndarray:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).numpy().copy()


def _train(rank: int, world_size: int, store: str | None) -> dict[str, np.ndarray]:
    """STEPS train_steps of this rank with clip_replicas 4 over ``world_size`` gloo workers:
    the gradient after the first, the weights, EMA and Adam moments after the last."""
    import torch.distributed as dist

    from pipeline.training.loop import make_state, train_step

    torch.set_num_threads(1)
    cfg, variant, diffusion, x = _setup()
    state = make_state(cfg, variant, torch.device("cpu"))
    model: nn.Module = state.model
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world_size)  # fmt: skip
        model = nn.parallel.DistributedDataParallel(state.model)
    clipping = ReplicaClipping(R, rank, world_size, CLIP, cfg.train.seed)
    out: dict[str, np.ndarray] = {}
    for step in range(STEPS):
        inputs = _inputs(cfg, x, step, rank, world_size)
        train_step(model, state, diffusion, *inputs, cfg, clipping)
        if step == 0:
            out["grad"] = _flat(p.grad for p in state.model.parameters())
    if world_size > 1:
        dist.destroy_process_group()
    out["weights"] = _flat(state.model.parameters())
    out["ema"] = _flat(state.ema.state_dict().values())
    moments = state.optimizer.state_dict()["state"].values()
    out["adam"] = _flat(m[k] for m in moments for k in ("exp_avg", "exp_avg_sq"))
    return out


def _child(rank: int, stores: dict[int, str], queue) -> None:
    """Rank ``rank`` of every worker count in ``stores`` it belongs to, largest first."""
    import os

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's sockets on the loopback only
    for world_size in sorted(stores, reverse=True):
        if rank < world_size:
            queue.put((world_size, rank, _train(rank, world_size, stores[world_size])))


def _gloo(stores: dict[int, str]) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    """Every (W, rank)'s result: ranks 1.. in child processes (one each, through every W),
    rank 0 in this one."""
    ctx = mp.get_context("forkserver")  # a fresh process imports torch once; children fork it
    ctx.set_forkserver_preload(["torch", "pipeline.training.loop", "train_project"])
    queue = ctx.Queue()
    children = [ctx.Process(target=_child, args=(r, stores, queue))
                for r in range(1, max(stores))]  # fmt: skip
    for child in children:
        child.start()
    threads = torch.get_num_threads()
    results = {}
    try:
        for world_size in sorted(stores, reverse=True):
            results[(world_size, 0)] = _train(0, world_size, stores[world_size])
    finally:
        torch.set_num_threads(threads)
    for _ in range(sum(w - 1 for w in stores)):
        world_size, rank, got = queue.get(timeout=120)
        results[(world_size, rank)] = got
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    return results


def test_one_two_and_four_gloo_workers_give_the_same_bits(tmp_path, monkeypatch):
    """clip_replicas 4 over W = 1, 2, 4 real gloo workers (DDP, its all-reduce off, the int64
    all-reduce on): every rank's .grad after one step, and the weights, EMA and Adam moments
    after three, equal W = 1's bit for bit."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # gloo's sockets on the loopback only
    threads = torch.get_num_threads()
    try:
        one = _train(0, 1, None)
    finally:
        torch.set_num_threads(threads)
    assert np.abs(one["weights"]).max() > 0 and one["grad"].any()
    results = _gloo({w: str(tmp_path / f"store{w}") for w in (2, 4)})
    assert sorted(results) == [(2, 0), (2, 1), (4, 0), (4, 1), (4, 2), (4, 3)]
    for (world_size, rank), got in results.items():
        for key, value in one.items():
            assert np.array_equal(got[key], value), (world_size, rank, key)


def _replica_gradients(cfg, variant, diffusion, x, step: int) -> list[list[torch.Tensor]]:
    """Each replica's unclipped fp32 gradient, by a plain backward of its own (dropout reseeded
    for the replica as ReplicaClipping does): independent of ReplicaClipping."""
    from pipeline.training.loop import make_state
    from pipeline.training.randomness import seed_dropout

    state = make_state(cfg, variant, torch.device("cpu"))
    x0, t, noise = _inputs(cfg, x, step, 0, 1)
    n = BATCH // R
    out = []
    for r in range(R):
        state.model.zero_grad(set_to_none=True)
        seed_dropout(cfg.train.seed, step, r)
        rows = slice(r * n, (r + 1) * n)
        diffusion.training_losses(state.model, x0[rows], t[rows], noise[rows])[
            "loss"
        ].mean().backward()
        out.append([p.grad.clone() for p in state.model.parameters()])
    return out


def _fixed_point_grad(cfg, variant, diffusion, x) -> tuple[np.ndarray, int]:
    """ReplicaClipping's .grad after step 0 on one worker, and its exponent k."""
    from pipeline.training.loop import forward_backward, make_state

    state = make_state(cfg, variant, torch.device("cpu"))
    clipping = ReplicaClipping(R, 0, 1, CLIP, cfg.train.seed)
    forward_backward(state.model, state, diffusion, *_inputs(cfg, x, 0, 0, 1), cfg, clipping, 1.0)
    return _flat(p.grad for p in state.model.parameters()), clipping.exponent


def test_the_fixed_point_sum_matches_numpy_and_the_float64_mean():
    """Independently, in numpy: each replica's gradient clipped (torch's fp32 coefficient:
    the clip is not what is tested here), times 2^k in fp32, rounded half to even, summed as
    int64, divided by R 2^k in float64, rounded to fp32: equal to ReplicaClipping's .grad bit
    for bit. Against the float64 mean of the replicas clipped in float64: within 2^-k (the
    rounding of each replica to 2^-(k+1), averaged) plus 2^-21 of the mean |clipped gradient|
    (fp32's rounding of the clip and of the result, a few 2^-24)."""
    cfg, variant, diffusion, x = _setup()
    got, k = _fixed_point_grad(cfg, variant, diffusion, x)
    assert k == fixed_point_exponent(R, CLIP) == 60  # 4 * 0.5 = 2 = 0.5 * 2^2: 62 - 2
    grads = _replica_gradients(cfg, variant, diffusion, x, step=0)
    total = np.zeros(got.size, dtype=np.int64)
    ref = np.zeros(got.size, dtype=np.float64)
    ref_abs = np.zeros(got.size, dtype=np.float64)
    clipped_any = False
    for g in grads:
        norm32 = torch.nn.utils.get_total_norm(g, 2.0)
        coef32 = torch.clamp(CLIP / (norm32 + 1e-6), max=1.0) * math.ldexp(1.0, k)
        g32 = _flat(g)
        scaled = g32 * np.float32(coef32.item())  # fp32 x fp32 -> fp32, as torch
        assert scaled.dtype == np.float32
        total += np.rint(scaled.astype(np.float64)).astype(np.int64)  # rint: half to even
        g64 = g32.astype(np.float64)
        norm64 = math.sqrt(float((g64**2).sum()))
        clipped_any |= norm64 > CLIP
        clipped = g64 * min(1.0, CLIP / (norm64 + 1e-6))
        ref += clipped / R
        ref_abs += np.abs(clipped) / R
    assert clipped_any
    expected = (total.astype(np.float64) / (R * math.ldexp(1.0, k))).astype(np.float32)
    assert np.array_equal(got, expected)
    assert np.all(np.abs(got - ref) <= math.ldexp(1.0, -k) + 2.0**-21 * ref_abs)


def test_the_old_fp32_sum_follows_the_worker_count_the_fixed_point_sum_does_not():
    """The 4 clipped replica gradients summed in fp32 as the old code did with W = 1
    (((g0 + g1) + g2) + g3) / 4 and W = 2 ((g0 + g1) / 4 + (g2 + g3) / 4) differ in some
    element for this seed (what made W = 1 and W = 2 end 4.65e-05 apart); their int64
    fixed-point values summed in those orders, and as W = 4 leaves them, do not."""
    cfg, variant, diffusion, x = _setup()
    k = fixed_point_exponent(R, CLIP)
    clipped = []
    for g in _replica_gradients(cfg, variant, diffusion, x, step=0):
        torch.nn.utils.clip_grad_norm_(g, CLIP)  # torch's clip on the gradient list
        clipped.append(torch.from_numpy(_flat(g)))
    g0, g1, g2, g3 = clipped
    one = (((g0 + g1) + g2) + g3) / R
    two = (g0 + g1) / R + (g2 + g3) / R
    assert not torch.equal(one, two)
    q0, q1, q2, q3 = (torch.round(g * math.ldexp(1.0, k)).to(torch.int64) for g in clipped)
    assert torch.equal(((q0 + q1) + q2) + q3, (q0 + q1) + (q2 + q3))
    assert torch.equal((q3 + q2) + (q1 + q0), ((q0 + q1) + q2) + q3)


def _simulated_step(states, cfg, diffusion, x, step, monkeypatch, order) -> None:
    """One train_step of W = len(states) workers in this process: the all-reduce replaced by
    adding the other ranks' local int64 sums (recorded in a first pass) in ``order``."""
    from pipeline.training.loop import forward_backward, train_step

    world_size = len(states)
    clippings = [ReplicaClipping(R, r, world_size, CLIP, cfg.train.seed) for r in range(world_size)]
    local: dict[int, torch.Tensor] = {}
    if world_size > 1:
        monkeypatch.setattr(replicas_module.dist, "all_reduce", lambda tensor: None)
        for r, (state, clipping) in enumerate(zip(states, clippings, strict=True)):
            forward_backward(state.model, state, diffusion, *_inputs(cfg, x, step, r, world_size),
                             cfg, clipping, 1.0)  # fmt: skip
            local[r] = clipping._fixed.clone()
    for r, (state, clipping) in enumerate(zip(states, clippings, strict=True)):

        def all_reduce(tensor, rank=r):
            for other in order(world_size):
                if other != rank:
                    tensor.add_(local[other])

        monkeypatch.setattr(replicas_module.dist, "all_reduce", all_reduce)
        train_step(state.model, state, diffusion, *_inputs(cfg, x, step, r, world_size), cfg,
                   clipping)  # fmt: skip


def _resume(states, folder: Path, world_size: int, cfg, variant):
    """Rank 0's state checkpointed and loaded into ``world_size`` fresh states."""
    from pipeline.training.checkpoint import load_checkpoint, save_checkpoint
    from pipeline.training.loop import make_state

    run = {"name": "exact", "config_hash": "0"}
    save_checkpoint(folder, states[0], run, cfg.train.seed)
    fresh = [make_state(cfg, variant, torch.device("cpu")) for _ in range(world_size)]
    for state in fresh:
        load_checkpoint(folder, state, run)
    return fresh


def test_a_run_resumed_on_another_worker_count_gives_the_same_bits(tmp_path, monkeypatch):
    """At the ReplicaClipping level, workers simulated in this process (their all-reduce: the
    other ranks' local int64 sums added, in two different orders): 4 steps on 1 worker; 2 on
    2 workers, checkpointed, 2 on 1; 2 on 4, checkpointed, 2 on 2: the same weights, EMA and
    Adam state bit for bit, on every rank."""
    from pipeline.training.loop import make_state

    cfg, variant, diffusion, x = _setup()
    forward, backward = (lambda w: range(w)), (lambda w: reversed(range(w)))

    def run(plan, tag):
        states = [make_state(cfg, variant, torch.device("cpu")) for _ in range(plan[0][0])]
        step = 0
        for i, (world_size, steps, order) in enumerate(plan):
            if len(states) != world_size:
                states = _resume(states, tmp_path / f"{tag}-{i}", world_size, cfg, variant)
            for _ in range(steps):
                _simulated_step(states, cfg, diffusion, x, step, monkeypatch, order)
                step += 1
        return [
            (_flat(s.model.parameters()), _flat(s.ema.state_dict().values()),
             _flat(m[k] for m in s.optimizer.state_dict()["state"].values()
                   for k in ("exp_avg", "exp_avg_sq")))
            for s in states
        ]  # fmt: skip

    reference = run([(1, 4, forward)], "one")[0]
    for plan, tag in (
        ([(2, 2, forward), (1, 2, forward)], "two-one"),
        ([(4, 2, backward), (2, 2, forward)], "four-two"),
    ):
        for rank_result in run(plan, tag):
            for got, want in zip(rank_result, reference, strict=True):
                assert np.array_equal(got, want), tag
    start = _flat(make_state(cfg, variant, torch.device("cpu")).model.parameters())
    assert not np.array_equal(reference[0], start)  # it trained


@pytest.mark.parametrize("replicas,grad_clip,k", [(8, 1.0, 58), (4, 0.5, 60), (3, 1.0, 60),
                                                  (8, 0.3, 60), (1, 1e-3, 71)])  # fmt: skip
def test_the_scale_is_the_largest_that_keeps_the_sum_below_2_62(replicas, grad_clip, k):
    """k: R grad_clip 2^k < 2^62 <= R grad_clip 2^(k+1); no positive finite clip, or one that
    leaves k outside 40..126 (a resolution above 2^-40, a scale beyond fp32): no scale."""
    assert fixed_point_exponent(replicas, grad_clip) == k
    bound = replicas * grad_clip
    assert bound * 2.0**k < 2.0**FIXED_POINT_BITS <= bound * 2.0 ** (k + 1)
    for bad in (0.0, -1.0, math.inf, math.nan, 2.0**22 / replicas, 2.0**-66 / replicas):
        with pytest.raises(ValueError, match=r"needs 2\^-65 <= clip_replicas x grad_clip < 2\^22"):
            fixed_point_exponent(replicas, bad)
    assert fixed_point_exponent(replicas, 2.0**22 / replicas * 0.99) == 40
    assert fixed_point_exponent(replicas, 2.0**-65 / replicas) == 126
