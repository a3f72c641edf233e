"""Per-image seeded noise: item i of a run draws all its noise from its own generator.

The generator of item ``i`` under base seed ``seed`` is a CPU ``torch.Generator`` seeded with a
64-bit integer mixed from ``(seed, i)`` by numpy's ``SeedSequence``. Algorithm 2 asks a batch's
noise source for x_T, then once per step with t > 0; :class:`ImageNoise` answers each call with
the stack of per-image draws in index order. An image's noise therefore does not depend on the
batch it is in, on the batch size or on the number of workers: together with a batch-invariant
network (pipeline.unet on the CPU in float32) a sample's bytes depend only on (seed, i).

Draws are made on the CPU (the same bits on every machine) and moved to the target device; at
3x32x32 per image and step this costs microseconds next to the network. The NLL evaluation uses
the same source for the q(x_t | x_0) noise of test image i.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def item_seed(seed: int, index: int) -> int:
    """The 64-bit seed of item ``index`` under base seed ``seed`` (SeedSequence mixing)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative (got {seed}, {index})")
    words = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return int(words[0]) | (int(words[1]) << 32)


def item_generator(seed: int, index: int) -> torch.Generator:
    """A fresh CPU generator for item ``index`` (its noise stream starts at the beginning)."""
    return torch.Generator(device="cpu").manual_seed(item_seed(seed, index))


class ImageNoise:
    """A ``noise_fn`` for GaussianDiffusion: standard normal draws, one generator per image.

    Args:
        seed: the base seed of the run.
        indices: the items of this batch, in batch order (sample or test-image indices).
        device: where the returned tensors live (drawn on the CPU, then moved).
        dtype: dtype of the returned tensors (drawn in float32).

    Calling it with a shape [B, C, H, W], B = len(indices), returns [B, C, H, W]: row b is the
    next draw of shape [C, H, W] from item indices[b]'s generator.
    """

    def __init__(
        self,
        seed: int,
        indices: Sequence[int],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.indices = [int(i) for i in indices]
        self.generators = [item_generator(seed, i) for i in self.indices]
        self.device, self.dtype = torch.device(device), dtype

    def __call__(self, shape: tuple[int, ...]) -> Tensor:
        if not shape or shape[0] != len(self.generators):
            raise ValueError(
                f"noise for {len(self.generators)} images was asked for shape {tuple(shape)}"
            )
        draws = [torch.randn(shape[1:], generator=g) for g in self.generators]
        out = torch.stack(draws) if draws else torch.empty(shape)
        return out.to(device=self.device, dtype=self.dtype)
