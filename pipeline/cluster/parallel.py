"""Independent DVC stages side by side: the six trainings (then their sampling and evaluation)
run at once on a cluster, and DVC records exactly what a serial ``dvc repro`` records.

Why not DVC's own means (docs/cluster.md, "Variants side by side"):

- ``dvc repro`` holds the repository's lock for its whole run, so two ``dvc repro
  --single-item`` processes in one working directory cannot overlap (the second stops with
  "Unable to acquire lock");
- ``dvc exp run --queue`` / ``dvc queue start -j N`` runs each experiment in a copy of a git
  workspace and records it as an experiment ref, not in this dvc.lock: it needs git (a Ray job's
  working directory has none) and runs whole pipelines per experiment, not one DVC graph.

So this module does what ``dvc repro`` does for one stage, split where the lock is not needed:

1. ``dvc status --json`` once: the stages DVC would rerun now. A stage downstream of one rerun
   here is checked again (``dvc status --json <stage>``) once its upstream stages are done, and
   that answer replaces the first, as ``dvc repro`` does (an upstream rerun that leaves its
   outputs unchanged reruns nothing: `config` rewriting params.resolved.yaml with the values
   dvc.lock holds reruns no other stage).
2. A stage whose upstream stages are all done runs its dvc.yaml ``cmd`` as a process of its own
   (its non-persistent outputs removed first, as ``dvc repro`` does), up to ``max_parallel``
   at a time, stages in dvc.yaml's order. The stage commands never touch DVC.
3. A finished stage is recorded with ``dvc commit --force <stage>`` (the same lock entry and
   cache as ``dvc repro``: DVC hashes the deps, params and outputs as they are), one at a time
   and in dvc.yaml's order, so dvc.lock lists the stages as a serial run does; ``after(stage)``
   then runs (pipeline.cluster.durable: push and save the state).

A stage that fails stops new launches; the running ones finish and are committed; then the run
exits with the failed stage's status. A signal (``ray job stop``, Ctrl-C) is forwarded to every
running stage's process group; the stages that had finished are committed before the run exits
(128 + the signal), in whatever order remains. A rerun skips everything committed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import UserError

TERMINATING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
GRACE_S = 20.0  # for stopped stages to end before SIGKILL
POLL_S = 0.5


@dataclass
class Stage:
    """One stage of dvc.yaml (foreach expanded)."""

    name: str
    cmd: str
    upstream: set[str]
    outs: list[str]  # non-persistent outputs (removed before the command runs)


@dataclass
class Running:
    proc: subprocess.Popen
    started: float


@dataclass
class Outcome:
    """What :func:`run_parallel` did: stages run, skipped, their (start, end) times (s, epoch)."""

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    spans: dict[str, tuple[float, float]] = field(default_factory=dict)


def max_parallel_stages(cfg: Config, on_cluster: bool) -> int:
    """``cluster.max_parallel_stages``, or by default: 1 on one node (``make repro`` unchanged),
    and on a cluster as many trainings as its resources hold at once (GPUs, or CPUs without
    ``train.use_gpu``, over one training's need at its most workers), at least 1. ConfigError
    below 1."""
    value = cfg.cluster.max_parallel_stages
    if value is not None:
        if value < 1:
            raise UserError(f"cluster.max_parallel_stages must be at least 1 (got {value})")
        return value
    from pipeline.cluster.raycluster import ray_address

    if not on_cluster or not ray_address(cfg.ray):
        return 1
    import ray

    ray.init(address=ray_address(cfg.ray), logging_level=logging.WARNING, log_to_driver=False)
    try:
        total = ray.cluster_resources()
    finally:
        ray.shutdown()
    t = cfg.train
    if t.use_gpu:
        have, need = total.get("GPU", 0.0), t.max_workers * t.gpus_per_worker
    else:
        have, need = total.get("CPU", 0.0), t.max_workers * t.cpus_per_worker
    return max(1, int(have / need + 1e-9)) if need > 0 else 1


def load_stages(root: Path = Path(".")) -> list[Stage]:
    """dvc.yaml's stages in file order (a topological order) with their upstream stages."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph
        stages = {s.addressing: s for s in graph.nodes}
        order = [s.addressing for s in repo.index.stages]
        out = []
        for name in order:
            stage = stages[name]
            upstream = {dep.addressing for dep in graph.successors(stage)}
            outs = [str(o.fs_path) for o in stage.outs if not o.persist]
            out.append(Stage(name, stage.cmd, upstream, outs))
    return out


def dvc_status(targets: list[str]) -> set[str]:
    """The stages among ``targets`` (all when empty) that ``dvc status`` calls changed."""
    done = subprocess.run(
        ["dvc", "status", "--json", *targets], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise UserError(f"dvc status failed: {done.stderr.strip().splitlines()[-1:]}")
    text = done.stdout.strip()
    return set(json.loads(text[text.index("{") :]) if "{" in text else {})


def run_parallel(
    max_parallel: int,
    after: Callable[[str], None] = lambda name: None,
    stages: list[Stage] | None = None,
    env: dict[str, str] | None = None,
) -> Outcome:
    """Reproduce the pipeline with up to ``max_parallel`` independent stages at once (see the
    module docstring). ``after(stage)`` runs after each commit. Exits like ``dvc repro``: a
    failed stage's status once the others are committed, 128 + a signal when stopped."""
    if max_parallel < 1:
        raise UserError(f"cluster.max_parallel_stages must be at least 1 (got {max_parallel})")
    stages = stages if stages is not None else load_stages()
    order = [s.name for s in stages]
    by_name = {s.name: s for s in stages}
    changed = dvc_status([])
    outcome = Outcome()
    done: set[str] = set()  # finished now or unchanged: downstream may start
    rerun: set[str] = set()  # ran in this run (downstream is checked again)
    finished: list[str] = []  # ran and exited 0, not committed yet
    running: dict[str, Running] = {}
    waiting = list(order)
    failed: tuple[str, int] | None = None
    got: list[int] = []
    stopped_at: list[float] = []

    def forward(signum: int, _frame: object) -> None:
        got.append(signum)
        for r in running.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(r.proc.pid, signum)

    saved = {sig: signal.signal(sig, forward) for sig in TERMINATING}
    try:
        while waiting or running:
            # start what is ready (in dvc.yaml's order) while there is room
            for name in list(waiting):
                if got or failed or len(running) >= max_parallel:
                    break
                stage = by_name[name]
                if not stage.upstream <= done:
                    continue
                waiting.remove(name)
                # once an upstream stage reran, the first status is stale (e.g. `config`
                # rewrote params.resolved.yaml): ask DVC again, for this stage only
                dirty = name in dvc_status([name]) if stage.upstream & rerun else name in changed
                if not dirty:
                    done.add(name)
                    outcome.skipped.append(name)
                    print(f"Stage '{name}' didn't change, skipping", flush=True)
                    continue
                running[name] = Running(_start(stage, env), time.time())
                print(f"Running stage '{name}' (side by side: {sorted(running)})", flush=True)
            if not running and (got or failed or not waiting):
                break
            time.sleep(POLL_S)
            for name, r in list(running.items()):
                code = r.proc.poll()
                if code is None:
                    continue
                del running[name]
                end = time.time()
                outcome.spans[name] = (r.started, end)
                print(
                    f"Stage '{name}' exited {code} after {end - r.started:.1f} s "
                    f"(from {_utc(r.started)} to {_utc(end)} UTC)",
                    flush=True,
                )
                if code == 0:
                    finished.append(name)
                    done.add(name)
                    rerun.add(name)
                    outcome.ran.append(name)
                elif failed is None:
                    failed = (name, code)
            _commit_in_order(finished, order, done, running, waiting, after)
            if got:
                stopped_at = stopped_at or [time.monotonic()]
                _escalate(running, got[0], time.monotonic() - stopped_at[0])
        _commit_rest(finished, after)  # stopped or failed: keep every finished stage
    except BaseException:  # a push that failed, a stop during a commit: no stage outlives us
        _stop_all(running)
        raise
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    if got:
        print(f"stopped by signal {got[0]}; rerun to resume", file=sys.stderr, flush=True)
        raise SystemExit(128 + got[0])
    if failed:
        print(f"stage '{failed[0]}' failed (status {failed[1]}); rerun to resume", file=sys.stderr)
        raise SystemExit(failed[1])
    return outcome


def _utc(epoch: float) -> str:
    """``2026-12-02 19:20:01.25``: a stage's start or end in the run's log."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))
    return f"{stamp}.{int(epoch % 1 * 100):02d}"


def _start(stage: Stage, env: dict[str, str] | None) -> subprocess.Popen:
    """The stage's command in a process group of its own, its non-persistent outputs removed."""
    for out in stage.outs:
        path = Path(out)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    return subprocess.Popen(stage.cmd, shell=True, env=env, start_new_session=True)


def _commit_in_order(
    finished: list[str],
    order: list[str],
    done: set[str],
    running: dict[str, Running],
    waiting: list[str],
    after: Callable[[str], None],
) -> None:
    """Commit the finished stages whose predecessors in dvc.yaml's order are all settled
    (committed or skipped), so that dvc.lock lists them in a serial run's order."""
    for name in order:
        if name in running or name in waiting:
            return  # an earlier stage is not settled yet
        if name in finished:
            _commit(name, after)
            finished.remove(name)
        elif name not in done:
            return


def _commit_rest(finished: list[str], after: Callable[[str], None]) -> None:
    for name in list(finished):
        _commit(name, after)
        finished.remove(name)


def _commit(name: str, after: Callable[[str], None]) -> None:
    done = subprocess.run(["dvc", "commit", "--force", name], check=False)
    if done.returncode:
        raise UserError(f"dvc commit {name} failed (status {done.returncode}); rerun to resume")
    after(name)


def _escalate(running: dict[str, Running], signum: int, since_s: float) -> None:
    """Resend the stop signal to the stages still running (a stage ignores it while its own
    child runs); SIGKILL once GRACE_S have passed since the first one."""
    sig = signum if since_s < GRACE_S else signal.SIGKILL
    for r in running.values():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(r.proc.pid, sig)


def _stop_all(running: dict[str, Running]) -> None:
    """SIGTERM to every running stage's group, SIGKILL to what is left after GRACE_S."""
    for r in running.values():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(r.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for r in running.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(r.proc.pid, signal.SIGKILL)
