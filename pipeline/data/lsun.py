"""LSUN from the LMDB databases the LSUN project distributes (key -> jpeg or webp bytes).

Records are read in key order. Each is decoded with Pillow, converted to RGB, centre-cropped to
a square of its shorter side and resized to 256x256 with Lanczos (antialiased) resampling: the
StyleGAN2 ``dataset_tool.py create_lsun`` recipe, whose TFRecords the official DDPM code trained
on. LSUN images already have a shorter side of 256, so for most records this is a pure crop.

The records are cut into shards of ``shard_size`` consecutive records (``train-00000.npy``, ...);
the last ``test_fraction`` of them form the test split (LSUN has none). Shards are the unit of
resumption: finished ones wait in ``data/.<scale>.partial/`` and a rerun with the same source and
shape-determining params skips them. Decoding runs in a process pool with a bounded number of
chunks in flight and every image goes straight to its shard file, so memory does not grow with the
number of images. Undecodable records are skipped and listed; more than ``max_corrupt_fraction``
of them fails the stage.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, ParamSpec, TypeVar

import lmdb
import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.atomic import write_json
from pipeline.config import DataConfig
from pipeline.data.manifest import NpyWriter, one_line, sha256_file, split_entry
from pipeline.errors import DataError

RESOLUTION = 256
CHUNK = 16  # records per decode task
DECODE_VERSION = 1  # bump when decode_record changes (finished shards are then redone)
_ADDRESS = re.compile(r" ?<[^<>]* at 0x[0-9a-fA-F]+>")
LSUN_HINT = (
    "download it from the LSUN project (https://github.com/fyu/lsun, download.py -c <category>)"
)


class Shard(NamedTuple):
    """Records [start, stop) of the source, written to ``<split>-<index>.npy``."""

    split: str
    number: int  # the shard's number in its split (`index` would hide tuple.index)
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.split}-{self.number:05d}"


def plan_shards(total: int, n_test: int, shard_size: int) -> list[Shard]:
    """Train shards over records [0, total - n_test), test shards over the rest."""
    shards = []
    for split, lo, hi in (("train", 0, total - n_test), ("test", total - n_test, total)):
        for index, start in enumerate(range(lo, hi, shard_size)):
            shards.append(Shard(split, index, start, min(start + shard_size, hi)))
    return shards


def decode_record(value: bytes, resolution: int = RESOLUTION) -> np.ndarray:
    """Encoded image bytes -> uint8 [R, R, 3]: centre square crop, then Lanczos resize to R."""
    with Image.open(io.BytesIO(value)) as encoded:
        image = encoded.convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def decode_chunk(values: list[bytes], resolution: int) -> list[np.ndarray | str]:
    """Decode each record; an undecodable one gives its error message instead of an image."""
    out: list[np.ndarray | str] = []
    for value in values:
        try:
            out.append(decode_record(value, resolution))
        except Exception as e:  # any failure to decode means a corrupt record
            reason = _ADDRESS.sub("", one_line(e))  # no memory addresses: the manifest is stable
            out.append(f"{type(e).__name__}: {reason}")
    return out


def source_path(source: str | None, where: str) -> Path:
    """The LMDB folder (or data.mdb file) named by ``data.source``; DataError if there is none."""
    if source is None:
        raise DataError(f"{where}.source is not set: {LSUN_HINT} and set it to the LMDB folder")
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such LMDB folder; {LSUN_HINT} and set {where}.source")
    return path


def open_lmdb(path: Path) -> lmdb.Environment:
    """Open an LMDB (a folder with data.mdb, or the data.mdb file) read-only."""
    try:
        return lmdb.open(
            str(path), subdir=path.is_dir(), readonly=True, lock=False, readahead=False
        )
    except lmdb.Error as e:
        raise DataError(f"{path}: not an LMDB database ({one_line(e)})") from None


_P = ParamSpec("_P")
_T = TypeVar("_T")


class _Inline(concurrent.futures.Executor):
    """Runs tasks in the calling process (``workers: 0``)."""

    def submit(
        self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> concurrent.futures.Future[_T]:
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        future.set_result(fn(*args, **kwargs))
        return future


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and cleans up


def _executor(workers: int) -> concurrent.futures.Executor:
    """A pool of ``workers`` decode processes (none: decode inline), all started at once.

    Forked where the platform can (spawn would re-run an unguarded calling script), before the
    LMDB is opened and before any thread (tqdm's monitor) exists.
    """
    if workers <= 0:
        return _Inline()
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_ignore_sigint
    )
    pool.submit(int).result()  # a fork pool starts all its processes on the first task
    return pool


class _CorruptBudget:
    """Counts undecodable records and fails once they exceed the allowed fraction."""

    def __init__(self, total: int, fraction: float, source: str, where: str):
        self.total, self.fraction, self.source, self.where = total, fraction, source, where
        self.records: list[dict[str, str]] = []

    def add(self, records: list[dict[str, str]]) -> None:
        self.records.extend(records)
        if records and len(self.records) > self.fraction * self.total:
            first = self.records[0]
            raise DataError(
                f"{self.source}: {len(self.records)} corrupt or undecodable records among the "
                f"{self.total} to prepare (first: key {first['key']}, {first['error']}), more "
                f"than {self.where}.max_corrupt_fraction = {self.fraction} allows"
            )


def _records(cursor: lmdb.Cursor, count: int) -> Iterator[list[tuple[bytes, bytes]]]:
    """The next ``count`` (key, value) records from the cursor's position, in chunks."""
    chunk: list[tuple[bytes, bytes]] = []
    for _ in range(count):
        chunk.append((bytes(cursor.key()), bytes(cursor.value())))  # bytes: the same object
        cursor.next()
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _hash_records(digest: Any, chunk: list[tuple[bytes, bytes]]) -> None:
    for key, value in chunk:
        digest.update(len(key).to_bytes(8, "little") + key + len(value).to_bytes(8, "little"))
        digest.update(value)


# a chunk in flight: its keys and the future of its decoded images (or error messages)
_Pending = tuple[list[bytes], concurrent.futures.Future[list[np.ndarray | str]]]


def _write_shard(
    shard: Shard,
    cursor: lmdb.Cursor,
    pool: concurrent.futures.Executor,
    in_flight: int,
    work: Path,
    budget: _CorruptBudget,
    bar: tqdm[Any],
) -> dict[str, Any]:
    """Decode the shard's records in the pool and stream them into ``work/<name>.npy``.

    At most ``in_flight`` chunks are submitted and not yet written, so memory stays bounded.
    """
    tmp = work / f".{shard.name}.npy.tmp"
    writer = NpyWriter(tmp, RESOLUTION)
    digest, corrupt = hashlib.sha256(), []
    window: collections.deque[_Pending] = collections.deque()

    def drain_one() -> None:
        keys, future = window.popleft()
        bad = []
        for key, result in zip(keys, future.result(), strict=True):
            if isinstance(result, str):
                bad.append({"key": key.decode("ascii", "backslashreplace"), "error": result})
            else:
                writer.add(result[None])
        corrupt.extend(bad)
        budget.add(bad)
        bar.update(len(keys))

    try:
        for chunk in _records(cursor, shard.stop - shard.start):
            _hash_records(digest, chunk)
            values = [value for _, value in chunk]
            window.append(
                ([key for key, _ in chunk], pool.submit(decode_chunk, values, RESOLUTION))
            )
            if len(window) >= in_flight:
                drain_one()
        while window:
            drain_one()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    path = work / f"{shard.name}.npy"
    os.replace(tmp, path)
    return {
        "count": writer.count,
        "sha256": sha256_file(path),
        "records_sha256": digest.hexdigest(),
        "corrupt": corrupt,
    }


def _identity(env: lmdb.Environment, source: Path, data: DataConfig) -> dict[str, Any]:
    """What finished shards depend on; a partial folder made for another identity is discarded."""
    mdb = source / "data.mdb" if source.is_dir() else source
    stat = mdb.stat()
    return {
        "source": str(source.resolve()),
        "entries": env.stat()["entries"],
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "max_images": data.max_images,
        "test_fraction": data.test_fraction,
        "shard_size": data.shard_size,
        "decode_version": DECODE_VERSION,
    }


def _read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or damaged."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _start_partial(work: Path, identity: dict[str, Any]) -> None:
    """Keep ``work``'s finished shards only if they were made for the same ``identity``."""
    job = work / "job.json"
    if work.exists() and _read_json(job) != identity:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_json(job, identity)


def _finished(work: Path, shard: Shard) -> dict[str, Any] | None:
    """The record of a shard finished by an earlier run (its file intact), else None."""
    done, path = _read_json(work / f"{shard.name}.json"), work / f"{shard.name}.npy"
    if not (isinstance(done, dict) and path.is_file()):
        return None
    return done if sha256_file(path) == done.get("sha256") else None


def prepare_lsun(data: DataConfig, out: Path, where: str, work: Path) -> dict[str, Any]:
    """Decode ``data.source`` into 256x256 shards in ``out`` (built in ``work``); the manifest."""
    source = source_path(data.source, where)
    with _executor(data.workers) as pool:
        env = open_lmdb(source)
        try:
            entries = env.stat()["entries"]
            if entries == 0:
                raise DataError(f"{source}: the LMDB database is empty; {LSUN_HINT}")
            identity = _identity(env, source, data)
            _start_partial(work, identity)
            total = min(entries, data.max_images or entries)
            shards = plan_shards(total, round(total * data.test_fraction), data.shard_size)
            budget = _CorruptBudget(total, data.max_corrupt_fraction, str(source), where)
            results = _run_shards(env, pool, shards, data, work, budget)
        finally:
            env.close()
    manifest = _manifest(data, source, identity, shards, results, budget)
    for shard in shards:
        if results[shard.name]["count"]:
            os.replace(work / f"{shard.name}.npy", out / f"{shard.name}.npy")
    shutil.rmtree(work)
    return manifest


def _run_shards(
    env: lmdb.Environment,
    pool: concurrent.futures.Executor,
    shards: list[Shard],
    data: DataConfig,
    work: Path,
    budget: _CorruptBudget,
) -> dict[str, dict[str, Any]]:
    """Write every shard not finished yet, in record order; returns each shard's record."""
    results: dict[str, dict[str, Any]] = {}
    in_flight = 2 * max(data.workers, 1)
    bar = tqdm(total=shards[-1].stop, unit="img", desc=data.dataset, disable=None)
    with env.begin(buffers=False) as txn, bar:
        cursor = txn.cursor()
        cursor.first()
        for shard in shards:
            done = _finished(work, shard)
            if done is None:
                done = _write_shard(shard, cursor, pool, in_flight, work, budget, bar)
                write_json(work / f"{shard.name}.json", done)
            else:
                for _ in range(shard.stop - shard.start):
                    cursor.next()
                budget.add(done["corrupt"])
                bar.update(shard.stop - shard.start)
            results[shard.name] = done
    return results


def _manifest(
    data: DataConfig,
    source: Path,
    identity: dict[str, Any],
    shards: list[Shard],
    results: dict[str, dict[str, Any]],
    budget: _CorruptBudget,
) -> dict[str, Any]:
    """The manifest of the finished shards; DataError when not a single image decoded."""
    splits: dict[str, Any] = {}
    for split in ("train", "test"):
        files = [
            {"path": f"{s.name}.npy", **{k: results[s.name][k] for k in ("count", "sha256")}}
            for s in shards
            if s.split == split and results[s.name]["count"]
        ]
        if files:
            splits[split] = split_entry(files, RESOLUTION)
    if "train" not in splits:
        raise DataError(f"{source}: no record could be decoded as an image")
    digest = hashlib.sha256("".join(results[s.name]["records_sha256"] for s in shards).encode())
    return {
        "dataset": data.dataset,
        "synthetic": False,
        "resolution": RESOLUTION,
        "splits": splits,
        "source": {
            "kind": "lmdb",
            "path": identity["source"],
            "entries": identity["entries"],
            "records_read": shards[-1].stop,
            "records_sha256": digest.hexdigest(),
        },
        "corrupt": {"count": len(budget.records), "records": budget.records},
    }
