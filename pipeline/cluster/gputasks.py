"""One task per GPU: a Ray worker that ran a GPU task exits after it.

Ray hands a task with ``num_gpus`` its devices through ``CUDA_VISIBLE_DEVICES``, set as the task
starts. A CUDA context, once created, stays on the devices that were visible then, so a worker
process reused for a later task would keep computing on its first GPU while Ray has lent that
task another one: two tasks on one GPU, one GPU idle. Ray guards against this (``max_calls=1``)
only for functions declared with ``num_gpus`` in ``@ray.remote``, not for ``num_gpus`` given
through ``.options()`` (which cannot set ``max_calls`` either).

:func:`submit` runs a module-level function as a Ray task with the given resources: through a
``max_calls=1`` remote function when the resources name GPUs (a fresh worker per GPU task, which
costs a process start, seconds, against GPU tasks of minutes to hours), through a reusable
worker otherwise. Block tasks (sampling, the NLL), Fig. 6's chains and Fig. 7/8's chains all go
through it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

from pipeline.cluster import taskprogress


@ray.remote
def _call(fn: Callable[..., Any], progress: Any, *args: Any) -> Any:
    """``fn(*args)`` in a reusable worker (CPU tasks)."""
    with taskprogress.reporting(progress):
        return fn(*args)


@ray.remote(max_calls=1)
def _call_on_gpu(fn: Callable[..., Any], progress: Any, *args: Any) -> Any:
    """``fn(*args)`` in a worker that exits afterwards (tasks that hold GPUs)."""
    with taskprogress.reporting(progress):
        return fn(*args)


def uses_gpu(resources: dict[str, float]) -> bool:
    """Whether Ray resources ``{"num_cpus": .., "num_gpus": ..}`` ask for any GPU."""
    return bool(resources.get("num_gpus"))


def submit(
    fn: Callable[..., Any],
    *args: Any,
    resources: dict[str, float],
    progress: Any = None,
    **options: Any,
) -> ray.ObjectRef:
    """Submit ``fn(*args)`` as a Ray task with ``resources``; returns its ObjectRef.

    Args:
        fn: a module-level function (Ray pickles it by reference).
        args: its arguments (ObjectRefs among them are resolved by Ray as usual).
        resources: per-task Ray resources, e.g. ``{"num_cpus": 1, "num_gpus": 1}``.
        progress: ``(board, key)`` to report the task's image-steps to
        (pipeline.cluster.taskprogress).
        options: further task options (``max_retries``, ``retry_exceptions``, ...; ``name``:
        the task's name in Ray's records, default ``fn``'s).
    """
    remote = _call_on_gpu if uses_gpu(resources) else _call
    name = options.pop("name", None) or getattr(fn, "__name__", "task")
    return remote.options(name=name, **resources, **options).remote(fn, progress, *args)
