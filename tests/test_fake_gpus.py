"""The test-only fake-GPU switch (pipeline.cluster.devices): off, nothing changes; on, GPU work
computes on the CPU while Ray is still asked for GPUs; refused where CUDA is visible."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from repo_copy import PARAMS

from pipeline.cluster import devices
from pipeline.config import config_from_dict
from pipeline.errors import ConfigError
from pipeline.sampling.job import SamplingJob

REPO = Path(__file__).resolve().parents[1]


def paper_trainer(tmp_path: Path):
    """The paper preset's TorchTrainer (8 GPU workers), built without starting anything."""
    from pipeline.training.loop import TrainJob
    from pipeline.training.trainer import make_trainer

    cfg = config_from_dict(yaml.safe_load(PARAMS.read_text()), "paper")
    run = {"name": "r", "config_hash": "h"}
    job = TrainJob(cfg, cfg.variant("eps_fixed_mse"), str(tmp_path), str(tmp_path / "run"), run)
    return make_trainer(job)


def job(use_gpu: bool) -> SamplingJob:
    return SamplingJob({}, {}, (0.1,), "eps", "fixedlarge", "mse", None, 0, 1, use_gpu=use_gpu)


@pytest.mark.parametrize("value", [None, "0", "true"])
def test_switch_off_leaves_gpu_work_on_cuda(monkeypatch, tmp_path, value):
    """Unset (or anything but "1"): cuda devices, NCCL, and a task without CUDA stops (~3 s,
    the TorchTrainer)."""
    if value is None:
        monkeypatch.delenv(devices.FAKE_GPUS_ENV, raising=False)
    else:
        monkeypatch.setenv(devices.FAKE_GPUS_ENV, value)
    assert not devices.fake_gpus()
    assert devices.compute_device(True) == "cuda" and devices.compute_device(False) == "cpu"
    assert job(True).device_type == "cuda" and not job(True).batch_invariant
    assert devices.train_backend(True) == "nccl" and devices.train_backend(False) == "gloo"
    trainer = paper_trainer(tmp_path)
    assert trainer.backend_config.backend == "nccl"
    assert trainer.scaling_config.use_gpu
    assert trainer.scaling_config.resources_per_worker == {"CPU": 1, "GPU": 1.0}
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"sample\.use_gpu is true but this Ray worker sees"):
            devices.check_task_device(True, "sample.use_gpu")
    devices.check_task_device(False, "sample.use_gpu")  # CPU work: nothing to check


@pytest.mark.skipif(torch.cuda.is_available(), reason="the switch is refused with CUDA")
def test_switch_on_computes_on_the_cpu_and_asks_ray_for_the_same_gpus(monkeypatch, tmp_path):
    monkeypatch.setenv(devices.FAKE_GPUS_ENV, "1")
    assert devices.fake_gpus()
    assert devices.compute_device(True) == "cpu" and job(True).device_type == "cpu"
    trainer = paper_trainer(tmp_path)
    assert trainer.backend_config.backend == "gloo"  # the process group; the rest as on GPUs:
    assert trainer.scaling_config.use_gpu and trainer.scaling_config.num_workers == 8
    assert trainer.scaling_config.resources_per_worker == {"CPU": 1, "GPU": 1.0}
    # a GPU task that Ray gave no (fake) GPU stops, as a real one would
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(RuntimeError, match="gave this task no \\(fake\\) GPU"):
        devices.check_task_device(True, "eval.use_gpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    devices.check_task_device(True, "eval.use_gpu")
    from pipeline.sampling.draw import _device

    assert _device(job(True)) == torch.device("cpu")


def test_switch_is_refused_where_cuda_is_visible(monkeypatch):
    monkeypatch.setenv(devices.FAKE_GPUS_ENV, "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match=r"test-only switch .* sees a CUDA device: unset it"):
        devices.fake_gpus()
    with pytest.raises(ConfigError):
        job(True).device_type  # noqa: B018
