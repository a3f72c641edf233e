"""Run the whole pipeline where there is no git checkout, e.g. as a Ray job.

``ray job submit --working-dir . -- python -m stages.repro [--scale NAME] [DVC REPRO ARGS]``

Ray uploads the working directory without ``.git``, and ``dvc repro`` refuses to run outside a
git repository unless DVC is told not to use one (``core.no_scm``, set here in the local DVC
config, which is never committed); ``git`` itself is not needed. ``--scale`` rewrites params.yaml's
``scale:`` line (comments kept) before running.

As a Ray job, MLflow must not write into the job's temporary working directory: with no
MLFLOW_TRACKING_URI (and no params ``mlflow.tracking_uri``), or one inside it, the job stops
before any work with one ``error:`` line. With ``cluster.storage`` set
(:mod:`pipeline.cluster.durable`), the run first restores what earlier jobs stored (dvc.lock, the
uncached outputs, ``dvc pull`` from the storage remote), then reproduces stage by stage, pushing
each finished stage at once: a stopped job keeps what it finished and a resubmitted one continues.
Without storage, results stay in the job's working directory; ``--push`` pushes to a configured DVC
remote at the end.

``--local-ray`` (what ``make repro`` uses) starts one private Ray head for the whole run and
points every stage at it (RAY_ADDRESS), instead of each Ray stage starting its own local cluster:
~10 s less per Ray stage. It is stopped when the run ends. A cluster named by RAY_ADDRESS or
params' ``ray.address`` wins.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline import atomic
from pipeline.cli import entry_point
from pipeline.cluster.blocks import check_gpu_preset
from pipeline.cluster.durable import check_job_tracking, reproduce_with_storage
from pipeline.cluster.lease import job_lease
from pipeline.cluster.parallel import max_parallel_stages, run_parallel
from pipeline.cluster.raycluster import (
    check_single_node,
    connect,
    local_head,
    local_ray_env,
    ray_address,
)
from pipeline.cluster.stopping import Stopped, stop_grace_s, warn_short_stop_wait
from pipeline.cluster.storage import check_storage
from pipeline.cluster.storage_fs import Store
from pipeline.config import Config, check_name, load_config
from pipeline.errors import UserError
from pipeline.forkserver import stage_server, wait_ready
from pipeline.report import tracking


def in_git_repo() -> bool:
    """Whether the working directory is in a git repository (False where git is not installed)."""
    try:
        done = subprocess.run(["git", "rev-parse", "--git-dir"], capture_output=True, check=False)
    except OSError:
        return False
    return done.returncode == 0


def set_scale(params: Path, scale: str) -> None:
    """Point params.yaml's top-level ``scale:`` at ``scale``, checked first (a plain name, one
    of the presets): a bad value is one error line and params.yaml is left as it was."""
    check_name("--scale", scale)
    load_config(params, scale)  # an unknown preset: one error line before anything is written
    text = params.read_text()
    new, count = re.subn(r"(?m)^scale:[^\n#]*", f"scale: {scale}", text, count=1)
    if count != 1:
        raise UserError(f"{params}: no top-level `scale:` line to set")
    atomic.write_text(params, new)


TERMINATING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def dvc(*args: str, env: dict[str, str] | None = None) -> None:
    """Run ``dvc ARGS`` in a process group of its own; a signal to this process reaches it all.

    SIGTERM, SIGINT (Ctrl-C) and SIGHUP are forwarded to the group (dvc and the stage process
    it runs, with that stage's own children); once dvc has exited this process exits with
    128 + the signal (130 for Ctrl-C, 143 for SIGTERM), and the ``finally`` of
    :func:`~pipeline.cluster.raycluster.local_head` stops the private Ray head. Outputs are written
    atomically, so the stage that was stopped leaves nothing that looks complete; a rerun
    resumes from the finished stages.

    dvc ignores the signal itself while a stage runs: if the stage had just finished when it
    came, dvc would go on with the next stage. So the signal is sent again every
    ``RESEND_S`` until dvc has exited, and after ``GRACE_S`` what is left is SIGKILLed.
    """
    proc = subprocess.Popen(["dvc", *args], env=env, start_new_session=True)
    got: list[int] = []
    wake_r, wake_w = os.pipe()  # the handler's nudge to the wait below
    os.set_blocking(wake_w, False)

    def forward(signum: int, _frame: object) -> None:
        got.append(signum)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signum)
        with contextlib.suppress(OSError):
            os.write(wake_w, b"\0")

    saved = {sig: signal.signal(sig, forward) for sig in TERMINATING}
    try:
        try:
            code = _wait_resending(proc, got, wake_r)
        finally:
            if got:  # what dvc started may outlive it by a moment: wait, then make sure
                _stop_group(proc.pid, stop_grace_s(GRACE_S))
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        os.close(wake_r)
        os.close(wake_w)
    if got:
        print(f"stopped by signal {got[0]}; rerun to resume", file=sys.stderr, flush=True)
        raise Stopped(128 + got[0])
    if code:
        raise SystemExit(code)


GRACE_S = 20.0  # for the stopped stage to end (its Ray driver disconnects) before SIGKILL;
# in a Ray job at most RAY_JOB_STOP_WAIT_TIME_S - 2 s (pipeline.cluster.stopping)
RESEND_S = 0.5  # the stop signal again, until dvc exits (a stage dvc starts next gets it too)


def _wait_resending(proc: subprocess.Popen, got: list[int], wake: int) -> int:
    """``proc.wait()``; once a signal is in ``got``, resend it to the group every RESEND_S.

    Until a signal comes it sleeps in ``select`` on a pidfd of dvc and on ``wake`` (written by
    the signal handler): no wake-ups while a stage runs (``Popen.wait(timeout)`` polls ~20
    times a second, beside a training step that pays for every wake-up on a 2-core machine)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): poll
        pidfd = None
    first: float | None = None  # when the first resend went
    due: float | None = None  # when the next resend is due
    try:
        while True:
            if pidfd is None:
                try:
                    return proc.wait(timeout=RESEND_S)
                except subprocess.TimeoutExpired:
                    pass
            else:
                timeout = None if due is None else max(0.0, due - time.monotonic())
                ready, _, _ = select.select([pidfd, wake], [], [], timeout)
                if pidfd in ready:
                    return proc.wait()
                if wake in ready:  # the handler sent the signal itself: resend RESEND_S later
                    os.read(wake, 512)
                    due = due or time.monotonic() + RESEND_S
                if due is None or time.monotonic() < due:
                    continue
            if not got:
                continue
            now = time.monotonic()
            first = now if first is None else first
            due = now + RESEND_S
            sig = got[0] if now - first < stop_grace_s(GRACE_S) else signal.SIGKILL
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _stop_group(pgid: int, grace_s: float) -> None:
    """Wait up to ``grace_s`` for process group ``pgid`` to empty, then SIGKILL what is left."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def use_this_environment() -> None:
    """Put this interpreter's bin folder first on PATH, for ``dvc`` and the stages' ``python``.

    ``.venv/bin/python -m stages.repro`` from a shell without the venv activated would otherwise
    find no ``dvc`` (or another one), and dvc.yaml's ``python -m stages.X`` another Python.
    """
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir
    if shutil.which("dvc") is None:
        raise UserError(f"no dvc next to {sys.executable} or on PATH: run `make install`")


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", help="switch params.yaml to this preset first")
    parser.add_argument(
        "--push",
        action="store_true",
        help="dvc push the outputs afterwards (with cluster storage: after every stage anyway)",
    )
    parser.add_argument(
        "--local-ray",
        action="store_true",
        help="run every stage on one private local Ray head (unless a cluster is configured)",
    )
    args, repro_args = parser.parse_known_args(argv)
    use_this_environment()
    if args.scale:
        set_scale(Path("params.yaml"), args.scale)
    cfg = load_config(Path("params.yaml"))
    check_job_tracking(cfg, Path.cwd())  # before any work: one error line
    tracking.check_access(cfg)  # an MLflow server that refuses us: one error line
    storage = check_storage(cfg)
    check_single_node(cfg.ray, storage is not None)  # several nodes need storage: one line
    check_cluster_gpus(cfg)  # a GPU preset on a cluster without GPUs: one line
    parallel = max_parallel_stages(cfg, on_cluster=storage is not None)  # bad value: one line
    warn_short_stop_wait()
    with job_lease(storage, cfg.scale):  # one job per storage and scale, else one line
        run(args, cfg, storage, repro_args, parallel)


def check_cluster_gpus(cfg: Config) -> None:
    """On a Ray cluster (``RAY_ADDRESS`` or ``ray.address``), a preset that asks for GPUs needs
    some: ConfigError before any stage otherwise (pipeline.cluster.blocks.check_gpu_preset)."""
    address = ray_address(cfg.ray)
    if not address or not (cfg.train.use_gpu or cfg.sample.use_gpu or cfg.eval.use_gpu):
        return
    import logging

    import ray

    connect(address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        check_gpu_preset(cfg)
    finally:
        ray.shutdown()


# What the stage server imports once for every stage of a run (pipeline.forkserver): the stage
# modules, what they import when they run, and the libraries behind them (Ray Train, only for
# train.backend: ray, is left to the stages that use it).
PRELOAD = [
    "torch", "numpy", "mlflow", "ray", "torch_fidelity", "matplotlib", "PIL.Image", "psutil",
    "pipeline.training.trainer", "pipeline.evaluation.evaluate", "pipeline.evaluation.outputs",
    "pipeline.sampling.draw", "pipeline.report.compare",
    *(f"stages.{name}" for name in ("prepare", "reference", "featurenet", "train_reference",
                                    "train", "sample", "evaluate", "report", "compare")),
]  # fmt: skip


SERVER_WAIT_S = 10.0  # after the Ray head is up, for the stage server's imports (~5 s here)


def run(
    args: argparse.Namespace,
    cfg: Config,
    storage: Store | None,
    repro_args: list[str],
    parallel: int = 1,
) -> None:
    """Everything after the checks: DVC's setting, the private Ray head, the repro, the push."""
    if not in_git_repo():
        dvc("config", "--local", "core.no_scm", "true")
    local = args.local_ray and not ray_address(cfg.ray)
    ray_env = local_ray_env() if local else None  # the head's and its clients' (127.0.0.1, token)
    with stage_server(PRELOAD, env=ray_env) as env:  # its imports overlap the Ray head's start
        if local:
            print("starting a local Ray cluster for this run", flush=True)
            with local_head(cfg.ray.num_cpus, env=ray_env, dashboard=False) as head:
                env = {**env, "RAY_ADDRESS": head.address}
                wait_ready(env, SERVER_WAIT_S)
                reproduce(storage, cfg.scale, repro_args, env, parallel)
        else:
            reproduce(storage, cfg.scale, repro_args, env, parallel)
    if args.push and storage is None:
        dvc("push")


def reproduce(
    storage: Store | None,
    scale: str,
    repro_args: list[str],
    env: dict[str, str] | None,
    parallel: int = 1,
) -> None:
    """``dvc repro``, or with cluster storage: restore, then stage by stage with a push each;
    ``parallel`` > 1 (cluster.max_parallel_stages): independent stages side by side."""
    if storage is None and parallel > 1 and not repro_args:
        run_parallel(parallel, env=env)
    elif storage is None:
        dvc("repro", *repro_args, env=env)
    else:
        run_dvc = lambda *a: dvc(*a, env=env)  # noqa: E731
        reproduce_with_storage(storage, scale, repro_args, run_dvc, parallel, env)


if __name__ == "__main__":
    main(sys.argv[1:])
