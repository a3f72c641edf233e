"""Two commands at once, taking turns on the whole machine: a fair comparison on a drifting VM.

This VM's speed drifts by 15-40% within minutes (benchmarks/README.md), more than the
differences that ``benchmarks.side_by_side`` looks for, so two commands run one after the other
meet different machines. Here each command runs in a cgroup of its own, frozen by the kernel's
freezer (cgroup v1 ``freezer.state``, or cgroup v2 ``cgroup.freeze``) while the other runs:
turns of ``slice_s`` seconds, alternating, so both see the same drift. Every process a command
starts joins its cgroup, so a turn freezes its whole tree at once (a Ray head, its workers, a
stage server), with no signal any of them can see. Each side records its turns; the active
seconds between two of its output lines (:meth:`Side.span`) are its own time, as if it had
run alone on a machine of the average speed. Once one side has finished, the other runs alone.

Needs a writable cgroup freezer (root on Linux); :func:`freezer_root` says why not otherwise.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

V1 = Path("/sys/fs/cgroup/freezer")
V2_MOUNTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))


def freezer_root() -> tuple[Path, int]:
    """The folder in which to create freezable cgroups and the cgroup version; RuntimeError
    naming what is missing when there is none this process may use."""
    if (V1 / "cgroup.procs").exists() and os.access(V1, os.W_OK):
        return V1, 1
    for mount in V2_MOUNTS:
        if (mount / "cgroup.controllers").exists() and os.access(mount, os.W_OK):
            return mount, 2
    raise RuntimeError(
        "--interleave needs a writable cgroup freezer (cgroup v1 /sys/fs/cgroup/freezer or a "
        "cgroup v2 mount; run as root on Linux)"
    )


class Freezer:
    """One cgroup whose processes can be frozen and thawed together; created frozen."""

    def __init__(self, name: str) -> None:
        root, self.version = freezer_root()
        self.root = root
        self.path = root / f"ddpm-bench-{name}-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        self.freeze()

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run so that its first process (and so everything it starts) is in here."""
        procs = self.path / "cgroup.procs"
        return ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *argv]

    def _set(self, frozen: bool) -> None:
        if self.version == 1:
            (self.path / "freezer.state").write_text("FROZEN" if frozen else "THAWED")
        else:
            (self.path / "cgroup.freeze").write_text("1" if frozen else "0")

    def _is(self, frozen: bool) -> bool:
        if self.version == 1:
            state = (self.path / "freezer.state").read_text().strip()
            return state == ("FROZEN" if frozen else "THAWED")
        events = (self.path / "cgroup.events").read_text()
        return f"frozen {int(frozen)}" in events

    def freeze(self) -> None:
        """Freeze every process in the cgroup; returns once they all are (at most ~1 s)."""
        self._set(True)
        deadline = time.monotonic() + 1.0
        while not self._is(True) and time.monotonic() < deadline:
            time.sleep(0.001)

    def thaw(self) -> None:
        self._set(False)

    def close(self) -> None:
        """Thaw, move any process left to the root cgroup, remove the cgroup."""
        with contextlib.suppress(OSError):
            self.thaw()
            for pid in (self.path / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (self.root / "cgroup.procs").write_text(pid)
            self.path.rmdir()


class Side:
    """One command of a comparison: its process, its timestamped output and its turns."""

    def __init__(self, name: str, argv: list[str], cwd: Path) -> None:
        self.name = name
        self.freezer = Freezer(name)
        self.lines: list[tuple[float, str]] = []
        self.turns: list[tuple[float, float]] = []  # (start, end) in perf_counter seconds
        self.proc = subprocess.Popen(
            self.freezer.command(argv),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.perf_counter(), line))

    def running(self) -> bool:
        return self.proc.poll() is None

    def span(self, start: float, end: float) -> float:
        """Active seconds of this side between two perf_counter times (its turns only)."""
        return sum(max(0.0, min(b, end) - max(a, start)) for a, b in self.turns)

    def finish(self) -> int:
        """Wait for the output's end and the exit status; remove the cgroup."""
        code = self.proc.wait()
        self._reader.join()
        self.freezer.close()
        return code


def take_turns(sides: list[Side], slice_s: float) -> None:
    """Thaw one side at a time for ``slice_s`` seconds until every side has exited; a side
    left alone runs on. Every side is thawed again on the way out, whatever happened."""
    try:
        while any(s.running() for s in sides):
            for side in sides:
                if not side.running():
                    continue
                alone = sum(s.running() for s in sides) == 1
                side.freezer.thaw()
                start = time.perf_counter()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    side.proc.wait(timeout=slice_s)
                if not alone and side.running():
                    side.freezer.freeze()
                side.turns.append((start, time.perf_counter()))
    finally:
        for side in sides:
            side.freezer.thaw()
