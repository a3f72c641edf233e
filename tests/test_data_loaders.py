"""Loaders: memory-mapped splits over shards, the paper's scaling, training and eval batches."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import (
    TrainBatches,
    eval_batches,
    open_split,
    read_manifest,
    to_model_input,
    to_uint8,
)
from pipeline.data.manifest import file_entry, split_entry, write_manifest
from pipeline.errors import ConfigError, DataError

R = 4
SHARDS = (5, 7, 3)


@pytest.fixture
def prepared(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A prepared folder: train in three shards (5, 7, 3 images), test in one file (6)."""
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (sum(SHARDS), R, R, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (6, R, R, 3), dtype=np.uint8)
    files, start = [], 0
    for i, n in enumerate(SHARDS):
        np.save(tmp_path / f"train-{i:05d}.npy", train[start : start + n])
        files.append(file_entry(tmp_path / f"train-{i:05d}.npy", tmp_path, n))
        start += n
    np.save(tmp_path / "test.npy", test)
    splits = {
        "train": split_entry(files, R),
        "test": split_entry([file_entry(tmp_path / "test.npy", tmp_path, 6)], R),
    }
    write_manifest(tmp_path, {"dataset": "x", "synthetic": True, "resolution": R, "splits": splits})
    return tmp_path, train, test


def test_to_model_input_is_the_papers_scaling_exactly():
    k = (np.arange(2 * 16 * 16 * 3) % 256).astype(np.uint8).reshape(2, 16, 16, 3)
    expected = (2.0 * k.astype(np.float64) / 255.0 - 1.0).astype(np.float32)
    x = to_model_input(k)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 16, 16)
    np.testing.assert_array_equal(x.numpy(), expected.transpose(0, 3, 1, 2))
    assert x.min() == -1.0 and x.max() == 1.0


def test_to_uint8_inverts_and_clips():
    k = np.random.default_rng(1).integers(0, 256, (3, 5, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_uint8(to_model_input(k)), k)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 1.5
    expected = np.round((np.clip(x.double().numpy(), -1, 1) + 1) * 127.5).astype(np.uint8)
    np.testing.assert_array_equal(to_uint8(x), expected.transpose(0, 2, 3, 1))


def test_image_set_indexes_across_shards(prepared):
    data_dir, train, _ = prepared
    images = open_split(data_dir, "train")
    assert len(images) == 15 and images.shape == (15, R, R, 3)
    np.testing.assert_array_equal(images[6], train[6])
    np.testing.assert_array_equal(images[-1], train[14])
    np.testing.assert_array_equal(images[3:13:2], train[3:13:2])
    np.testing.assert_array_equal(images[:], train)
    order = np.array([14, 0, 6, 6, 5, 4, 12, 11])
    np.testing.assert_array_equal(images[order], train[order])
    np.testing.assert_array_equal(images[[-1, -15]], train[[14, 0]])
    assert images[np.array([], dtype=np.int64)].shape == (0, R, R, 3)
    with pytest.raises(IndexError):
        images[15]
    with pytest.raises(IndexError):
        images[[0, -16]]
    with pytest.raises(TypeError):
        images[np.array([0.5])]


def test_image_set_is_memory_mapped_and_returns_copies(prepared):
    images = open_split(prepared[0], "train")
    assert all(isinstance(a, np.memmap) for a in images._arrays)
    batch = images[[1, 2]]
    assert not isinstance(batch, np.memmap) and batch.flags.writeable
    batch[:] = 0
    np.testing.assert_array_equal(images[[1, 2]], prepared[1][[1, 2]])


def test_image_set_pickles_as_its_path(prepared):
    images = open_split(prepared[0], "test")
    blob = pickle.dumps(images)
    assert len(blob) < 1000  # the path, not the pixels
    np.testing.assert_array_equal(pickle.loads(blob)[:], prepared[2])


def test_missing_split_file_and_manifest(prepared, tmp_path_factory):
    data_dir = prepared[0]
    with pytest.raises(DataError, match=r"no 'val' split .*it has: train, test"):
        open_split(data_dir, "val")
    with pytest.raises(DataError, match=r"no prepared data here \(run `dvc repro prepare`"):
        read_manifest(tmp_path_factory.mktemp("empty"))
    (data_dir / "train-00001.npy").unlink()
    with pytest.raises(DataError, match=r"train-00001\.npy: missing"):
        open_split(data_dir, "train")
    (data_dir / "test.npy").write_bytes((data_dir / "test.npy").read_bytes()[:100])
    with pytest.raises(DataError, match=r"test\.npy: unreadable array"):
        open_split(data_dir, "test")
    (data_dir / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"unreadable manifest"):
        read_manifest(data_dir)


def test_file_not_matching_the_manifest(prepared):
    data_dir = prepared[0]
    manifest = json.loads((data_dir / "manifest.json").read_text())
    manifest["splits"]["test"]["files"][0]["count"] = 7
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"holds uint8 \(6, 4, 4, 3\), the manifest says"):
        open_split(data_dir, "test")


