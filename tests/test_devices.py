"""Devices explicit and work balanced: Inception's device, its cache key, TF32, GPU presets."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from repo_copy import PARAMS

from pipeline.cluster import devices
from pipeline.config import config_from_dict, default_params_path, load_config
from pipeline.errors import ConfigError
from pipeline.evaluation import fidelity
from pipeline.evaluation.inception import InceptionWeights

REPO = Path(__file__).resolve().parents[1]


def gpu_presets() -> list[str]:
    raw = yaml.safe_load(default_params_path().read_text())
    return [
        name
        for name, preset in raw["presets"].items()
        if (preset.get("sample") or {}).get("use_gpu") or (preset.get("eval") or {}).get("use_gpu")
    ]


def test_there_are_gpu_presets():
    assert {"paper", "paper_lsun_church", "published"} <= set(gpu_presets())


@pytest.mark.parametrize("scale", gpu_presets())
def test_gpu_presets_name_their_device_and_balance_their_blocks(scale):
    """Even waves on 8, 16, 32 and 64 GPUs: every GPU gets the same number of blocks, all full
    but the last (no block count of equal blocks of 50,000 is a multiple of 64)."""
    cfg = load_config(scale=scale)
    assert cfg.eval.inception_device == "cuda"
    assert cfg.sample.num_workers == "auto" and cfg.eval.num_workers == "auto"
    work = [(cfg.sample.n_samples, cfg.sample.block_size)]
    if cfg.eval.nll_images:
        work.append((cfg.eval.nll_images, cfg.eval.nll_block_size))
    for n_items, block_size in work:
        blocks = math.ceil(n_items / block_size)
        for gpus in (8, 16, 32, 64):
            assert blocks % gpus == 0, (scale, n_items, block_size, gpus)  # whole waves
        last = n_items - (blocks - 1) * block_size
        assert 0 < last <= block_size, (scale, n_items, block_size)


def test_num_workers_is_a_positive_number_or_auto():
    raw = yaml.safe_load(default_params_path().read_text())
    for value, ok in ((3, True), ("auto", True), (0, False), ("many", False), (2.5, False)):
        raw["presets"]["tiny"]["sample"]["num_workers"] = value
        if ok:
            assert config_from_dict(raw, "tiny").sample.num_workers == value
        else:
            with pytest.raises(ConfigError, match=r"sample\.num_workers must be a positive number"):
                config_from_dict(raw, "tiny")


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_auto_window_follows_the_cluster_gpus_as_they_change(monkeypatch):
    """num_workers auto: GPUs Ray reports / gpus per task, re-read after every_s seconds."""
    from pipeline.cluster import blocks

    clock, total = _Clock(), {"CPU": 64.0, "GPU": 8.0}
    monkeypatch.setattr(blocks.time, "monotonic", clock)
    monkeypatch.setattr(blocks.ray, "cluster_resources", lambda: dict(total))
    window = blocks.Window("auto", {"num_cpus": 1, "num_gpus": 1}, every_s=10)
    assert window() == 8
    total["GPU"] = 16.0  # a node joins
    assert window() == 8  # not re-read yet
    clock.now = 10.0
    assert window() == 16
    half = blocks.Window("auto", {"num_cpus": 1, "num_gpus": 0.5}, every_s=10)
    assert half() == 32
    cpu_bound = blocks.Window("auto", {"num_cpus": 8, "num_gpus": 1}, every_s=10)
    assert cpu_bound() == 8  # 64 CPUs / 8
    assert blocks.Window(3, {"num_gpus": 1})() == 3  # an explicit number wins
    with pytest.raises(ValueError):
        blocks.Window("many", {})


def test_windowed_fills_a_window_that_grows(monkeypatch):
    """_windowed keeps window() tasks in flight and launches more as soon as it grows."""
    from pipeline.cluster import blocks

    in_flight: list[int] = []
    pending: list[int] = []

    def launch(block):
        pending.append(block[0])
        in_flight.append(len(pending))
        return block[0]

    def wait(refs, num_returns, timeout):
        pending.remove(refs[0])
        return [refs[0]], refs[1:]

    monkeypatch.setattr(blocks.ray, "wait", wait)
    monkeypatch.setattr(blocks.ray, "get", lambda ref: {"x": [ref]})
    monkeypatch.setattr(blocks.ray, "cancel", lambda ref: None)
    sizes = iter([2, 2, 2, 5])
    last = [2]

    def window():
        last[0] = next(sizes, last[0])
        return last[0]

    todo = [(i, i + 1) for i in range(12)]
    done = [b for b, _ in blocks._windowed(todo, launch, window, max_retries=0)]
    assert sorted(done) == todo
    assert max(in_flight[:3]) == 2 and max(in_flight) == 5


def test_auto_without_gpus_in_the_cluster_is_one_config_error(monkeypatch, tmp_path):
    from pipeline.cluster import blocks

    monkeypatch.setattr(blocks.ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.delenv(blocks.GPU_WAIT_ENV, raising=False)
    with pytest.raises(
        ConfigError, match=re.escape("needs {'num_gpus': 1} but the Ray cluster has")
    ):
        blocks.run_blocks(
            lambda a, b, c: {}, 4, 2, tmp_path, "auto", {"num_cpus": 1, "num_gpus": 1},
            connect=lambda: None,
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # no block ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_cuda_device_is_a_config_error():
    with pytest.raises(ConfigError, match="inception_device is cuda but this process sees no"):
        devices.inception_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_auto_says_when_it_falls_back_to_the_cpu(capsys):
    assert devices.inception_device("auto") == "cpu"
    assert "Inception runs on the CPU" in capsys.readouterr().err
    assert devices.inception_device("cpu") == "cpu"
    assert capsys.readouterr().err == ""  # named explicitly: nothing to say


def test_unknown_device_is_a_config_error():
    with pytest.raises(ConfigError, match="not one of auto, cpu, cuda"):
        devices.inception_device("mps")


def test_feature_cache_is_per_device(tmp_path):
    weights = InceptionWeights(path=None, identity="w123", sha256=None, stand_in=False)
    cpu, cuda = (
        fidelity.cache_dir(tmp_path, weights, "cpu"),
        fidelity.cache_dir(tmp_path, weights, "cuda"),
    )
    assert cpu != cuda and cpu.parent == cuda.parent == tmp_path
    assert cpu.name.startswith("w123-") and cpu.name.endswith("-cpu")


def test_inception_runs_without_tf32_and_restores_the_flags():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with fidelity._no_tf32():
            assert not torch.backends.cudnn.allow_tf32
            assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_a_gpu_preset_on_a_cluster_without_gpus_stops_stages_repro_before_any_stage(
    monkeypatch, tmp_path, capsys
):
    """``python -m stages.repro --scale paper`` against a Ray cluster of CPUs only: one
    ``error:`` line naming the sections that ask for GPUs, before the lease and any stage
    (Ray's connection faked: ~1 s)."""
    import ray

    import stages.repro as repro
    from pipeline.cluster import blocks

    shutil.copy(PARAMS, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.delenv(blocks.GPU_WAIT_ENV, raising=False)
    monkeypatch.setattr(repro, "check_single_node", lambda *a: None)
    monkeypatch.setattr(ray, "init", lambda *a, **k: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(blocks.ray, "cluster_resources", lambda: {"CPU": 64.0})

    def no_work(*a, **k):
        raise AssertionError("got past the checks")

    monkeypatch.setattr(repro, "job_lease", no_work)
    with pytest.raises(SystemExit) as stop:
        repro.main(["--scale", "paper"])
    assert stop.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert "presets.paper asks for GPUs (train.use_gpu, sample.use_gpu, eval.use_gpu)" in errors[0]
    assert "but the Ray cluster has {'CPU': 64.0, 'GPU': 0.0}" in errors[0]
    # with GPUs the check passes (and the run goes on to the lease)
    monkeypatch.setattr(blocks.ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 8.0})
    with pytest.raises(AssertionError, match="got past the checks"):
        repro.main(["--scale", "paper"])
