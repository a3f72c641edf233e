"""Interval statistics of the loss and gradient norm, and the non-finite ("diverged") check.

Each step adds its loss and gradient norm on the device (no host synchronisation); at a log or
checkpoint step :meth:`IntervalStats.close` combines them over the ranks (one all-reduce each
for the sums and for the first non-finite step) and reads them once. Every rank gets the same
answer, so all ranks stop at the same step when training diverges. Divergence is not retried
(it would diverge again): the loop stops and the driver raises :class:`TrainingDivergedError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.errors import UserError


class TrainingDivergedError(UserError):
    """The loss or the gradient norm became NaN or infinite."""


@dataclass(frozen=True)
class Interval:
    """What one logging interval saw, identical on every rank."""

    steps: int  # steps in the interval
    loss: float  # mean training loss over the interval and the global batch
    grad_norm: float  # mean gradient norm (before clipping)
    first_bad_step: int | None  # first step (0-based) with a non-finite loss or norm


class IntervalStats:
    """Device-side sums of the loss and gradient norm since the last :meth:`close`."""

    def __init__(self, device: torch.device):
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self._sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, norm, n
        self._first_bad = torch.full((1,), math.inf, dtype=torch.float64, device=self.device)

    def add(self, step: int, loss: Tensor, grad_norm: Tensor) -> None:
        """Record optimiser step ``step``'s mean loss and gradient norm (device scalars)."""
        values = torch.stack([loss.detach().double(), grad_norm.detach().double()])
        self._sums[:2] += values
        self._sums[2] += 1
        bad = ~torch.isfinite(values).all()
        self._first_bad.copy_(torch.where(bad, self._first_bad.clamp(max=step), self._first_bad))

    def close(self) -> Interval:
        """Combine over the ranks (when distributed), read, and start a new interval."""
        sums, first_bad = self._sums.clone(), self._first_bad.clone()
        world = 1
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
        loss_sum, norm_sum, count = sums.tolist()
        steps = round(count / world)
        bad = first_bad.item()
        self._reset()
        return Interval(
            steps=steps,
            loss=loss_sum / max(count, 1),
            grad_norm=norm_sum / max(count, 1),
            first_bad_step=None if math.isinf(bad) else int(bad),
        )
