"""The generic block runner on a real local Ray: coverage, retries, resume, merge errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import ray.cloudpickle

from pipeline.cluster.blocks import (
    block_ranges,
    list_shards,
    merge_blocks,
    run_blocks,
    shard_path,
)
from pipeline.cluster.testhooks import FAIL_BLOCK_ENV
from pipeline.errors import ConfigError, DataError

# Ray workers cannot import this test module: ship its task functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def squares(start: int, stop: int, shared) -> dict[str, np.ndarray]:
    """A block's result: its indices, their squares plus an offset, and an image-like array."""
    idx = np.arange(start, stop)
    return {"index": idx, "value": idx**2 + shared, "image": np.full((stop - start, 2, 2), idx[0])}


def fails_at_8(start: int, stop: int, shared) -> dict[str, np.ndarray]:
    if start == 8:
        raise ValueError("this block always fails")
    return squares(start, stop, shared)


def fingerprints(folder) -> dict:
    """(inode, mtime_ns) of every shard: unchanged means the file was not rewritten."""
    out = {}
    for start, stop in list_shards(folder):
        st = shard_path(folder, start, stop).stat()
        out[(start, stop)] = (st.st_ino, st.st_mtime_ns)
    return out


def test_block_ranges_cover_every_index_once():
    for n, size in [(0, 4), (1, 4), (8, 4), (10, 4), (10, 100)]:
        blocks = block_ranges(n, size)
        covered = [i for a, b in blocks for i in range(a, b)]
        assert covered == list(range(n))
        assert all(b - a == size for a, b in blocks[:-1])


def test_every_index_exactly_once_with_two_workers(ray_session, tmp_path):
    run = run_blocks(squares, 22, 4, tmp_path, num_workers=2, shared=7)
    assert sorted(run.computed) == block_ranges(22, 4) and run.skipped == []
    merged = merge_blocks(tmp_path, 22, 4)
    np.testing.assert_array_equal(merged["index"], np.arange(22))
    np.testing.assert_array_equal(merged["value"], np.arange(22) ** 2 + 7)
    assert merged["image"].shape == (22, 2, 2)


def test_a_block_failing_once_is_retried_and_merged_once(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv(FAIL_BLOCK_ENV, "4")
    run = run_blocks(squares, 12, 4, tmp_path, num_workers=2, shared=0, max_retries=2)
    assert (tmp_path / ".failed-once-00000004").exists()  # the hook did fire
    assert sorted(run.computed) == [(0, 4), (4, 8), (8, 12)]
    assert list_shards(tmp_path) == [(0, 4), (4, 8), (8, 12)]
    np.testing.assert_array_equal(merge_blocks(tmp_path, 12, 4)["index"], np.arange(12))


def test_without_retries_the_same_failure_stops_the_run(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv(FAIL_BLOCK_ENV, "4")
    with pytest.raises(RuntimeError, match=r"block \[4, 8\) failed"):
        run_blocks(squares, 12, 4, tmp_path, num_workers=1, shared=0, max_retries=0)


def test_interrupted_run_resumes_without_recomputing(ray_session, tmp_path):
    """A run that dies on block [8, 12) keeps the other shards; the rerun computes only it."""
    with pytest.raises(RuntimeError, match="rerun to resume"):
        run_blocks(fails_at_8, 16, 4, tmp_path, num_workers=1, shared=0, max_retries=0)
    before = fingerprints(tmp_path)
    assert sorted(before) == [(0, 4), (4, 8)]  # one worker: blocks ran in order
    run = run_blocks(squares, 16, 4, tmp_path, num_workers=2, shared=0)
    assert sorted(run.computed) == [(8, 12), (12, 16)]
    assert sorted(run.skipped) == [(0, 4), (4, 8)]
    after = fingerprints(tmp_path)
    assert all(after[block] == before[block] for block in before)  # files not rewritten
    np.testing.assert_array_equal(merge_blocks(tmp_path, 16, 4)["index"], np.arange(16))


def test_more_items_reuse_finished_blocks_and_replace_the_short_last_one(ray_session, tmp_path):
    run_blocks(squares, 10, 4, tmp_path, num_workers=2, shared=0)
    assert list_shards(tmp_path) == [(0, 4), (4, 8), (8, 10)]
    before = fingerprints(tmp_path)
    run = run_blocks(squares, 16, 4, tmp_path, num_workers=2, shared=0)
    assert sorted(run.computed) == [(8, 12), (12, 16)]
    assert list_shards(tmp_path) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert fingerprints(tmp_path)[(0, 4)] == before[(0, 4)]
    np.testing.assert_array_equal(merge_blocks(tmp_path, 16, 4)["index"], np.arange(16))


def test_ray_is_connected_only_when_there_is_work(ray_session, tmp_path):
    calls = []
    run_blocks(squares, 8, 4, tmp_path, 2, shared=0, connect=lambda: calls.append("first"))
    run_blocks(squares, 8, 4, tmp_path, 2, shared=0, connect=lambda: calls.append("again"))
    assert calls == ["first"]  # a rerun with every shard present needs no cluster


def test_a_damaged_shard_is_recomputed(ray_session, tmp_path):
    run_blocks(squares, 8, 4, tmp_path, num_workers=2, shared=0)
    shard_path(tmp_path, 4, 8).write_bytes(b"not a zip")
    run = run_blocks(squares, 8, 4, tmp_path, num_workers=2, shared=0)
    assert run.computed == [(4, 8)] and run.skipped == [(0, 4)]
    np.testing.assert_array_equal(merge_blocks(tmp_path, 8, 4)["index"], np.arange(8))


def test_merge_with_a_missing_shard_names_the_missing_indices(ray_session, tmp_path):
    run_blocks(squares, 20, 4, tmp_path, num_workers=2, shared=0)
    shard_path(tmp_path, 8, 12).unlink()
    shard_path(tmp_path, 12, 16).unlink()
    with pytest.raises(DataError, match=r"missing indices \[8, 16\)"):
        merge_blocks(tmp_path, 20, 4)


def test_merge_with_overlapping_shards_names_the_duplicates(ray_session, tmp_path):
    run_blocks(squares, 8, 4, tmp_path, num_workers=2, shared=0)
    np.savez(shard_path(tmp_path, 2, 6), **squares(2, 6, 0))
    with pytest.raises(DataError, match=r"indices \[2, 6\) in more than one shard"):
        merge_blocks(tmp_path, 8, 4)


def test_merge_of_an_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"missing indices \[0, 8\)"):
        merge_blocks(tmp_path / "nothing", 8, 4)


def test_a_task_no_node_can_run_is_a_config_error(ray_session, tmp_path):
    with pytest.raises(ConfigError, match="use_gpu: false"):
        run_blocks(squares, 4, 4, tmp_path, num_workers=1, resources={"num_gpus": 1})
