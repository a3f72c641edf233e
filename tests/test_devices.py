"""Devices explicit and work balanced: Inception's device, its cache key, TF32, GPU presets."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from pipeline.config import default_params_path, load_config
from pipeline.errors import ConfigError
from pipeline.evaluation import fidelity
from pipeline.evaluation.inception import InceptionWeights


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
    cfg = load_config(scale=scale)
    assert cfg.eval.inception_device == "cuda"
    work = [(cfg.sample.n_samples, cfg.sample.block_size, cfg.sample.num_workers)]
    if cfg.eval.nll_images:
        work.append((cfg.eval.nll_images, cfg.eval.nll_block_size, cfg.eval.num_workers))
    for n_items, block_size, workers in work:
        blocks = math.ceil(n_items / block_size)
        assert n_items % block_size == 0, (scale, n_items, block_size)  # equal blocks
        assert blocks % workers == 0, (scale, blocks, workers)  # the same number per GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_cuda_device_is_a_config_error():
    with pytest.raises(ConfigError, match="inception_device is cuda but this process sees no"):
        fidelity.resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_auto_says_when_it_falls_back_to_the_cpu(capsys):
    assert fidelity.resolve_device("auto") == "cpu"
    assert "Inception runs on the CPU" in capsys.readouterr().err
    assert fidelity.resolve_device("cpu") == "cpu"
    assert capsys.readouterr().err == ""  # named explicitly: nothing to say


def test_unknown_device_is_a_config_error():
    with pytest.raises(ConfigError, match="not one of auto, cpu, cuda"):
        fidelity.resolve_device("mps")


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
