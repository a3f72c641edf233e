"""Training in the train stage's own process (``train.backend: process``): no Ray Train.

On one machine with one CPU worker Ray Train brings nothing the stage needs and costs it twice:
~20 s to start its controller and worker group, and its background processes (controller,
placement-group cleaner, dataset manager, health checks: ~15% of a core together), which a
2-thread CPU step on a 2-core machine pays ~2x, ~25% of every step (docs/decisions.md,
"The smoke preset trains in the stage's own process"). So the smoke preset trains here.

Nothing else changes: the loop is :func:`pipeline.training.loop.run_worker`, the one every Ray Train
worker runs (same batches, t, noise, dropout seeds, clipping, EMA), so the weights are
bit-identical to a one-worker Ray Train run of the same params (tests/test_train_backends.py).
Checkpoints are ``checkpoint_<step>`` folders in the run folder (:class:`LocalSession`: written
whole, then renamed, the last ``train.keep_checkpoints`` kept); a rerun resumes from the last.
A failed loop is restarted from the last checkpoint up to ``train.max_failures`` times, as Ray
Train's FailureConfig does. Progress and the MLflow curves get every interval directly.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.cluster.progress import ProgressDisplay, Sinks
from pipeline.training.curves import MlflowCurves
from pipeline.training.loop import TrainJob, run_worker
from pipeline.training.session import LocalSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalCheckpoint:
    """A checkpoint folder, read as Ray's ``Checkpoint`` is (``path``, ``as_directory()``)."""

    path: str

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        yield self.path


@dataclass
class LocalResult:
    """What :func:`fit_in_process` returns, shaped as the fields of Ray's ``Result`` read by
    :func:`pipeline.training.trainer.train_variant`."""

    return_value: dict[str, Any]  # run_worker's outcome
    checkpoint: LocalCheckpoint | None  # the last checkpoint, None when none was written
    metrics: dict[str, Any] = field(default_factory=dict)  # the last checkpoint's report


def fit_in_process(
    job: TrainJob, uri: str, run_id: str, sinks: list[Any] | None = None
) -> tuple[LocalResult, list[int]]:
    """Run the job's loop here, showing progress and logging curves to the MLflow run.

    ``job.run_dir`` must be a local folder (or a mounted cluster storage path). Returns the
    result and the steps the loop started (and restarted) at.
    """
    t = job.cfg.train
    session = LocalSession(job.run_dir, keep=t.keep_checkpoints)
    display = ProgressDisplay(f"train {job.variant.name}", t.steps)
    board = Sinks([display, MlflowCurves(uri, run_id), *(sinks or [])])
    job = replace(job, board=board)
    try:
        for attempt in range(t.max_failures + 1):
            try:
                outcome = run_worker(job, session)
                break
            except Exception as e:
                if attempt == t.max_failures:
                    raise
                log.warning(
                    "training failed (%s: %s); restarting from the last checkpoint (%d of %d)",
                    type(e).__name__, str(e)[:200], attempt + 1, t.max_failures,
                )  # fmt: skip
    finally:
        board.close()
    with session.latest_checkpoint() as last:
        checkpoint = LocalCheckpoint(str(last)) if last is not None else None
    metrics = session.reports[-1] if session.reports else {}
    return LocalResult(outcome, checkpoint, metrics), display.starts or [outcome["start"]]
