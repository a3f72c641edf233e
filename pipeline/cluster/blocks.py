"""Resumable work in fixed blocks of item indices, fanned out as Ray tasks.

Items ``0 .. n_items-1`` (sample indices, test-image indices) are cut into fixed blocks
``[start, min(start + block_size, n_items))``. Each block is one Ray task that returns a dict of
arrays whose first axis is the block's items; the driver writes it atomically as
``block-{start:08d}-{stop:08d}.npz`` in ``out_dir``. So:

- resume: a block whose shard exists and is readable is skipped (a rerun after an interrupt, or
  with more items, computes only what is missing);
- fault tolerance: a failed task is retried by Ray (``max_retries`` with
  ``retry_exceptions=True``); a shard appears only once its block is complete, never twice;
- workers need no shared filesystem: results travel through the object store and only the
  driver writes files (``ray job submit`` onto a multi-node cluster works as is).

:func:`merge_blocks` reads the shards back and checks that every index is covered exactly once.
The module knows nothing about what a block computes; sampling and the NLL evaluation use it.

Test-only fault hook (pipeline.cluster.testhooks): with ``DDPM_TEST_FAIL_BLOCK=<start>`` in the
driver's environment, the
task of the block starting at ``start`` raises once (a marker file in ``out_dir`` makes the
retry succeed); with ``kill:<start>`` its worker process SIGKILLs itself once, while the task
runs. It exists for the fault-tolerance tests; never set it in real runs.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import re
import signal
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from tqdm import tqdm

from pipeline.atomic import save_npz
from pipeline.cluster import testhooks
from pipeline.cluster.gputasks import submit
from pipeline.cluster.taskprogress import BlockProgress
from pipeline.config import Config, EvalConfig, SampleConfig, TrainConfig
from pipeline.errors import ConfigError, DataError

GPU_WAIT_ENV = "DDPM_GPU_WAIT_S"  # seconds to wait for GPUs an autoscaler starts (check_resources)
AUTO = "auto"  # num_workers: follow the cluster (Window)
SHARD_RE = re.compile(r"^block-(\d{8})-(\d{8})\.npz$")

TaskFn = Callable[[int, int, Any], dict[str, np.ndarray]]
"""``task_fn(start, stop, shared) -> {name: array [stop - start, ...]}``, run in a Ray worker."""

Range = tuple[int, int]


@dataclass
class BlockRun:
    """What :func:`run_blocks` did: blocks computed now, blocks reused, compute time."""

    computed: list[Range] = field(default_factory=list)
    skipped: list[Range] = field(default_factory=list)
    elapsed_s: float = 0.0  # wall time from the first submission to the last shard written

    @property
    def items_computed(self) -> int:
        return sum(stop - start for start, stop in self.computed)

    @property
    def items_per_s(self) -> float | None:
        """Throughput of this run's computed blocks (None when nothing was computed)."""
        if not self.computed or self.elapsed_s <= 0:
            return None
        return self.items_computed / self.elapsed_s


def block_ranges(n_items: int, block_size: int) -> list[Range]:
    """The fixed blocks [start, stop) covering 0 .. n_items-1 (the last may be shorter)."""
    if n_items < 0 or block_size <= 0:
        raise ValueError(f"need n_items >= 0 and block_size > 0 (got {n_items}, {block_size})")
    return [(s, min(s + block_size, n_items)) for s in range(0, n_items, block_size)]


def shard_path(out_dir: str | os.PathLike, start: int, stop: int) -> Path:
    """Where the block [start, stop) is stored."""
    return Path(out_dir) / f"block-{start:08d}-{stop:08d}.npz"


def list_shards(out_dir: str | os.PathLike) -> list[Range]:
    """The (start, stop) of every shard file in ``out_dir``, sorted."""
    folder = Path(out_dir)
    if not folder.is_dir():
        return []
    found = (SHARD_RE.match(p.name) for p in folder.iterdir())
    return sorted((int(m[1]), int(m[2])) for m in found if m)


def read_shard(path: Path, n_rows: int) -> dict[str, np.ndarray]:
    """A shard's arrays; DataError if unreadable or if an array has not ``n_rows`` rows."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # truncated, not a zip, bad header
        raise DataError(f"{path}: unreadable shard ({type(e).__name__}: {e})") from None
    bad = {k: a.shape for k, a in arrays.items() if a.ndim == 0 or a.shape[0] != n_rows}
    if not arrays or bad:
        raise DataError(f"{path}: expected arrays of {n_rows} rows, found {bad or 'none'}")
    return arrays


def _is_finished(out_dir: Path, block: Range) -> bool:
    path = shard_path(out_dir, *block)
    if not path.is_file():
        return False
    try:
        read_shard(path, block[1] - block[0])
    except DataError as e:
        tqdm.write(f"recomputing a damaged shard: {e}")
        path.unlink()
        return False
    return True


def _remove_superseded(out_dir: Path, blocks: list[Range]) -> None:
    """Delete shards that overlap this run's blocks without being one (an old last block)."""
    wanted = set(blocks)
    n_items = blocks[-1][1] if blocks else 0
    for start, stop in list_shards(out_dir):
        if (start, stop) not in wanted and start < n_items:
            shard_path(out_dir, start, stop).unlink()


