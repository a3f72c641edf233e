"""Shared entry-point behaviour: quiet third-party logging, one-line user errors."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from pipeline.errors import UserError

F = TypeVar("F", bound=Callable[..., object])

# Environment that keeps Ray, MLflow and DVC quiet and offline-friendly (errors still show).
QUIET_ENV = {
    "RAY_AUTH_MODE": "disabled",
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


def entry_point(fn: F) -> F:
    """Wrap a ``main(argv)``: user errors become one ``error:`` line on stderr and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        quiet_environment()
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted: finished work is kept; rerun to resume", file=sys.stderr)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
