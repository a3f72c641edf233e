"""Every random draw of a training step as a pure function of (seed, step).

At global step s, each rank draws the timesteps t and the noise eps for the *whole* global batch
from one generator seeded by (seed, s) and keeps its own slice, and reseeds torch's global RNG
(which dropout uses) from (seed, s, rank). Together with :class:`pipeline.data.TrainBatches`
(whose images and flips depend only on (seed, s) too), this makes a step independent of the
history of the RNGs: W workers with batch b see the examples, t and eps that one worker with
batch W*b sees, and a run resumed at step s repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

NOISE_STREAM = 0x6E6F6973  # "nois": timesteps and noise
DROPOUT_STREAM = 0x64726F70  # "drop": torch's global RNG (dropout)


def step_seed(seed: int, step: int, stream: int, rank: int = 0) -> int:
    """A 64-bit seed for (seed, step, stream, rank), decorrelated by numpy's SeedSequence."""
    words = np.random.SeedSequence([seed, step, stream, rank]).generate_state(2, np.uint32)
    return int(words[0]) | int(words[1]) << 32


def diffusion_inputs(
    seed: int,
    step: int,
    num_timesteps: int,
    shape: tuple[int, ...],
    rank: int = 0,
    world_size: int = 1,
) -> tuple[Tensor, Tensor]:
    """This rank's timesteps and noise at ``step``, drawn on the CPU.

    ``shape`` is the global batch's [B, C, H, W]. Returns t, long [B // world_size] in
    [0, num_timesteps), and eps, float32 [B // world_size, C, H, W] ~ N(0, I): rows
    [rank * b, (rank + 1) * b) of what one worker would draw for the whole batch.
    """
    generator = torch.Generator().manual_seed(step_seed(seed, step, NOISE_STREAM))
    t = torch.randint(0, num_timesteps, (shape[0],), generator=generator)
    noise = torch.randn(shape, generator=generator)
    b = shape[0] // world_size
    rows = slice(rank * b, (rank + 1) * b)
    return t[rows], noise[rows]


def seed_dropout(seed: int, step: int, rank: int) -> None:
    """Reseed torch's global RNG (dropout masks) for this step and rank."""
    torch.manual_seed(step_seed(seed, step, DROPOUT_STREAM, rank))
