"""Rank 0's account of training: metrics per logging interval to MLflow and to the driver.

Per interval: ``loss`` (mean over the interval and the global batch), ``lr``, ``grad_norm``
(mean, before clipping), ``steps_per_s`` and ``images_per_s`` (wall clock, global batch), all at
MLflow step = optimiser steps done. The same numbers go to the driver's progress board (a Ray
actor, see :mod:`pipeline.training.progress`). A tracking store that fails is warned about once
and does not stop training.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.training.divergence import Interval

log = logging.getLogger(__name__)


class Monitor:
    """Logs intervals when ``enabled`` (rank 0); a no-op on the other ranks."""

    def __init__(
        self,
        enabled: bool,
        global_batch: int,
        mlflow_uri: str | None = None,
        mlflow_run_id: str | None = None,
        board: Any = None,
    ):
        self.enabled, self.global_batch, self.board = enabled, global_batch, board
        self.run_id = mlflow_run_id if enabled else None
        self.client = None
        if self.run_id:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri=mlflow_uri)
        self._warned = False
        self._clock = time.perf_counter()

    def start(self, step: int, total: int) -> None:
        """Training (re)starts at ``step`` of ``total``; the clock starts now."""
        self._clock = time.perf_counter()
        self._push({"event": "start", "step": step, "total": total})

    def interval(self, step: int, stats: Interval, lr: float) -> dict[str, float]:
        """Log the interval that ended after ``step`` optimiser steps; returns its metrics."""
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
        if self.enabled:
            self._log_mlflow(step, metrics)
            self._push({"event": "interval", "step": step, **metrics})
        return metrics

    def _push(self, update: dict[str, Any]) -> None:
        if self.enabled and self.board is not None:
            self.board.push.remote(update)

    def _log_mlflow(self, step: int, metrics: dict[str, float]) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
        try:
            self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
        except Exception as e:  # a tracking outage must not stop a long run
            if not self._warned:
                log.warning("MLflow logging failed (training continues): %s", e)
                self._warned = True