def _fail_marker(out_dir: Path, start: int) -> str | None:
    """The marker path that arms the test-only fault hook for this block, or None."""
    spec = testhooks.fail_block()
    if spec.removeprefix("kill:") != str(start):
        return None
    return str(out_dir / f".failed-once-{start:08d}") + (".kill" if spec != str(start) else "")


def _run_block(
    task_fn: TaskFn, start: int, stop: int, shared: Any, fail_marker: str | None
) -> dict[str, np.ndarray]:
    if fail_marker is not None and not os.path.exists(fail_marker):
        Path(fail_marker).touch()
        if fail_marker.endswith(".kill"):  # the worker process is lost; Ray reruns the task
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"test fault hook: block [{start}, {stop}) fails once")
    return task_fn(start, stop, shared)


def _ray_name(name: str) -> str:
    return "GPU" if name == "num_gpus" else "CPU"


def _short(resources: dict[str, float]) -> dict[str, float]:
    total = ray.cluster_resources()
    return {n: need for n, need in resources.items() if need and total.get(_ray_name(n), 0) < need}


def check_resources(resources: dict[str, float]) -> None:
    """ConfigError when no node of the Ray cluster could ever run a task with ``resources``.

    With ``DDPM_GPU_WAIT_S`` = s > 0 in the environment (an autoscaling cluster whose GPU nodes
    start on demand: ``min_workers: 0``, KubeRay's autoscaler), the missing resources are first
    requested from the autoscaler and waited for up to s seconds.
    """
    short = _short(resources)
    wait_s = float(os.environ.get(GPU_WAIT_ENV) or 0)
    if short and wait_s > 0:
        from ray.autoscaler.sdk import request_resources

        bundle = {_ray_name(n): need for n, need in resources.items() if need}
        request_resources(bundles=[bundle])  # a no-op without an autoscaler
        deadline = time.monotonic() + wait_s
        while short and time.monotonic() < deadline:
            time.sleep(min(5.0, wait_s))
            short = _short(resources)
    if short:
        total = ray.cluster_resources()
        have = {k: total.get(k, 0.0) for k in ("CPU", "GPU")}
        raise ConfigError(
            f"each task needs {short} but the Ray cluster has {have}; lower cpus_per_worker / "
            f"gpus_per_worker, set use_gpu: false, or connect to a cluster with GPUs"
        )


def check_gpu_preset(cfg: Config) -> None:
    """A preset whose training, sampling or NLL asks for GPUs (``use_gpu``) on a connected Ray
    cluster with none (after ``DDPM_GPU_WAIT_S``, as :func:`check_resources`): ConfigError, so
    that ``stages.repro`` stops before any stage with one line, not at the first GPU stage."""
    sections: dict[str, TrainConfig | SampleConfig | EvalConfig]
    sections = {"train": cfg.train, "sample": cfg.sample, "eval": cfg.eval}
    asks = {name: s.gpus_per_worker for name, s in sections.items() if s.use_gpu}
    if not asks:
        return
    try:
        check_resources({"num_gpus": min(asks.values())})
    except ConfigError as e:
        names = ", ".join(f"{name}.use_gpu" for name in asks)
        raise ConfigError(f"presets.{cfg.scale} asks for GPUs ({names}): {e}") from None


def cluster_slots(resources: dict[str, float]) -> int:
    """How many tasks of ``resources`` the Ray cluster holds at once now (by its total GPUs,
    and CPUs; at least 1): the window of ``num_workers: auto``."""
    total = ray.cluster_resources()
    fits = [
        int(total.get(_ray_name(n), 0.0) / need + 1e-9) for n, need in resources.items() if need
    ]
    return max(1, min(fits, default=1))


