"""Deterministic GPU kernels in every training worker (pipeline.cluster.devices).

The helper is tested directly (no GPU here): on cuda it sets cuDNN's deterministic algorithms,
turns benchmarking off, turns torch's deterministic algorithms on and sets the cuBLAS workspace
variable they need; on the CPU it changes nothing; it leaves the TF32 flags to
set_matmul_precision. run_worker calls it with its device before the precision flags. Torch's
global state is restored after each test.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.cluster import devices

VAR = "CUBLAS_WORKSPACE_CONFIG"


def _flags() -> tuple[bool, ...]:
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    return (
        cudnn.deterministic,
        cudnn.benchmark,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn.allow_tf32,
        matmul.allow_tf32,
    )


@pytest.fixture
def nondeterministic(monkeypatch):
    """Torch's flags at their non-deterministic settings, TF32 on; all restored afterwards."""
    saved = _flags()
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    cudnn.deterministic, cudnn.benchmark = False, True
    torch.use_deterministic_algorithms(False)
    cudnn.allow_tf32 = matmul.allow_tf32 = True
    monkeypatch.delenv(VAR, raising=False)
    yield
    cudnn.deterministic, cudnn.benchmark = saved[0], saved[1]
    torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
    cudnn.allow_tf32, matmul.allow_tf32 = saved[4], saved[5]


def test_a_cuda_training_worker_asks_for_deterministic_kernels(nondeterministic, monkeypatch):
    import os

    devices.deterministic_training("cuda")
    assert _flags() == (True, False, True, False, True, True)  # TF32: set_matmul_precision's
    assert os.environ[VAR] == ":4096:8"
    monkeypatch.setenv(VAR, ":16:8")  # the other setting cuBLAS accepts is kept
    devices.deterministic_training("cuda")
    assert os.environ[VAR] == ":16:8"
    monkeypatch.setenv(VAR, ":0:0")  # one deterministic cuBLAS refuses is replaced
    devices.deterministic_training("cuda")
    assert os.environ[VAR] == ":4096:8"


def test_a_cpu_training_worker_changes_nothing(nondeterministic):
    import os

    before = _flags()
    devices.deterministic_training("cpu")
    assert _flags() == before == (False, True, False, False, True, True)
    assert VAR not in os.environ


def test_run_worker_asks_for_them_before_the_precision_flags(tmp_path, monkeypatch):
    """One step of the tiny preset in process: the helper called once, with the worker's
    device, before set_matmul_precision (the precision flags stay explicit)."""
    from train_project import VARIANT, make_project, tiny_config

    from pipeline.training import loop
    from pipeline.training.session import LocalSession

    calls: list[tuple[str, str]] = []
    precision = loop.set_matmul_precision

    def record_deterministic(device_type):
        calls.append(("deterministic", device_type))

    monkeypatch.setattr(loop.devices, "deterministic_training", record_deterministic)

    def record_precision(value, device_type):
        calls.append(("precision", device_type))
        precision(value, device_type)

    monkeypatch.setattr(loop, "set_matmul_precision", record_precision)
    make_project(tmp_path)
    cfg = tiny_config(num_workers=1, steps=1)
    job = loop.TrainJob(cfg, cfg.variant(VARIANT), str(tmp_path / "data" / cfg.scale),
                        str(tmp_path), {"name": "d", "config_hash": "0"})  # fmt: skip
    assert loop.run_worker(job, LocalSession(tmp_path / "ck"))["status"] == "finished"
    assert calls == [("deterministic", "cpu"), ("precision", "cpu")]
