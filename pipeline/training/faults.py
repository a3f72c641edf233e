"""TEST-ONLY fault injection: make one worker fail, hang or diverge once at a given step.

Set ``DDPM_TEST_FAULT`` in the driver's environment (read by pipeline.cluster.testhooks; the
driver hands the fault to the workers):

    fail:RANK:STEP   rank RANK raises InjectedFaultError before optimiser step STEP
    kill:RANK:STEP   rank RANK's worker process SIGKILLs itself before step STEP (a lost node)
    hang:RANK:STEP   rank RANK sleeps before step STEP until the process is killed
    nan:RANK:STEP    rank RANK sets one weight to NaN before step STEP (training diverges)

Each fault fires once per run: a marker file in the run's storage folder remembers it, so the
retry (Ray Train's FailureConfig) or the rerun after a kill goes through. Never set it outside
tests.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.cluster import testhooks

ENV = testhooks.TRAIN_FAULT_ENV


class InjectedFaultError(RuntimeError):
    """The failure that ``fail:RANK:STEP`` raises (test-only)."""


@dataclass(frozen=True)
class Fault:
    action: str  # fail | kill | hang | nan
    rank: int
    step: int

    def marker(self, run_dir: str | Path) -> Path:
        return Path(run_dir) / f".test-fault-{self.action}-{self.rank}-{self.step}"


def from_environment() -> Fault | None:
    """The fault that ``DDPM_TEST_FAULT`` asks for, or None."""
    spec = testhooks.train_fault()
    return parse(spec) if spec else None


def parse(spec: str) -> Fault:
    """``ACTION:RANK:STEP`` as a Fault; ValueError when malformed."""
    try:
        action, rank, step = spec.split(":")
        if action not in ("fail", "kill", "hang", "nan"):
            raise ValueError(action)
        return Fault(action, int(rank), int(step))
    except ValueError:
        raise ValueError(f"{ENV}={spec!r}: expected fail|kill|hang|nan:RANK:STEP") from None


def maybe_inject(
    fault: Fault | None, run_dir: str | Path, rank: int, step: int, model: nn.Module
) -> None:
    """Fire ``fault`` if it is this rank's and step's and has not fired in this run yet."""
    if fault is None or (fault.rank, fault.step) != (rank, step):
        return
    marker = fault.marker(run_dir)
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    if fault.action == "fail":
        raise InjectedFaultError(f"test-only fault injected on rank {rank} at step {step}")
    if fault.action == "kill":  # no exception, no cleanup: the process is gone
        _wait_until_registered(Path(run_dir))
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.action == "nan":
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = math.nan
        return
    while True:  # hang: wait to be killed
        time.sleep(1.0)


def _wait_until_registered(run_dir: Path, timeout_s: float = 120.0) -> None:
    """Wait until Ray Train's controller has registered the newest checkpoint in ``run_dir``.

    The controller records reported checkpoints asynchronously; a worker killed before that
    would make the restart begin at the checkpoint before (correct, but not the fault the test
    means: a kill after a checkpoint).
    """
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        names = sorted(p.name for p in run_dir.glob("checkpoint_0*"))
        if not names or (snapshot.is_file() and names[-1] in snapshot.read_text()):
            return
        time.sleep(0.2)