class Window:
    """``num_workers`` as the number of tasks to keep in flight: a fixed number, or ``auto``:
    :func:`cluster_slots`, re-read at most every ``every_s`` seconds (a node that joins while
    the stage runs is used; one that leaves only stops the refills)."""

    def __init__(self, num_workers: int | str, resources: dict[str, float], every_s: float = 10):
        if num_workers != AUTO and (isinstance(num_workers, str) or num_workers < 1):
            raise ValueError(f"num_workers must be at least 1 or {AUTO!r} (got {num_workers!r})")
        self.num_workers, self.resources, self.every_s = num_workers, resources, every_s
        self._read_at, self._value = -float("inf"), 1
        self.seen: list[int] = []  # the distinct windows used, in order (logs and tests)

    def __call__(self) -> int:
        if self.num_workers != AUTO:
            return int(self.num_workers)
        if time.monotonic() - self._read_at >= self.every_s:
            self._read_at, self._value = time.monotonic(), cluster_slots(self.resources)
            if not self.seen or self.seen[-1] != self._value:
                self.seen.append(self._value)
                tqdm.write(f"num_workers auto: {self._value} tasks in flight")
        return self._value


def run_blocks(
    task_fn: TaskFn,
    n_items: int,
    block_size: int,
    out_dir: str | os.PathLike,
    num_workers: int | str,
    resources: dict[str, float] | None = None,
    desc: str = "items",
    shared: Any = None,
    max_retries: int = 3,
    connect: Callable[[], None] | None = None,
    steps_per_item: int = 0,
    label: str | None = None,
) -> BlockRun:
    """Compute every missing block of ``0 .. n_items-1`` on Ray and store it in ``out_dir``.

    Args:
        task_fn: ``task_fn(start, stop, shared)`` returns ``{name: array}`` with
            ``stop - start`` rows each; a module-level function (Ray pickles it by reference).
        n_items: items to cover; block_size: items per block (the unit of work and resume).
        out_dir: the shard folder (absolute or relative to the driver's cwd).
        num_workers: Ray tasks kept in flight at once, or ``auto``: as many as the cluster
            holds (:class:`Window`, re-read as the stage runs).
        resources: per-task Ray resources, e.g. ``{"num_cpus": 1, "num_gpus": 0.5}``.
        desc: the progress bar's unit (``samples``, ``images``).
        shared: one object every task receives (e.g. the model's state dict), put in Ray's
            object store once.
        max_retries: Ray retries of a failed task (exceptions included).
        connect: called once before the first task when there is work to do (e.g. to start
            Ray only then: a rerun with every shard present needs no cluster).
        steps_per_item: image-steps a task reports per item through pipeline.cluster.taskprogress
            (reverse steps or timesteps; 0: progress only as blocks finish).
        label: the pass, the progress lines' name (e.g. ``bound, test images``; default desc).

    Raises:
        RuntimeError when a block still fails after its retries; finished shards are kept,
        so a rerun resumes.
    """
    resources = dict(resources or {"num_cpus": 1})
    window = Window(num_workers, resources)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    blocks = block_ranges(n_items, block_size)
    _remove_superseded(out_dir, blocks)
    run = BlockRun()
    todo: list[Range] = []
    for block in blocks:
        (run.skipped if _is_finished(out_dir, block) else todo).append(block)
    if todo and connect is not None:
        connect()
    if todo:
        check_resources(resources)
    done = sum(stop - start for start, stop in run.skipped)
    progress = BlockProgress(n_items, done, label or desc, steps_per_item if todo else 0, unit=desc)
    try:
        started = time.perf_counter()
        if todo:
            options = {"resources": resources, "max_retries": max_retries, "retry_exceptions": True}
            launch = functools.partial(
                _launch, options, task_fn, ray.put(shared), out_dir, progress
            )
            windowed = _windowed(todo, launch, window, max_retries, progress.poll)
            with contextlib.closing(windowed) as results:
                for block, arrays in results:
                    _store(out_dir, block, arrays)
                    run.computed.append(block)
                    progress.finished(block, block[1] - block[0])
        run.elapsed_s = time.perf_counter() - started
    finally:
        progress.close()
    return run


def _launch(
    options: dict,
    task_fn: TaskFn,
    shared_ref: Any,
    out_dir: Path,
    progress: BlockProgress,
    block: Range,
) -> Any:
    """Submit the task of one block (one GPU task per worker: pipeline.cluster.gputasks); its
    ObjectRef."""
    marker = _fail_marker(out_dir, block[0])
    return submit(
        _run_block,
        task_fn,
        block[0],
        block[1],
        shared_ref,
        marker,
        progress=progress.handle(block),
        name=getattr(task_fn, "__name__", "_run_block"),  # sample_block, nll_block in Ray's records
        **options,
    )


