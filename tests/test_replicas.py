"""Gradient clipping per virtual replica and the kl loss in bits (the official run's semantics).

Against hand-computed gradients of a one-weight model, and a real 2-process gloo group with
DistributedDataParallel against one process: the same update from 1 and 2 workers, bit for bit
(the exact reduction: more in tests/test_exact_reduction.py).
"""

from __future__ import annotations

import math
import multiprocessing as mp

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.training.loop import clip_gradients
from pipeline.training.replicas import ReplicaClipping

R, BATCH = 4, 8


def _linear_loss(net: nn.Module, x, t, noise):
    return net(x).mean()


def test_per_replica_clipping_clips_where_global_clipping_would_not():
    """Two replicas with gradients +10 and -8: the batch's mean gradient, +1, is within the
    clip of 1.0 and passes unchanged; per replica each is clipped to norm 1 first: (+1 - 1) / 2."""
    x = torch.tensor([[10.0], [-8.0]])  # replica r's gradient on w is x_r
    t, noise = torch.zeros(2, dtype=torch.long), torch.zeros(2, 1)

    net = nn.Linear(1, 1, bias=False)
    _linear_loss(net, x, t, noise).backward()
    norm = clip_gradients(net, 1.0)
    assert float(norm) == pytest.approx(1.0) and float(net.weight.grad) == pytest.approx(1.0)

    net.weight.grad = None
    replicas = ReplicaClipping(2, rank=0, world_size=1, grad_clip=1.0, seed=0)
    loss, norms = replicas.backward(net, net, _linear_loss, x, t, noise, step=0)
    expected = np.mean([np.clip(g, -1.0, 1.0) for g in (10.0, -8.0)])  # one weight: |g| = norm
    assert float(net.weight.grad) == pytest.approx(expected, abs=1e-7) == 0.0
    assert float(norms) == pytest.approx(9.0)  # the mean of the replicas' norms before clipping
    assert float(loss) == pytest.approx(float(net.weight.detach()))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Dropout(0.3), nn.Conv2d(8, 3, 3, padding=1)
    )


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, 4, 4, generator=g) * 3
    return x, torch.zeros(BATCH, dtype=torch.long), torch.randn(BATCH, 3, 4, 4, generator=g)


def _mse_loss(net: nn.Module, x, t, noise):
    return ((net(x) - noise) ** 2).mean() * 50  # large: the clip of 1.0 bites


def _grads(rank: int, world_size: int, store: str | None) -> list[np.ndarray]:
    """This worker's replica-clipped gradient (after the all-reduce when distributed)."""
    torch.set_num_threads(1)
    net = _net()
    model = net
    if world_size > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
        model = nn.parallel.DistributedDataParallel(net)
    x, t, noise = _batch()
    b = BATCH // world_size
    rows = slice(rank * b, (rank + 1) * b)
    replicas = ReplicaClipping(R, rank, world_size, grad_clip=1.0, seed=0)
    replicas.backward(model, net, _mse_loss, x[rows], t[rows], noise[rows], step=3)
    grads = [p.grad.numpy().copy() for p in net.parameters()]
    if world_size > 1:
        dist.destroy_process_group()
    return grads


def _worker(rank: int, store: str, out) -> None:
    out.put((rank, _grads(rank, 2, store)))


def test_one_and_two_workers_give_the_same_update(tmp_path):
    one = _grads(0, 1, None)
    x, t, noise = _batch()  # independently: the mean of each replica's clipped gradient
    reference = [np.zeros_like(g) for g in one]
    for r in range(R):
        from pipeline.training.randomness import seed_dropout

        net = _net()
        seed_dropout(0, 3, r)
        rows = slice(r * BATCH // R, (r + 1) * BATCH // R)
        _mse_loss(net, x[rows], t[rows], noise[rows]).backward()
        grads = [p.grad.double().numpy() for p in net.parameters()]
        norm = math.sqrt(sum((g**2).sum() for g in grads))
        assert norm > 1.0  # every replica is clipped
        for acc, g in zip(reference, grads, strict=True):
            acc += g * min(1.0, 1.0 / (norm + 1e-6)) / R
    for g, ref in zip(one, reference, strict=True):
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-7)

    ctx = mp.get_context("spawn")  # rank 1 in a new process, rank 0 in this one
    out = ctx.Queue()
    child = ctx.Process(target=_worker, args=(1, str(tmp_path / "store"), out))
    child.start()
    threads = torch.get_num_threads()
    results = {0: _grads(0, 2, str(tmp_path / "store"))}
    torch.set_num_threads(threads)
    results.update([out.get(timeout=120)])
    child.join(timeout=60)
    assert child.exitcode == 0
    for rank in (0, 1):  # every worker holds the same averaged gradient: one worker's, exactly
        for g, ref in zip(results[rank], one, strict=True):
            np.testing.assert_array_equal(g, ref)


