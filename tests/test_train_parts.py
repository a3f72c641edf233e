"""Training's parts without Ray: warmup, clipping, EMA, the per-step randomness, checkpoints."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.cluster.progress import ProgressDisplay, format_eta
from pipeline.config import TrainConfig
from pipeline.training import faults
from pipeline.training.checkpoint import (
    TrainState,
    capture_rng,
    load_checkpoint,
    read_checkpoint,
    restore_rng,
    save_checkpoint,
)
from pipeline.training.ema import EMA
from pipeline.training.loop import clip_gradients, make_optimizer
from pipeline.training.randomness import diffusion_inputs, step_seed


def small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def test_warmup_is_linear_from_zero_then_flat():
    model = small_net()
    optimizer, schedule = make_optimizer(model, TrainConfig(lr=2e-4, warmup=5))
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    expected = [2e-4 * min(s / 5, 1.0) for s in range(8)]  # official get_warmed_up_lr
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    assert isinstance(optimizer, torch.optim.Adam)


def test_clipping_returns_the_norm_before_clipping_and_bounds_it():
    model = small_net()
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    grads = np.concatenate([p.grad.double().numpy().ravel() for p in model.parameters()])
    norm = clip_gradients(model, 1.0)
    assert norm.item() == pytest.approx(np.linalg.norm(grads), rel=1e-6)
    after = np.concatenate([p.grad.double().numpy().ravel() for p in model.parameters()])
    assert np.linalg.norm(after) == pytest.approx(1.0, rel=1e-5)
    clip_gradients(model, 0.0)  # <= 0: no clipping
    again = np.concatenate([p.grad.double().numpy().ravel() for p in model.parameters()])
    np.testing.assert_array_equal(after, again)


def test_ema_follows_the_official_recursion():
    decay, model = 0.9, small_net()
    ema = EMA(model, decay)
    shadow = [p.detach().double().numpy().copy() for p in model.parameters()]  # starts at init
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        params = [p.detach().double().numpy() for p in model.parameters()]
        shadow = [decay * s + (1 - decay) * p for s, p in zip(shadow, params, strict=True)]
    for got, want in zip(ema.model.parameters(), shadow, strict=True):
        np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_ranks_take_their_slice_of_the_global_draw():
    shape = (8, 3, 4, 4)
    t_all, noise_all = diffusion_inputs(3, 17, 20, shape)
    parts = [diffusion_inputs(3, 17, 20, shape, rank, 2) for rank in range(2)]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), t_all, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), noise_all, rtol=0, atol=0)
    assert t_all.min() >= 0 and t_all.max() < 20 and t_all.dtype == torch.long
    _, noise_next = diffusion_inputs(3, 18, 20, shape)
    assert not torch.equal(noise_next, noise_all)
    assert len({step_seed(0, s, 1, r) for s in range(50) for r in range(4)}) == 200


def test_checkpoint_round_trip_restores_everything(tmp_path):
    def state() -> TrainState:
        torch.manual_seed(0)
        model = small_net()
        optimizer, schedule = make_optimizer(model, TrainConfig(lr=1e-2, warmup=2))
        return TrainState(model, EMA(model, 0.5), optimizer, schedule)

    a = state()
    for _ in range(3):
        a.optimizer.zero_grad()
        a.model(torch.randn(5, 4)).square().sum().backward()
        a.optimizer.step()
        a.schedule.step()
        a.ema.update(a.model)
        a.step += 1
    run = {"name": "v-abc", "config_hash": "abc"}
    save_checkpoint(tmp_path, a, run, seed=7)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    b = state()
    load_checkpoint(tmp_path, b, run)
    assert torch.equal(torch.rand(3), expected[0])  # the RNGs continue from the save
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
    assert b.step == 3 and b.schedule.last_epoch == 3
    for x, y in ((a.model, b.model), (a.ema.model, b.ema.model)):
        for k, v in x.state_dict().items():
            assert torch.equal(v, y.state_dict()[k])
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert read_checkpoint(tmp_path)["data"] == {"seed": 7, "step": 3}
    with pytest.raises(RuntimeError, match="checkpoint of run"):
        load_checkpoint(tmp_path, state(), {"name": "v-def", "config_hash": "def"})


def test_rng_states_are_restored():
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    saved = capture_rng()
    expected = (torch.rand(4), np.random.rand(4), np.random.randn(), random.random())
    torch.manual_seed(2)
    np.random.seed(2)
    random.seed(2)
    restore_rng(saved)
    got = (torch.rand(4), np.random.rand(4), np.random.randn(), random.random())
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]


def test_fault_spec_fires_once(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.ENV, "fail:1:3")
    fault = faults.from_environment()
    model = small_net()
    faults.maybe_inject(fault, tmp_path, 0, 3, model)  # another rank: nothing
    with pytest.raises(faults.InjectedFaultError, match="rank 1 at step 3"):
        faults.maybe_inject(fault, tmp_path, 1, 3, model)
    faults.maybe_inject(fault, tmp_path, 1, 3, model)  # the retry goes through
    monkeypatch.setenv(faults.ENV, "explode:1")
    with pytest.raises(ValueError, match=r"expected fail\|kill\|hang\|nan:RANK:STEP"):
        faults.from_environment()


def test_progress_lines_without_a_terminal():
    stream = io.StringIO()
    display = ProgressDisplay("train v", total=100, stream=stream)
    display.show({"event": "start", "step": 40, "total": 100})
    display.show(
        {"event": "interval", "step": 60, "loss": 0.5, "steps_per_s": 2.0, "images_per_s": 256}
    )
    display.show({"event": "start", "step": 40, "total": 100})
    lines = stream.getvalue().splitlines()
    assert lines == [
        "train v: resumed from the checkpoint at step 40",
        "train v: step 60/100 loss 0.5 2.00 steps/s 256 img/s ETA 20s",
        "train v: restarted from the checkpoint at step 40",
    ]
    assert display.starts == [40, 40]
    assert [format_eta(s) for s in (5, 185, 3725)] == ["5s", "3m05s", "1h02m"]
