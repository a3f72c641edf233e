"""Shared entry-point behaviour: quiet third-party logging, one-line user errors, fast exit."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import NoReturn, TypeVar

from pipeline import forkserver
from pipeline.errors import UserError
from pipeline.uri import redact_uri

F = TypeVar("F", bound=Callable[..., object])

# Environment that keeps Ray, MLflow and DVC quiet and offline-friendly (errors still show).
# Ray's authentication is left as it is (pipeline.cluster.raycluster: token on a local cluster).
QUIET_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_DEDUP_LOGS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
}


def quiet_environment() -> None:
    """Set the quiet defaults above where the user has not set the variable."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


_STAGE_LABEL: str | None = None  # "<stage> <variant>" of the running stage (entry_point)


def stage_label() -> str | None:
    """What the running stage works on, e.g. ``evaluate eps_fixed_mse`` (the prefix of every
    progress line), or None outside a stage's ``main``."""
    return _STAGE_LABEL


def _label(fn: Callable[..., object], argv: object) -> str | None:
    """``<stage> [<variant>]`` of a stage's main (module stages.<stage>, ``--variant V``)."""
    module = getattr(fn, "__module__", "") or ""
    if module == "__main__":  # python -m stages.<stage>: the module's real name is its spec's
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = getattr(spec, "name", "") or ""
    if not module.startswith("stages."):
        return None
    args = list(argv) if isinstance(argv, list | tuple) else sys.argv[1:]
    parts = [module.removeprefix("stages.")]
    for i, arg in enumerate(args):
        if arg == "--variant" and i + 1 < len(args):
            parts.append(str(args[i + 1]))
        elif str(arg).startswith("--variant="):
            parts.append(str(arg).partition("=")[2])
    return " ".join(parts)


# MLflow's error codes for a refusal by an authenticated tracking server (HTTP 401 and 403)
MLFLOW_REFUSALS = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}
MLFLOW_CREDENTIALS = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)


def mlflow_refusal(e: BaseException) -> str | None:
    """The one-line message for an MLflow server's refusal (401, 403) of a request, else None.

    Credentials come only from the environment (MLflow reads MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN, itself); the message names what is set,
    never a value, and the store's URI without credentials (pipeline.uri).
    """
    exceptions = sys.modules.get("mlflow.exceptions")
    if exceptions is None or not isinstance(e, exceptions.MlflowException):
        return None
    code = getattr(e, "error_code", None)
    if code not in MLFLOW_REFUSALS:
        return None
    store = redact_uri(os.environ.get("MLFLOW_TRACKING_URI") or "the MLflow tracking store")
    given = [k for k in MLFLOW_CREDENTIALS if os.environ.get(k)]
    if code == "PERMISSION_DENIED":
        who = os.environ.get("MLFLOW_TRACKING_USERNAME") or "this token's user"
        return (
            f"{store} refused the request (HTTP 403): {who} may not do it; ask the server's "
            "admin for EDIT (or MANAGE) permission on the experiment (docs/running.md, "
            "Authentication)"
        )
    if given:
        what = f"the credentials in {' and '.join(given)} were not accepted"
    else:
        what = "no credentials given"
    return (
        f"{store} refused the request (HTTP 401): {what}; set MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment "
        "(docs/running.md, Authentication)"
    )


class Terminated(SystemExit):
    """SIGTERM or SIGHUP, raised in the main thread so that ``finally`` blocks run."""


def _terminate(signum: int, _frame: object) -> None:
    raise Terminated(128 + signum)


def entry_point(fn: F) -> F:
    """Wrap a ``main(argv)``: user errors become one ``error:`` line on stderr and exit 2, and
    so does an MLflow server's refusal (:func:`mlflow_refusal`).

    Ctrl-C (SIGINT) exits with 130, SIGTERM with 143 and SIGHUP with 129, after the ``finally``
    blocks (temporary outputs removed, Ray disconnected); outputs are only ever renamed into
    place complete, so an interrupted stage leaves none.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _STAGE_LABEL
        quiet_environment()
        outer, _STAGE_LABEL = _STAGE_LABEL, _label(fn, args[0] if args else kwargs.get("argv"))
        saved = {}
        if threading.current_thread() is threading.main_thread():
            saved = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except (KeyboardInterrupt, Terminated) as e:
            print("interrupted: finished work is kept; rerun to resume", file=sys.stderr)
            sys.exit(e.code if isinstance(e, Terminated) else 130)
        except BrokenPipeError:  # stdout closed by the reader (`... | head`): stop quietly
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)  # 128 + SIGPIPE, as a shell reports it
        except Exception as e:
            refused = mlflow_refusal(e)  # an authenticated MLflow server said no: one line
            if refused is None:
                raise
            print(f"error: {refused}", file=sys.stderr)
            sys.exit(2)
        finally:
            _STAGE_LABEL = outer
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    return wrapper  # type: ignore[return-value]


STOPPED = (128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGHUP)  # entry_point's codes


def run_stage(main: Callable[[], object]) -> NoReturn:
    """Run a DVC stage's ``main()`` as the program, then end the process at once.

    When ``main`` returns, the stage's outputs are complete (every file is written to a temporary
    name and renamed). What Python would do next, tearing down the torch, Ray, MLflow and
    torch-fidelity module graphs, takes 2-3 s a process on a 2-core CPU, ~50 s of a ``make repro``
    of 19 stages. So the MLflow run that is still active is ended (as MLflow's exit hook would),
    the Ray driver disconnects, logging and the standard streams are flushed, and the process
    exits with ``os._exit(0)``. An error exits the normal way (``entry_point``); a stop by a
    signal ignores further stop signals while the interpreter exits, so that none lands in an
    exit handler (Ray's, MLflow's) and prints a traceback there.

    Under ``stages.repro`` a stage server (:mod:`pipeline.forkserver`) may run the stage instead,
    in a process forked with the imports done; this process then waits and exits as that one.
    """
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and (code := forkserver.delegate(spec.name, sys.argv[1:])) is not None:
        forkserver.exit_as(code)
    try:
        main()
    except SystemExit as e:
        if e.code in STOPPED:  # stopped: repro.py resends the signal every 0.5 s until the
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # process is gone;
                signal.signal(sig, signal.SIG_IGN)  # none may interrupt the exit (atexit)
        raise
    if "mlflow" in sys.modules:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.end_run()
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
