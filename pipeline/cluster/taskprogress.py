"""Progress of long Ray tasks (sample and NLL blocks), fed to the driver while they run.

Inside a task, :func:`advance` counts image-steps: every :class:`pipeline.sampling.noise.ImageNoise`
call (one per image and reverse step, or per image and timestep of the bound) advances it by the
rows it draws, so the samplers and the bound need no extra code. A task run through
:func:`pipeline.cluster.gputasks.submit` with a ``progress`` handle pushes its running count to a
zero-CPU :class:`~pipeline.cluster.progress.ProgressBoard` actor (training's mailbox) at most
every ``PUSH_EVERY_S`` seconds (and once at the end).

On the driver, :class:`BlockProgress` adds the finished blocks and the partial counts of the
blocks in flight: a tqdm bar with rate and ETA on a terminal, else one line every
``LINE_EVERY_S`` seconds (DVC logs, CI, ``ray job logs``). Work done in the driver's own
process (the Inception passes of pipeline.evaluation.fidelity) counts through
:meth:`BlockProgress.advance`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

import ray
from tqdm import tqdm

from pipeline.cluster.progress import new_board

PUSH_EVERY_S = 2.0
LINE_EVERY_S = 30.0
MIN_IMAGE_STEPS = 100_000  # smaller runs (seconds: the smoke scale) skip the board actor


class _Reporter:
    """A task's running count of image-steps, pushed to ``board`` under ``key``."""

    def __init__(self, board: Any, key: Any) -> None:
        self.board, self.key = board, key
        self.done, self.last_push = 0, time.monotonic()

    def advance(self, n: int) -> None:
        self.done += n
        if time.monotonic() - self.last_push >= PUSH_EVERY_S:
            self.push()

    def push(self, wait: bool = False) -> None:
        """Send the count; ``wait``: until the board holds it (the task's last push, so that
        the driver sees it once the task's result is in)."""
        self.last_push = time.monotonic()
        with contextlib.suppress(Exception):  # progress must never fail the work
            ref = self.board.push.remote({"key": self.key, "done": self.done})
            if wait:
                ray.get(ref, timeout=10)


_current: _Reporter | None = None


def advance(n: int) -> None:
    """Count ``n`` image-steps of the task running in this process (a no-op elsewhere)."""
    if _current is not None:
        _current.advance(n)


@contextlib.contextmanager
def reporting(progress: tuple[Any, Any] | None) -> Iterator[None]:
    """Within the block, :func:`advance` reports to ``progress = (board, key)`` (None: off)."""
    global _current
    if progress is None:
        yield
        return
    _current = _Reporter(*progress)
    try:
        yield
    finally:
        _current.push(wait=True)
        _current = None


class BlockProgress:
    """The driver's view of :func:`pipeline.cluster.blocks.run_blocks`: items done, in flight, ETA.

    Args:
        total: items of the run; done: items already finished (reused blocks).
        desc: what is counted (``samples``, ``images``); steps_per_item: image-steps a task
            reports per item (its reverse steps or timesteps; 0: no partial progress).
        stream: where lines go (default stderr); a tqdm bar when it is a terminal.
        unit: the rate's unit (default ``desc``).
    """

    def __init__(
        self,
        total: int,
        done: int,
        desc: str,
        steps_per_item: int = 0,
        stream: TextIO | None = None,
        unit: str | None = None,
    ) -> None:
        self.total, self.done, self.desc, self.unit = total, done, desc, unit or desc
        self.steps_per_item = steps_per_item
        self.stream = stream or sys.stderr
        self.partial: dict[Any, float] = {}  # block key -> items' worth done in flight
        self.board: Any = None
        self.started, self.start_done = time.monotonic(), done
        self.last_line = self.started
        from pipeline.cli import stage_label

        self.desc = f"{stage_label()}: {desc}" if stage_label() else desc  # names stage, variant
        self.bar = None
        if self.stream.isatty():
            self.bar = tqdm(
                total=total, initial=done, desc=self.desc, unit=self.unit, file=self.stream
            )

    def handle(self, key: Any) -> tuple[Any, Any] | None:
        """The ``progress`` argument of a task computing block ``key`` (creates the board)."""
        if not self.steps_per_item or self.total * self.steps_per_item < MIN_IMAGE_STEPS:
            return None
        if self.board is None:
            self.board = new_board()  # on the driver's node: outlives a lost worker node
        return self.board, key

    def finished(self, key: Any, items: int) -> None:
        """Block ``key`` of ``items`` items is stored."""
        self.partial.pop(key, None)
        self.done += items
        self.show()

    def advance(self, items: int) -> None:
        """``items`` more are done (work in this process, e.g. an Inception pass)."""
        self.done += items
        self.show()

    def poll(self) -> None:
        """Take the tasks' reports from the board and show them."""
        if self.board is None:
            return
        try:
            updates = ray.get(self.board.take.remote(), timeout=10)
        except Exception:  # progress must never break the work
            return
        for u in updates:
            self.partial[u["key"]] = u["done"] / self.steps_per_item
        self.show()

    def current(self) -> float:
        return self.done + sum(self.partial.values())

    def show(self) -> None:
        now = self.current()
        if self.bar is not None:
            self.bar.update(min(now, self.total) - self.bar.n)  # redrawn at most every 0.1 s
            return
        if time.monotonic() - self.last_line >= LINE_EVERY_S or self.done >= self.total:
            self.write_line(now)

    def write_line(self, now: float) -> None:
        from pipeline.cluster.progress import format_eta  # the driver only

        self.last_line = time.monotonic()
        elapsed = self.last_line - self.started
        rate = (now - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = format_eta((self.total - now) / rate) if rate > 0 else "?"
        print(
            f"{self.desc}: {now:.0f}/{self.total} ({100 * now / max(self.total, 1):.1f}%) "
            f"{rate:.2f} {self.unit}/s ETA {eta}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.board is not None:
            with contextlib.suppress(Exception):
                ray.kill(self.board)
