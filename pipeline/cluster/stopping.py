"""Stopping a run cleanly, also as a Ray job (``ray job stop``).

``ray job stop`` makes Ray's job supervisor send SIGTERM to the job's driver and to every process
below it (dvc, the running stage and its children) at once, then SIGKILL to all of them after
``RAY_JOB_STOP_WAIT_TIME_S`` seconds (Ray's default: 3 s). The supervisor reads that variable from
its own environment, which holds the job's ``runtime_env`` ``env_vars``: so the grace Ray honours
is set per job at submission,
``--runtime-env-json '{"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "60", ...}}'`` (or exported on
the head before ``ray start``). The driver sees the same value and sizes its own stop to fit
inside it (:func:`stop_grace_s`), and says so at the start when it is shorter than
:data:`RECOMMENDED_WAIT_S` (:func:`warn_short_stop_wait`).

A stop ends with :class:`Stopped` (exit 128 + signal) and one line "stopped by signal N", never
as a failure of the step it interrupted (a ``dvc push`` cut by the stop is not a remote error).
"""

from __future__ import annotations

import os
import sys

RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in every `ray job submit` driver
WAIT_ENV = "RAY_JOB_STOP_WAIT_TIME_S"
RAY_DEFAULT_WAIT_S = 3.0  # Ray's JobSupervisor.DEFAULT_RAY_JOB_STOP_WAIT_TIME_S
RECOMMENDED_WAIT_S = 60.0  # a stage's finally (last block upload, Ray disconnect) and the push
MARGIN_S = 2.0  # of Ray's wait kept for this driver's own exit (the lease release)


class Stopped(SystemExit):
    """The run was stopped by a signal (SIGINT, SIGTERM, SIGHUP); code 128 + the signal."""


def ray_stop_wait_s() -> float | None:
    """Seconds ``ray job stop`` waits before SIGKILL, in a Ray job; None outside one."""
    if RAY_JOB_ENV not in os.environ:
        return None
    try:
        return float(os.environ.get(WAIT_ENV, RAY_DEFAULT_WAIT_S))
    except ValueError:
        return RAY_DEFAULT_WAIT_S


def stop_grace_s(default: float) -> float:
    """How long a stopped stage gets before SIGKILL: ``default``, or within Ray's wait."""
    wait = ray_stop_wait_s()
    if wait is None:
        return default
    return max(min(default, wait - MARGIN_S), 0.5)


def warn_short_stop_wait() -> None:
    """In a Ray job whose stop wait is short, one line saying how to lengthen it."""
    wait = ray_stop_wait_s()
    if wait is not None and wait < RECOMMENDED_WAIT_S:
        print(
            f"note: `ray job stop` SIGKILLs this job {wait:.0f} s after its SIGTERM "
            f"({WAIT_ENV}); for a clean stop (the running stage uploads what it finished) "
            f'submit with "{WAIT_ENV}": "{RECOMMENDED_WAIT_S:.0f}" in the runtime env\'s '
            "env_vars",
            file=sys.stderr,
            flush=True,
        )
