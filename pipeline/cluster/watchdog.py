"""Nothing outlives a killed driver: a watchdog process stops its process tree when it dies.

A stage that starts a local Ray cluster (``ray.init(address="local")``), and ``stages.repro
--local-ray`` with its private head, own processes that do not die with them: SIGKILL (or an
out-of-memory kill) skips every ``finally`` and ``atexit``, and the GCS server, raylet,
dashboard and workers stay alive, holding memory. :func:`watch` starts ``python -m
pipeline.cluster.watchdog PID`` in a session of its own (a signal to the driver's process group does
not reach it). It records the driver's descendants (pid and start time) every ``POLL_S`` seconds;
once the driver has exited, however it ended, it SIGKILLs those that are still alive and their
own descendants, by pid, and exits. After a clean exit the tree is already gone and it only
exits. It never touches a process it did not see under the driver (other users' clusters).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from pipeline.cluster import testhooks

POLL_S = 0.5
PROJECT = str(Path(__file__).resolve().parents[2])  # the watchdog runs this checkout's code


_watching: dict[int, subprocess.Popen] = {}


def watch(pid: int | None = None) -> subprocess.Popen:
    """Start the watchdog of process ``pid`` (default: this one), once per process."""
    pid = pid or os.getpid()
    if pid in _watching and _watching[pid].poll() is None:
        return _watching[pid]
    path = os.environ.get("PYTHONPATH")
    _watching[pid] = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cluster.watchdog", str(pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (PROJECT, path)))},
    )
    return _watching[pid]


def _alive(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    return False


def _children(pid: int) -> list[int] | None:
    """``pid``'s children from the kernel's list (``/proc/PID/task/*/children``): reading a few
    files instead of every process's stat, as psutil's ``children()`` does (the watchdog polls
    twice a second beside a 2-thread training step). None where the kernel has no such list."""
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(k) for k in f.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # the thread ended
            return None  # no CONFIG_PROC_CHILDREN
        except OSError:
            continue
    return kids


def _tree(proc: psutil.Process) -> dict[tuple[int, float], psutil.Process]:
    """``proc``'s descendants keyed by (pid, start time): a reused pid is another key."""
    out = {}
    pending = _children(proc.pid)
    if pending is None:  # no kernel list: psutil's scan of every process
        with contextlib.suppress(psutil.Error):
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    out[(child.pid, child.create_time())] = child
        return out
    while pending:
        pid = pending.pop()
        with contextlib.suppress(psutil.Error):
            child = psutil.Process(pid)
            out[(pid, child.create_time())] = child
            pending.extend(_children(pid) or ())
    return out


def stop_tree(seen: dict[tuple[int, float], psutil.Process]) -> int:
    """SIGKILL every process of ``seen`` still running (same pid and start time) and its own
    descendants; returns how many were killed."""
    me = os.getpid()
    targets: dict[tuple[int, float], psutil.Process] = {}
    for (pid, started), proc in seen.items():
        with contextlib.suppress(psutil.Error):
            if pid != me and proc.create_time() == started and _alive(proc):
                targets[(pid, started)] = proc
                targets.update(_tree(proc))
    for proc in targets.values():
        with contextlib.suppress(psutil.Error):
            if proc.pid != me:
                proc.kill()
    return len(targets)


def main(argv: list[str]) -> None:
    """``python -m pipeline.cluster.watchdog PID``: wait for PID to end, then stop what it left."""
    try:
        driver = psutil.Process(int(argv[0]))
    except (psutil.Error, ValueError, IndexError):
        return
    me = os.getpid()
    seen: dict[tuple[int, float], psutil.Process] = {}
    report = testhooks.watchdog_seen()  # test-only: where to write the pids seen
    while _alive(driver):
        seen = {k: p for k, p in seen.items() if _alive(p)}  # bounded: the living only
        seen.update({k: p for k, p in _tree(driver).items() if k[0] != me})
        if report:
            with contextlib.suppress(OSError):
                Path(f"{report}.tmp").write_text(" ".join(str(pid) for pid, _ in seen))
                os.replace(f"{report}.tmp", report)
        time.sleep(POLL_S)
    stop_tree(seen)


if __name__ == "__main__":
    main(sys.argv[1:])