def test_kl_loss_trains_in_bits_and_nats_stay_selectable():
    """train.kl_units: bits (the official meanflat(kl) / log 2, the default) or nats; the mse
    loss is unaffected. One train_step of the tiny network on the same inputs both ways."""
    from train_project import tiny_config

    from pipeline.training.loop import loss_scale, make_diffusion, make_state, train_step

    losses = {}
    for units in ("bits", "nats"):
        cfg = tiny_config(kl_units=units)
        variant = cfg.variant("eps_fixed_kl")
        assert loss_scale(cfg, cfg.variant("eps_fixed_mse")) == 1.0
        state = make_state(cfg, variant, torch.device("cpu"))
        g = torch.Generator().manual_seed(0)
        x = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
        t, noise = torch.tensor([0, 3, 9, 19]), torch.randn(4, 3, 8, 8, generator=g)
        scale = loss_scale(cfg, variant)
        loss, _ = train_step(state.model, state, make_diffusion(cfg, variant), x, t, noise, cfg,
                             None, scale)  # fmt: skip
        losses[units] = float(loss)
    assert losses["bits"] == pytest.approx(losses["nats"] / math.log(2), rel=1e-5)


def test_the_loop_trains_with_replica_clipping(tmp_path):
    """run_worker with clip_replicas 4 (2 images each): finishes, finite, differs from 1."""
    from train_project import VARIANT, make_project, tiny_config

    from pipeline.training.loop import TrainJob, run_worker
    from pipeline.training.session import LocalSession

    make_project(tmp_path)
    weights = {}
    for replicas in (1, 4):
        cfg = tiny_config(num_workers=1, steps=2, clip_replicas=replicas, grad_clip=0.01)
        job = TrainJob(cfg, cfg.variant(VARIANT), str(tmp_path / "data" / cfg.scale),
                       str(tmp_path), {"name": "r", "config_hash": "0"})  # fmt: skip
        session = LocalSession(tmp_path / f"ck{replicas}")
        assert run_worker(job, session)["status"] == "finished"
        assert math.isfinite(session.reports[-1]["loss"])
        folder = next((tmp_path / f"ck{replicas}").glob("checkpoint_*"))
        weights[replicas] = torch.load(folder / "state.pt", weights_only=False)["model"]
    assert any(not torch.equal(weights[1][k], weights[4][k]) for k in weights[1])


class _PerParameterReplicas(ReplicaClipping):
    """The implementation before issue 27 (per-parameter accumulation in fp32, cat, clones
    back): the flat fixed-point one must stay within fp32 rounding of it."""

    def backward(self, model, module, loss_fn, x_start, t, noise, step):
        import contextlib

        from pipeline.training.randomness import seed_dropout

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