def stream(seed: int, n: int, epochs: int) -> np.ndarray:
    """The contract's stream written out: epoch permutations from default_rng([seed, epoch])."""
    return np.concatenate([np.random.default_rng([seed, e]).permutation(n) for e in range(epochs)])


@pytest.mark.parametrize("global_batch", [4, 40])
def test_batches_follow_the_epoch_stream_across_epoch_boundaries(prepared, global_batch):
    images = open_split(prepared[0], "train")  # N = 15
    batches = TrainBatches(images, global_batch, seed=3, random_flip=False)
    b = global_batch
    expected = stream(3, 15, epochs=12 * b // 15 + 1)
    for step in range(12):  # b = 4: batches 3, 7, 11 span two epochs; b = 40: every one spans 3+
        indices, flips = batches.indices(step)
        np.testing.assert_array_equal(indices, expected[b * step : b * step + b])
        assert not flips.any()
        np.testing.assert_array_equal(batches.batch(step), to_model_input(prepared[1][indices]))
    assert sorted(expected[:15]) == list(range(15))


@pytest.mark.parametrize("world_size", [2, 4])
def test_workers_see_the_single_worker_batch(prepared, world_size):
    images = open_split(prepared[0], "train")
    single = TrainBatches(images, global_batch=8, seed=5)
    ranks = [TrainBatches(images, 8, rank, world_size, seed=5) for rank in range(world_size)]
    for step in (0, 1, 2, 7, 100):
        parts = [r.batch(step) for r in ranks]
        assert parts[0].shape == (8 // world_size, 3, R, R)
        torch.testing.assert_close(torch.cat(parts), single.batch(step), rtol=0, atol=0)


def test_batch_is_a_pure_function_of_the_step(prepared):
    images = open_split(prepared[0], "train")
    a = TrainBatches(images, 6, seed=1)
    first = a.batch(9)
    a.batch(0), a.batch(40)
    torch.testing.assert_close(a.batch(9), first, rtol=0, atol=0)
    torch.testing.assert_close(TrainBatches(images, 6, seed=1).batch(9), first, rtol=0, atol=0)
    assert not torch.equal(TrainBatches(images, 6, seed=2).batch(9), first)


def test_flips_are_horizontal_and_about_half(prepared):
    images = open_split(prepared[0], "train")
    batches = TrainBatches(images, 15, seed=0)
    flipped = 0
    for step in range(40):
        indices, flips = batches.indices(step)
        x = batches.batch(step)
        plain = to_model_input(prepared[1][indices])
        torch.testing.assert_close(x[flips], plain[flips].flip(-1), rtol=0, atol=0)
        torch.testing.assert_close(x[~flips], plain[~flips], rtol=0, atol=0)
        flipped += int(flips.sum())
    assert 0.4 < flipped / 600 < 0.6


def test_batch_validation(prepared):
    images = open_split(prepared[0], "train")
    with pytest.raises(ConfigError, match=r"global batch \(6\) must be a positive multiple"):
        TrainBatches(images, 6, 0, 4)
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, 2\)"):
        TrainBatches(images, 6, 2, 2)


def test_eval_batches_walk_the_split_in_order(prepared):
    images = open_split(prepared[0], "train")
    seen = list(eval_batches(images, 4, start=2, stop=13))
    assert [list(i) for i, _ in seen] == [[2, 3, 4, 5], [6, 7, 8, 9], [10, 11, 12]]
    got = torch.cat([x for _, x in seen])
    torch.testing.assert_close(got, to_model_input(prepared[1][2:13]), rtol=0, atol=0)
    assert sum(len(i) for i, _ in eval_batches(images, 64)) == 15


@pytest.mark.slow  # ~18 s here (Ray start, torch import in two workers); pickling is tested above
def test_ray_workers_rebuild_the_single_worker_batch(prepared, ray_session):
    """An ImageSet travels to Ray workers as its path; their slices make the global batch."""
    ray = ray_session  # the session's shared local instance (conftest)
    images = open_split(prepared[0], "train")
    rank_batch = ray.remote(lambda images, rank: TrainBatches(images, 8, rank, 2, 5).batch(3))
    parts = ray.get([rank_batch.remote(images, rank) for rank in range(2)])
    single = TrainBatches(images, 8, seed=5).batch(3)
    torch.testing.assert_close(torch.cat(parts), single, rtol=0, atol=0)
