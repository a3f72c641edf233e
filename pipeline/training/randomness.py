"""Every random draw of a training step as a pure function of (seed, step), drawn on the device.

At global step s, on the CPU, row r of the global batch (r = rank * b + j for rank ``rank`` of W,
b = B / W rows each) draws its timestep t and its noise eps from its own generator, seeded by a
counter-based mix of (seed, s, r) (splitmix64 over a SeedSequence base); each rank draws only its
own b rows. On a GPU one generator seeded by (seed, s) draws the global batch in two launches
and each rank keeps its rows (a constant number of launches a step; see :func:`diffusion_inputs`).
Either way on the training device, with no host-to-device copy and no host synchronisation.
Torch's global RNG (which dropout uses) is reseeded from (seed, s, rank). Together with
:class:`pipeline.data.TrainBatches` (whose images and flips depend only on (seed, s) too), this
makes a step independent of the history of the RNGs: W workers with batch b see the examples, t
and eps that one worker with batch W*b sees, and a run resumed at step s repeats an
uninterrupted one exactly. CPU (mt19937) and CUDA (Philox) generators draw different bits, so
these equalities hold per device type.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

NOISE_STREAM = 0x6E6F6973  # "nois": timesteps and noise
DROPOUT_STREAM = 0x64726F70  # "drop": torch's global RNG (dropout)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment


def step_seed(seed: int, step: int, stream: int, rank: int = 0) -> int:
    """A 64-bit seed for (seed, step, stream, rank), decorrelated by numpy's SeedSequence."""
    words = np.random.SeedSequence([seed, step, stream, rank]).generate_state(2, np.uint32)
    return int(words[0]) | int(words[1]) << 32


def splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of uint64 ``z`` (elementwise, wrapping): a bijective mix."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def row_seeds(seed: int, step: int, start: int, stop: int) -> np.ndarray:
    """uint64 [stop - start]: the generator seeds of global rows start .. stop-1 at ``step``."""
    base = np.uint64(step_seed(seed, step, NOISE_STREAM))
    with np.errstate(over="ignore"):
        return splitmix64(base + np.arange(start, stop, dtype=np.uint64) * GOLDEN)


def diffusion_inputs(
    seed: int,
    step: int,
    num_timesteps: int,
    shape: tuple[int, ...],
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    per_row: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """This rank's timesteps and noise at ``step``, drawn on ``device``.

    ``shape`` is the global batch's [B, C, H, W]. Returns t, long [B // world_size] in
    [0, num_timesteps), and eps, float32 [B // world_size, C, H, W] ~ N(0, I): rows
    [rank * b, (rank + 1) * b) of what one worker would draw for the whole batch.

    ``per_row`` (default: on the CPU) draws row r from its own generator: row r's values depend
    only on (seed, step, r) and the device type, 2 draws and a generator per row. Otherwise (the
    default on a GPU) one generator seeded by (seed, step) draws the whole global batch's t and
    eps, and the rank keeps its rows: 2 launches a step whatever the batch, and row r's values
    depend on (seed, step, r, B) (still the same for any number of workers and on resume; the
    global batch is fixed by the run's params). A GPU draws B rows where it needs b: at the
    paper's batch (128 x 3 x 32 x 32) that is 1.5 MB of noise, microseconds.
    """
    b = shape[0] // world_size
    device = torch.device(device)
    if per_row is None:
        per_row = device.type == "cpu"
    if not per_row:
        generator = torch.Generator(device=device).manual_seed(step_seed(seed, step, NOISE_STREAM))
        t = torch.randint(0, num_timesteps, shape[:1], generator=generator, device=device)
        noise = torch.randn(shape, generator=generator, device=device)
        rows = slice(rank * b, (rank + 1) * b)
        return t[rows], noise[rows]
    t = torch.empty(b, dtype=torch.long, device=device)
    noise = torch.empty((b, *shape[1:]), dtype=torch.float32, device=device)
    for j, row_seed in enumerate(row_seeds(seed, step, rank * b, (rank + 1) * b).tolist()):
        generator = torch.Generator(device=device).manual_seed(row_seed)
        t[j : j + 1].random_(0, num_timesteps, generator=generator)
        noise[j].normal_(generator=generator)
    return t, noise


def seed_dropout(seed: int, step: int, rank: int, device: torch.device | str | None = None) -> None:
    """Reseed torch's global RNG (dropout masks) for this step and rank.

    On a CPU ``device`` only the CPU generator is reseeded (what dropout there draws from, and
    what ``torch.manual_seed`` sets for the CPU): ``torch.manual_seed`` would also queue a lazy
    reseed of every accelerator backend, capturing a Python traceback each time, on every step.
    """
    value = step_seed(seed, step, DROPOUT_STREAM, rank)
    if device is not None and torch.device(device).type == "cpu":
        torch.default_generator.manual_seed(value)
    else:
        torch.manual_seed(value)