def test_fixed_point_update_is_within_fp32_rounding_of_per_parameter_accumulation():
    """Four train_steps of the tiny U-Net (dropout on, 4 replicas, a clip that bites on some
    replicas and not others) with the flat fixed-point ReplicaClipping and with the fp32
    per-parameter implementation it replaced: the same losses and norms where the weights are
    the same (step 0: warmup's lr is 0), the gradients apart by fp32 rounding only (at most
    1e-6 of the largest element: the fp32 sum of 4 rounds each addition to 2^-24 of its
    partial sum) but not bit-identical (the fp32 sum is not the exact one), and the losses of
    the later steps within 1e-5."""
    from dataclasses import replace

    from train_project import tiny_config

    from pipeline.training.loop import make_diffusion, make_state, train_step
    from pipeline.training.randomness import diffusion_inputs

    cfg = tiny_config(clip_replicas=4, grad_clip=0.5)
    cfg = replace(cfg, model=replace(cfg.model, dropout=0.2))
    variant = cfg.variant("eps_fixed_mse")
    diffusion = make_diffusion(cfg, variant)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1
    runs = {}
    for name, cls in (("fixed", ReplicaClipping), ("old", _PerParameterReplicas)):
        state = make_state(cfg, variant, torch.device("cpu"))
        replicas = cls(4, 0, 1, cfg.train.grad_clip, cfg.train.seed)
        out, grads = [], []
        for step in range(4):
            t, noise = diffusion_inputs(0, step, cfg.diffusion.num_timesteps, tuple(x.shape))
            out.append(train_step(state.model, state, diffusion, x, t, noise, cfg, replicas))
            grads.append(torch.cat([p.grad.reshape(-1) for p in state.model.parameters()]))
        runs[name] = (out, grads)
    (out_a, grads_a), (out_b, grads_b) = runs["fixed"], runs["old"]
    norms = torch.stack([n for _, n in out_a])
    assert (norms > 0.5).any() and len({round(float(n), 4) for n in norms}) > 1
    assert torch.equal(out_a[0][0], out_b[0][0]) and torch.equal(out_a[0][1], out_b[0][1])
    diff = (grads_a[0] - grads_b[0]).abs().max()
    assert 0 < diff <= 1e-6 * grads_b[0].abs().max()
    for (la, na), (lb, nb) in zip(out_a[1:], out_b[1:], strict=True):
        assert float(la) == pytest.approx(float(lb), rel=1e-5)
        assert float(na) == pytest.approx(float(nb), rel=1e-5)


ACCUMULATION_OPS = {"aten::add_", "aten::_foreach_add_", "aten::cat", "aten::clone",
                    "aten::zeros_like", "aten::copy_", "aten::div", "aten::mul_",
                    "aten::_foreach_copy_", "aten::round_"}  # fmt: skip


def test_flat_buffer_launches_do_not_grow_with_the_parameters():
    """The accumulation costs a constant number of kernels per replica: a network with 4x the
    parameter tensors adds no launches outside backward and the clip."""
    from torch.profiler import ProfilerActivity, profile

    def count(layers: int, cls: type = ReplicaClipping) -> int:
        torch.manual_seed(0)
        net = nn.Sequential(*[nn.Linear(4, 4) for _ in range(layers)])
        replicas = cls(2, 0, 1, grad_clip=1.0, seed=0)
        x = torch.randn(4, 4)
        loss = lambda m, a, b, c: m(a).square().mean()  # noqa: E731
        replicas.backward(net, net, loss, x, x, x, step=0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            replicas.backward(net, net, loss, x, x, x, step=1)
        top = [e.name for e in prof.profiler.function_events if e.cpu_parent is None]
        return sum(n in ACCUMULATION_OPS for n in top)

    assert count(8) == count(2) > 0
    assert count(8, _PerParameterReplicas) > count(2, _PerParameterReplicas)  # the old one grew


def test_train_compile_compiles_the_wrapped_network(tmp_path, monkeypatch):
    """train.compile: run_worker hands the session-wrapped network to torch.compile once and
    trains through what it returns (torch.compile replaced by a recorder: inductor needs a
    compiler and minutes here); the key does not change the run's name."""
    from train_project import VARIANT, make_project, tiny_config

    from pipeline.training import loop
    from pipeline.training.identity import run_identity
    from pipeline.training.session import LocalSession

    calls, forwards = [], []

    class Compiled(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            forwards.append(1)
            return self.inner(*args)

    def fake_compile(model):
        calls.append(model)
        return Compiled(model)

    monkeypatch.setattr(loop.torch, "compile", fake_compile)
    make_project(tmp_path)
    cfg = tiny_config(num_workers=1, steps=2, compile=True)
    job = loop.TrainJob(cfg, cfg.variant(VARIANT), str(tmp_path / "data" / cfg.scale),
                        str(tmp_path), {"name": "c", "config_hash": "0"})  # fmt: skip
    session = LocalSession(tmp_path / "ck")
    assert loop.run_worker(job, session)["status"] == "finished"
    assert len(calls) == 1 and isinstance(calls[0], nn.Module) and len(forwards) == 2
    data = tmp_path / "data" / cfg.scale
    plain = tiny_config(num_workers=1, steps=2)
    variant = cfg.variant(VARIANT)
    assert run_identity(cfg, variant, data)["name"] == run_identity(plain, variant, data)["name"]
