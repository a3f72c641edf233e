"""The world sizes a run trained on, in its MLflow run: every (re)start's, and each change.

With ``train.num_workers: [min, max]`` (elastic training) Ray Train restarts the worker group on
the workers left after a lost node and regrows it when a node joins; each (re)start begins at
the last checkpoint's step, and rank 0 tells the driver that step and the world size
(:meth:`pipeline.training.monitor.Monitor.start`). :class:`WorldSizes`, a progress sink of the
driver, logs the metric ``world_size`` at that step and, when it differs from the run's
previous world size (this job's, or the last one an earlier job of the run logged), appends
``STEP: FROM -> TO`` to the tag ``ddpm.world_size_changes`` (:data:`TAG_WORLD_SIZES`), which
the report shows under the variant.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.report.tracking import TAG_WORLD_SIZES

log = logging.getLogger(__name__)

METRIC = "world_size"
Change = tuple[int, int, int]  # (step, from, to)


def format_changes(changes: list[Change]) -> str:
    """``[(4, 2, 1)]`` -> ``"4: 2 -> 1"`` (changes joined by ``"; "``)."""
    return "; ".join(f"{step}: {old} -> {new}" for step, old, new in changes)


def parse_changes(text: str | None) -> list[Change]:
    """The inverse of :func:`format_changes` ([] for None or "")."""
    changes = []
    for part in (text or "").split(";"):
        if part.strip():
            step, sizes = part.split(":")
            old, new = sizes.split("->")
            changes.append((int(step), int(old), int(new)))
    return changes


class WorldSizes:
    """A progress sink: each ``start`` update's world size logged to the MLflow run (see the
    module doc). A failing store is warned about once and does not stop training."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri), run_id
        self.changes: list[Change] = []
        self.last: int | None = None
        self._warned = False
        try:  # an earlier job's record of this run
            run = self.client.get_run(run_id)
            self.changes = parse_changes(run.data.tags.get(TAG_WORLD_SIZES))
            history = self.client.get_metric_history(run_id, METRIC)
            latest = max(history, key=lambda m: (m.step, m.timestamp), default=None)
            self.last = None if latest is None else int(latest.value)
        except Exception as e:  # a tracking outage must not stop a long run
            self._warn(e)

    def show(self, update: dict[str, Any]) -> None:
        if update["event"] != "start" or "world_size" not in update:
            return
        step, size = int(update["step"]), int(update["world_size"])
        previous, self.last = self.last, size
        changed = previous is not None and previous != size
        if previous is not None and changed:
            self.changes.append((step, previous, size))
        try:
            self.client.log_metric(self.run_id, METRIC, size, step=step)
            if changed:
                self.client.set_tag(self.run_id, TAG_WORLD_SIZES, format_changes(self.changes))
        except Exception as e:  # a tracking outage must not stop a long run
            self._warn(e)

    def _warn(self, error: Exception) -> None:
        if not self._warned:
            log.warning("MLflow logging failed (training continues): %s", error)
            self._warned = True
