"""The training curves in the variant's MLflow run, logged by the driver as they arrive."""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)

CURVES = ("loss", "lr", "grad_norm", "steps_per_s", "images_per_s")


class MlflowCurves:
    """A progress sink: each interval update becomes one ``log_batch`` at its step.

    Steps already logged by this driver are skipped (a restarted worker group repeats the steps
    after its checkpoint, with identical values). A failing store is warned about once and does
    not stop training.
    """

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri), run_id
        self.logged_to = -1
        self._warned = False

    def show(self, update: dict[str, Any]) -> None:
        if update["event"] != "interval" or update["step"] <= self.logged_to:
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        step = update["step"]
        batch = [Metric(k, float(update[k]), stamp, step) for k in CURVES]
        try:
            self.client.log_batch(self.run_id, metrics=batch)
            self.logged_to = step
        except Exception as e:  # a tracking outage must not stop a long run
            if not self._warned:
                log.warning("MLflow logging failed (training continues): %s", e)
                self._warned = True
