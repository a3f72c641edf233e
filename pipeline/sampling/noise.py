"""Per-image seeded noise: item i of a run draws all its noise from its own generator.

The generator of item ``i`` under base seed ``seed`` is a ``torch.Generator`` on the compute
device, seeded with a 64-bit integer mixed from ``(seed, i)`` by numpy's ``SeedSequence``.
Algorithm 2 asks a batch's noise source for x_T, then once per step with t > 0; :class:`ImageNoise`
answers each call by filling row b of one device tensor with the next draw of item indices[b]'s
generator. An image's noise therefore does not depend on the batch it is in, on the batch size,
the block size or the number of workers: together with a batch-invariant network
(pipeline.model.unet on the CPU in float32) a sample's bytes depend only on (seed, i), and a resumed
run (whole blocks recomputed) repeats an uninterrupted one.

Draws are made on the device itself: no host-to-device copy and no host synchronisation per step
(B small kernels launched asynchronously, next to the network's hundreds). The bits depend on
the device type: CPU generators (mt19937) and CUDA generators (Philox) give different, equally
valid normal draws, so the invariance above holds per device type (the sample blocks' cache key
includes it). On the CPU the draws are those of the earlier CPU-then-copy scheme, bit for bit.
The NLL evaluation and Figs. 7/8 use the same source for their q(x_t | x_0) and reverse noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.cluster import taskprogress


def item_seed(seed: int, index: int) -> int:
    """The 64-bit seed of item ``index`` under base seed ``seed`` (SeedSequence mixing)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative (got {seed}, {index})")
    words = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return int(words[0]) | (int(words[1]) << 32)


def stream_seed(seed: int, stream: int) -> int:
    """The base seed of stream ``stream`` (>= 1) of base seed ``seed``: numpy's SeedSequence
    child ``spawn_key=(stream,)``, an independent stream by construction. Stream 0 is ``seed``
    itself (the final sample set); SELECTION_STREAM draws the samples that choose the
    checkpoint during training, so no selection sample is a final sample."""
    if stream == 0:
        return seed
    words = np.random.SeedSequence(seed, spawn_key=(stream,)).generate_state(2, dtype=np.uint32)
    return (int(words[0]) | (int(words[1]) << 32)) >> 1  # 63 bits: a valid torch seed


SELECTION_STREAM = 1  # train.select: best_fid's samples (pipeline.training.eval_during)


def item_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator on ``device`` for item ``index`` (its stream starts at the beginning)."""
    return torch.Generator(device=device).manual_seed(item_seed(seed, index))


class ImageNoise:
    """A ``noise_fn`` for GaussianDiffusion: standard normal draws, one generator per image.

    Args:
        seed: the base seed of the run.
        indices: the items of this batch, in batch order (sample or test-image indices).
        device: where the generators live and the draws are made.
        dtype: dtype of the returned tensors (drawn in float32).

    Calling it with a shape [B, C, H, W], B = len(indices), returns [B, C, H, W] on ``device``:
    row b is the next draw of shape [C, H, W] from item indices[b]'s generator.
    """

    def __init__(
        self,
        seed: int,
        indices: Sequence[int],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.indices = [int(i) for i in indices]
        self.device, self.dtype = torch.device(device), dtype
        self.generators = [item_generator(seed, i, self.device) for i in self.indices]

    def __call__(self, shape: tuple[int, ...]) -> Tensor:
        if not shape or shape[0] != len(self.generators):
            raise ValueError(
                f"noise for {len(self.generators)} images was asked for shape {tuple(shape)}"
            )
        out = torch.empty(tuple(shape), device=self.device, dtype=torch.float32)
        for row, generator in zip(out, self.generators, strict=True):
            row.normal_(generator=generator)
        taskprogress.advance(len(self.generators))  # one image-step each (a Ray task's progress)
        return out if self.dtype == torch.float32 else out.to(self.dtype)