def _windowed(
    todo: list[Range],
    launch: Callable[[Range], Any],
    window: Callable[[], int],
    max_retries: int,
    idle: Callable[[], None] = lambda: None,
    every_s: float = 2.0,
) -> Generator[tuple[Range, dict[str, np.ndarray]], None, None]:
    """Yield (block, result) as tasks finish, keeping at most ``window()`` of them in flight.

    ``window()`` is asked again whenever a task finishes and every ``every_s`` seconds, so a
    window that grows (GPUs that joined the cluster) is filled at once. ``idle()`` is called
    every ``every_s`` seconds without a finished task (progress polling).

    Closing the generator (an error or an interrupt in the caller) cancels the tasks in flight,
    gently: ``force=True`` racing a finishing task can abort the driver (seen with Ray 2.60),
    and when the driver exits Ray ends the tasks it owns anyway.
    """
    queue = iter(todo)
    pending: dict[Any, Range] = {}

    def refill() -> None:
        more = max(0, window() - len(pending))
        pending.update({launch(b): b for b in itertools.islice(queue, more)})

    refill()
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=every_s)
            if not ready:
                idle()
                refill()
                continue
            block = pending.pop(ready[0])
            yield block, _get(ready[0], block, max_retries)
            refill()
    finally:
        for ref in pending:
            ray.cancel(ref)


def _get(ref: Any, block: Range, max_retries: int) -> dict[str, np.ndarray]:
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as e:
        raise RuntimeError(
            f"block [{block[0]}, {block[1]}) failed after {max_retries} retries: {e}; "
            f"finished blocks are kept, rerun to resume"
        ) from e


def _store(out_dir: Path, block: Range, arrays: dict[str, np.ndarray]) -> None:
    rows = block[1] - block[0]
    if not isinstance(arrays, dict) or not arrays:
        raise TypeError(f"task for block {block} returned {type(arrays).__name__}, not arrays")
    bad = {k: np.shape(a) for k, a in arrays.items() if np.ndim(a) == 0 or len(a) != rows}
    if bad:
        raise ValueError(f"task for block {block} returned arrays without {rows} rows: {bad}")
    save_npz(shard_path(out_dir, *block), **arrays)


def merge_blocks(
    out_dir: str | os.PathLike, n_items: int, block_size: int
) -> dict[str, np.ndarray]:
    """Concatenate the shards of ``0 .. n_items-1`` in index order: ``{name: [n_items, ...]}``.

    Raises DataError naming the index ranges that are missing, or covered by more than one
    shard (overlapping shards of another block size or item count), and unreadable shards.
    Shards that start at or beyond ``n_items`` are ignored.
    """
    out_dir = Path(out_dir)
    blocks = checked_blocks(out_dir, n_items, block_size)
    parts: dict[str, list[np.ndarray]] = {}
    for start, stop in blocks:
        arrays = read_shard(shard_path(out_dir, start, stop), stop - start)
        if parts and set(arrays) != set(parts):
            raise DataError(
                f"{shard_path(out_dir, start, stop)}: arrays {sorted(arrays)} differ from the "
                f"other shards' {sorted(parts)}"
            )
        for key, value in arrays.items():
            parts.setdefault(key, []).append(value)
    return {key: np.concatenate(values) for key, values in parts.items()}


def checked_blocks(out_dir: Path, n_items: int, block_size: int) -> list[Range]:
    """The blocks of ``0 .. n_items-1``, after checking that the shards in ``out_dir`` are
    exactly those blocks (DataError naming missing, duplicated or foreign ranges otherwise)."""
    blocks = block_ranges(n_items, block_size)
    present = [r for r in list_shards(out_dir) if r[0] < n_items]
    _check_coverage(out_dir, n_items, present)
    wrong = sorted(set(present) - set(blocks))
    if wrong:
        raise DataError(
            f"{out_dir}: shards {_fmt(wrong)} are not blocks of {block_size} items; "
            f"merge with the block size they were computed with"
        )
    return blocks


def _check_coverage(out_dir: Path, n_items: int, present: list[Range]) -> None:
    """DataError naming the indices that no shard, or more than one shard, covers."""
    counts = np.zeros(n_items, dtype=np.int64)
    for start, stop in present:
        counts[start : min(stop, n_items)] += 1
    missing, duplicated = _runs(counts == 0), _runs(counts > 1)
    if missing or duplicated:
        parts = []
        if missing:
            parts.append(f"missing indices {_fmt(missing)}")
        if duplicated:
            parts.append(f"indices {_fmt(duplicated)} in more than one shard")
        raise DataError(
            f"{out_dir}: cannot merge {n_items} items: {'; '.join(parts)} "
            f"({len(present)} shards found); rerun the stage to compute the missing blocks"
        )


def _runs(mask: np.ndarray) -> list[Range]:
    """Maximal [start, stop) runs where ``mask`` is true."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts, stops = np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()
    return list(zip(starts, stops, strict=True))


def _fmt(ranges: list[Range], limit: int = 5) -> str:
    shown = ", ".join(f"[{a}, {b})" for a, b in ranges[:limit])
    return shown + (f" and {len(ranges) - limit} more" if len(ranges) > limit else "")
