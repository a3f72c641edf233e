"""Rank 0's account of training: the metrics of each logging interval, sent to the driver.

Per interval: ``loss`` (mean over the interval and the global batch), ``lr``, ``grad_norm``
(mean, before clipping), ``steps_per_s`` and ``images_per_s`` (wall clock, global batch), at
step = optimiser steps done. They go to the driver's progress board (a Ray actor, see
:mod:`pipeline.cluster.progress`), which shows them and logs them to the variant's MLflow run:
the workers never need to reach the tracking store (a SQLite file on the driver's machine, by
default). A loop in the driver's own process (``train.backend: process``) is given the driver's
:class:`~pipeline.cluster.progress.Sinks` as its board instead: the updates go to them directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pipeline.cluster.progress import Sinks


@dataclass(frozen=True)
class Interval:
    """What one logging interval saw, identical on every rank (``loop.IntervalStats.close``)."""

    steps: int  # steps in the interval
    loss: float  # mean training loss over the interval and the global batch
    grad_norm: float  # mean gradient norm (before clipping)
    first_bad_step: int | None  # first step (0-based) with a non-finite loss or norm


class Monitor:
    """Sends interval metrics to ``board`` (a Ray actor, or the driver's sinks) when ``enabled``
    (rank 0); a no-op elsewhere."""

    def __init__(self, enabled: bool, global_batch: int, board: Any = None):
        self.enabled, self.global_batch = enabled, global_batch
        self.board = board if enabled else None
        self._clock = time.perf_counter()
        self._last: Any = None  # the last push (an ObjectRef)

    def start(self, step: int, total: int, world_size: int = 1) -> None:
        """Training (re)starts at ``step`` of ``total`` on ``world_size`` workers; the clock
        starts now."""
        self._clock = time.perf_counter()
        self._push({"event": "start", "step": step, "total": total, "world_size": world_size})

    def interval(self, step: int, stats: Interval, lr: float) -> dict[str, float]:
        """The metrics of the interval that ended after ``step`` optimiser steps (and send them)."""
        now = time.perf_counter()
        steps_per_s = stats.steps / max(now - self._clock, 1e-9)
        self._clock = now
        metrics = {
            "loss": stats.loss,
            "lr": lr,
            "grad_norm": stats.grad_norm,
            "steps_per_s": steps_per_s,
            "images_per_s": steps_per_s * self.global_batch,
        }
        self._push({"event": "interval", "step": step, **metrics})
        return metrics

    def close(self, timeout: float = 10.0) -> None:
        """Wait until the board has everything sent (pushes from one caller arrive in order)."""
        if self._last is not None:
            import ray

            ray.wait([self._last], timeout=timeout)

    def _push(self, update: dict[str, Any]) -> None:
        if isinstance(self.board, Sinks):  # this process is the driver
            self.board.show(update)
        elif self.board is not None:
            self._last = self.board.push.remote(update)
