"""The driver's progress display, fed by rank 0 through a small Ray actor.

Rank 0 pushes an update per logging interval to :class:`ProgressBoard` (a zero-CPU actor);
a driver thread drains it twice a second and shows a tqdm bar on a terminal, or one line per
interval otherwise (DVC logs, CI): step, loss, steps/s, images/s and the ETA.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, TextIO

import ray
from tqdm import tqdm


@ray.remote(num_cpus=0)
class ProgressBoard:
    """A mailbox: rank 0 pushes updates, the driver takes them."""

    def __init__(self) -> None:
        self._updates: list[dict[str, Any]] = []

    def push(self, update: dict[str, Any]) -> None:
        self._updates.append(update)

    def take(self) -> list[dict[str, Any]]:
        updates, self._updates = self._updates, []
        return updates


def format_eta(seconds: float) -> str:
    """1h02m, 3m05s or 42s."""
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressDisplay:
    """Shows what arrives on a board while the driver waits in ``fit()``."""

    def __init__(self, label: str, board: Any, total: int, stream: TextIO | None = None):
        self.label, self.board, self.total = label, board, total
        self.stream = stream or sys.stderr
        self.starts: list[int] = []  # the steps training started (and restarted) at
        self.last: dict[str, Any] = {}
        self._bar: tqdm | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProgressDisplay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()
        if self._bar is not None:
            self._bar.close()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.poll()

    def poll(self) -> None:
        """Take the board's updates and show them."""
        try:
            updates = ray.get(self.board.take.remote(), timeout=10)
        except Exception:  # the display must never break training
            return
        for update in updates:
            self.show(update)

    def show(self, update: dict[str, Any]) -> None:
        if update["event"] == "start":
            self._started(update["step"])
        else:
            self.last = update
            self._interval(update)

    def _started(self, step: int) -> None:
        restarted = bool(self.starts)
        self.starts.append(step)
        word = "restarted" if restarted else "resumed"
        if step or restarted:
            self._write(f"{self.label}: {word} from the checkpoint at step {step}")
        if self._bar is not None:
            self._bar.reset(self.total)
            self._bar.update(step)
        elif self.stream.isatty():
            self._bar = tqdm(
                total=self.total, initial=step, desc=self.label, unit="step", file=self.stream
            )

    def _interval(self, u: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(u["step"] - self._bar.n)
            self._bar.set_postfix(loss=f"{u['loss']:.4g}", img_s=f"{u['images_per_s']:.0f}")
            return
        eta = (self.total - u["step"]) / max(u["steps_per_s"], 1e-9)
        self._write(
            f"{self.label}: step {u['step']}/{self.total} loss {u['loss']:.4g} "
            f"{u['steps_per_s']:.2f} steps/s {u['images_per_s']:.0f} img/s ETA {format_eta(eta)}"
        )

    def _write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)
