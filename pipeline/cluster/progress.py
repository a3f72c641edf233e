"""Progress from rank 0 to the driver: a small Ray actor, a polling thread, a display.

Rank 0 pushes one update per logging interval (and one when training starts or restarts) to
:class:`ProgressBoard`, a zero-CPU actor. On the driver, :class:`BoardReader` drains it twice a
second while ``fit()`` runs and hands each update to its sinks: :class:`ProgressDisplay` (a tqdm
bar on a terminal, one line per interval otherwise: DVC logs, CI) and the MLflow curves
(:mod:`pipeline.training.curves`).
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Protocol, TextIO

import ray
from tqdm import tqdm

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class ProgressBoard:
    """A mailbox: rank 0 (or a block task) pushes updates, the driver takes them."""

    def __init__(self) -> None:
        self._updates: list[dict[str, Any]] = []

    def push(self, update: dict[str, Any]) -> None:
        self._updates.append(update)

    def take(self) -> list[dict[str, Any]]:
        updates, self._updates = self._updates, []
        return updates


def new_board() -> Any:
    """A :class:`ProgressBoard` on this driver's node (Ray would place a 0-CPU actor on any
    node): it lives as long as the driver, whichever worker node is lost (a spot node
    reclaimed), so the updates of the restarted workers still arrive."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    # @ray.remote made the class an actor class, which mypy does not see
    board = ProgressBoard.options(scheduling_strategy=here)  # type: ignore[attr-defined]
    return board.remote()


class Sink(Protocol):
    def show(self, update: dict[str, Any]) -> None: ...


class Sinks:
    """Hands each update to every sink; a sink's failure is one warning line (per sink and kind
    of error), never the end of the caller: the next update retries that sink.

    It is also the board of a loop that runs in the driver's own process (``train.backend:
    process``): rank 0's :class:`~pipeline.training.monitor.Monitor` calls :meth:`show` directly.
    """

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks
        self._warned: set[tuple[int, str]] = set()

    def show(self, update: dict[str, Any]) -> None:
        for sink in self.sinks:
            try:
                sink.show(update)
            except Exception as e:  # a sink's failure must not end the caller
                self.warn(sink, e)

    def close(self) -> None:
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                close()

    def warn(self, sink: object, error: Exception) -> None:
        """One warning line per sink and kind of error."""
        key = (id(sink), type(error).__name__)
        if key not in self._warned:
            self._warned.add(key)
            log.warning(
                "progress sink %s failed: %s: %s (shown once; it gets every next update)",
                type(sink).__name__, type(error).__name__, str(error)[:200],
            )  # fmt: skip


class BoardReader:
    """While in its ``with`` block, feeds the board's updates to ``sinks`` (and once at exit)."""

    def __init__(self, board: Any, sinks: list[Sink], every: float = 0.5):
        self.board, self.sinks, self.every = board, Sinks(sinks), every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BoardReader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.poll()
        self.sinks.close()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.poll()
            except Exception as e:  # never the end of the thread: the next poll retries
                self.sinks.warn(self, e)

    def poll(self) -> None:
        """Take the board's updates and hand them to every sink."""
        try:
            updates = ray.get(self.board.take.remote(), timeout=10)
        except Exception as e:  # progress must never break training
            log.debug("progress board unavailable: %s", e)
            return
        for update in updates:
            self.sinks.show(update)


def format_eta(seconds: float) -> str:
    """1h02m, 3m05s or 42s."""
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressDisplay:
    """Shows step, loss, speed and ETA: a tqdm bar on a terminal, else a line per interval."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None):
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.starts: list[int] = []  # the steps training started (and restarted) at
        self._world_size: int | None = None  # the workers of the last (re)start
        self._bar: tqdm | None = None

    def show(self, update: dict[str, Any]) -> None:
        if update["event"] == "start":
            self._started(update["step"], update.get("world_size"))
        else:
            self._interval(update)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def _started(self, step: int, world_size: int | None = None) -> None:
        restarted = bool(self.starts)
        self.starts.append(step)
        resized = restarted and world_size is not None and world_size != self._world_size
        if step or restarted:
            word = "restarted" if restarted else "resumed"
            on = f" on {world_size} workers (was {self._world_size})" if resized else ""
            self._write(f"{self.label}: {word} from the checkpoint at step {step}{on}")
        self._world_size = world_size
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
