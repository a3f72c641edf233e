"""Noise drawn on the compute device: per-image and per-row generators, what stays invariant."""

from __future__ import annotations

import pytest
import torch

from pipeline.sampling.noise import ImageNoise, item_seed
from pipeline.training.randomness import diffusion_inputs, row_seeds, splitmix64, step_seed

MASK = (1 << 64) - 1


def splitmix64_reference(z: int) -> int:
    """splitmix64's finaliser in Python integers (Steele, Lea & Flood 2014)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_row_seeds_are_splitmix64_of_a_counter():
    base = step_seed(5, 11, 0x6E6F6973)
    want = [splitmix64_reference((base + r * 0x9E3779B97F4A7C15) & MASK) for r in range(3, 9)]
    assert row_seeds(5, 11, 3, 9).tolist() == want
    assert splitmix64(row_seeds(0, 0, 0, 1)).dtype.name == "uint64"
    seeds = {int(s) for step in range(20) for s in row_seeds(0, step, 0, 64)}
    assert len(seeds) == 20 * 64  # distinct across rows and steps


def test_a_training_row_depends_only_on_seed_step_and_row():
    shape, T = (8, 3, 4, 4), 20
    t_all, noise_all = diffusion_inputs(3, 17, T, shape)
    # each row against an independent draw from its own generator
    for r, row_seed in enumerate(row_seeds(3, 17, 0, 8).tolist()):
        g = torch.Generator().manual_seed(row_seed)
        assert int(t_all[r]) == int(torch.randint(0, T, (1,), generator=g))
        assert torch.equal(noise_all[r], torch.randn(shape[1:], generator=g))
    # 4 ranks of 2 rows, or a global batch of 4, see the same rows
    parts = [diffusion_inputs(3, 17, T, shape, rank, 4) for rank in range(4)]
    assert torch.equal(torch.cat([p[0] for p in parts]), t_all)
    assert torch.equal(torch.cat([p[1] for p in parts]), noise_all)
    t_half, noise_half = diffusion_inputs(3, 17, T, (4, 3, 4, 4))
    assert torch.equal(t_half, t_all[:4]) and torch.equal(noise_half, noise_all[:4])
    assert t_all.dtype == torch.long and noise_all.dtype == torch.float32


def test_image_noise_is_drawn_on_its_device_row_by_row():
    noise = ImageNoise(2, [5, 0], dtype=torch.float64)
    first, second = noise((2, 3, 4, 4)), noise((2, 3, 4, 4))
    assert first.dtype == torch.float64 and first.device.type == "cpu"
    for b, index in enumerate([5, 0]):
        g = torch.Generator().manual_seed(item_seed(2, index))
        assert torch.equal(first[b], torch.randn(3, 4, 4, generator=g).double())
        assert torch.equal(second[b], torch.randn(3, 4, 4, generator=g).double())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draws_stay_on_the_device_and_keep_the_invariances():
    shape = (8, 3, 4, 4)
    t_all, noise_all = diffusion_inputs(3, 17, 20, shape, device="cuda")
    assert t_all.is_cuda and noise_all.is_cuda
    parts = [diffusion_inputs(3, 17, 20, shape, rank, 2, "cuda") for rank in range(2)]
    assert torch.equal(torch.cat([p[1] for p in parts]), noise_all)
    a = ImageNoise(1, [3, 4, 5], device="cuda")((3, 3, 4, 4))
    b = ImageNoise(1, [4], device="cuda")((1, 3, 4, 4))
    assert a.is_cuda and torch.equal(a[1], b[0])


def test_batched_draw_is_rank_invariant_with_constant_launches():
    """per_row=False (the GPU default): one generator draws the global batch, each rank keeps
    its rows (any worker count gives the same rows), in the same number of kernels at batch 4
    and 64 (the per-row draw's grow with the batch)."""
    from torch.profiler import ProfilerActivity, profile

    shape = (8, 3, 4, 4)
    t_all, noise_all = diffusion_inputs(3, 17, 20, shape, per_row=False)
    assert t_all.shape == (8,) and noise_all.shape == shape and int(t_all.max()) < 20
    parts = [diffusion_inputs(3, 17, 20, shape, rank, 4, per_row=False) for rank in range(4)]
    assert torch.equal(torch.cat([p[0] for p in parts]), t_all)
    assert torch.equal(torch.cat([p[1] for p in parts]), noise_all)
    assert not torch.equal(diffusion_inputs(3, 18, 20, shape, per_row=False)[1], noise_all)

    def ops(batch: int, per_row: bool) -> int:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            diffusion_inputs(3, 17, 20, (batch, 3, 4, 4), per_row=per_row)
        return sum(e.cpu_parent is None for e in prof.profiler.function_events)

    assert ops(4, False) == ops(64, False) <= 8
    assert ops(64, True) > ops(4, True)
