"""Test-only: fake GPUs, so that a CPU machine can run the GPU presets' scheduling for real.

A Ray node can declare GPUs it does not have (``ray start --num-gpus=2``, ``ray.init(num_gpus=2)``):
Ray then schedules GPU tasks and actors on it, one per declared GPU, and sets their
``CUDA_VISIBLE_DEVICES`` as on a GPU node. The pipeline's GPU work (Ray Train with
``train.use_gpu``, sample and NLL blocks with ``use_gpu``, the figure chains, the Inception
passes, the scorer of evaluation during training) would then stop, as it must on a real cluster,
because the process sees no CUDA device.

With ``DDPM_FAKE_GPUS=1`` in the environment of every process of the run (a Ray job's
``runtime_env`` ``env_vars`` reach the driver, the stages and every task and actor), that work
runs on the CPU instead, while everything Ray sees stays exactly as on a GPU cluster: the same
GPU resources requested, one task per (fake) GPU through pipeline.cluster.gputasks, Ray's
``CUDA_VISIBLE_DEVICES`` bookkeeping; only the torch device is ``cpu`` and Ray Train's process
group is gloo instead of NCCL. A GPU task that Ray gave no (fake) GPU stops, as a real one would.

It is a switch for the tests (tests/test_gpu_isolation.py, tests/test_fake_gpus.py, the two-node
proof) and benchmarks/cluster_parallel.py; never set it in a real run. A process that sees a
CUDA device refuses it (ConfigError: one ``error:`` line), so it cannot silently move a real GPU
run onto the CPU. Unset (production), nothing here changes any behaviour.
"""

from __future__ import annotations

import os

import torch

from pipeline.errors import ConfigError

ENV = "DDPM_FAKE_GPUS"


def enabled() -> bool:
    """Whether this process runs its GPU work on the CPU (``DDPM_FAKE_GPUS=1``, test-only).

    Raises ConfigError when the switch is set in a process that sees a CUDA device.
    """
    if os.environ.get(ENV) != "1":
        return False
    if torch.cuda.is_available():
        raise ConfigError(
            f"{ENV}=1 is a test-only switch for machines without GPUs (GPU work on the CPU), "
            "but this process sees a CUDA device: unset it"
        )
    return True


def compute_device(use_gpu: bool) -> str:
    """The torch device type GPU work asked for with ``use_gpu`` computes on: ``cuda``, or
    ``cpu`` (no GPU asked for, or fake GPUs)."""
    return "cuda" if use_gpu and not enabled() else "cpu"


def check_task_device(use_gpu: bool, what: str) -> None:
    """In a Ray task or actor: stop when GPU work cannot run here.

    ``what`` names the setting (``sample.use_gpu``). A real GPU run needs a visible CUDA device;
    a fake-GPU run needs a (fake) GPU that Ray gave this task (``CUDA_VISIBLE_DEVICES`` set).
    """
    if not use_gpu:
        return
    if enabled():
        if not os.environ.get("CUDA_VISIBLE_DEVICES"):
            raise RuntimeError(f"{ENV}: {what} is true but Ray gave this task no (fake) GPU")
        return
    if not torch.cuda.is_available():
        raise RuntimeError(f"{what} is true but this Ray worker sees no CUDA device")


def train_backend(use_gpu: bool) -> str:
    """Ray Train's torch process group: NCCL on GPUs, gloo on CPUs and fake GPUs."""
    return "nccl" if use_gpu and not enabled() else "gloo"
