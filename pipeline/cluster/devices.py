"""Where each kind of work computes: the torch device and the process-group backend.

Every device decision of the pipeline is made here, and nowhere else:

============================  ==================================  ==============================
work                          asks                                computes on
============================  ==================================  ==============================
Ray Train worker              :func:`train_worker_device`         Ray Train's device (its GPU
                                                                  with ``train.use_gpu``)
its process group             :func:`train_backend`               NCCL on GPUs, else gloo
its kernels                   :func:`deterministic_training`      deterministic on CUDA
sample / NLL block task,      :func:`task_device`                 cuda with ``use_gpu``, else
Fig. 6/7/8 chains             (:func:`compute_device` for keys)   cpu
evaluation during training    :func:`scorer_devices`              the sample section's device;
                                                                  Inception: eval.inception_device
Inception pass (driver)       :func:`inception_device`,           eval.inception_device (auto:
                              :func:`inception_needs_gpu_task`    cuda when visible)
Inception pass (GPU task)     :func:`inception_task_device`       cuda
============================  ==================================  ==============================

A loop in the train stage's own process (``train.backend: process``) is always on the CPU
(config.validate allows it only without ``use_gpu``).

Test-only, fake GPUs (``DDPM_FAKE_GPUS=1``; :func:`fake_gpus` is the only reader of the switch).
A Ray node can declare GPUs it does not have (``ray start --num-gpus=2``,
``ray.init(num_gpus=2)``): Ray then schedules GPU tasks and actors on it, one per declared GPU,
and sets their ``CUDA_VISIBLE_DEVICES`` as on a GPU node. The pipeline's GPU work (Ray Train with
``train.use_gpu``, sample and NLL blocks with ``use_gpu``, the figure chains, the Inception
passes, the scorer of evaluation during training) would then stop, as it must on a real cluster,
because the process sees no CUDA device. With ``DDPM_FAKE_GPUS=1`` in the environment of every
process of the run (a Ray job's ``runtime_env`` ``env_vars`` reach the driver, the stages and
every task and actor), that work runs on the CPU instead, while everything Ray sees stays exactly
as on a GPU cluster: the same GPU resources requested, one task per (fake) GPU through
pipeline.cluster.gputasks, Ray's ``CUDA_VISIBLE_DEVICES`` bookkeeping; only the torch device is
``cpu`` and Ray Train's process group is gloo instead of NCCL. A GPU task that Ray gave no (fake)
GPU stops, as a real one would. It is a switch for the tests (tests/test_gpu_isolation.py,
tests/test_fake_gpus.py, the two-node proof) and benchmarks/cluster_parallel.py; never set it in
a real run. A process that sees a CUDA device refuses it (ConfigError: one ``error:`` line), so
it cannot silently move a real GPU run onto the CPU. Unset (production), it changes nothing.
The other test-only hooks are in pipeline.cluster.testhooks.
"""

from __future__ import annotations

import os
import sys

import torch
from tqdm import tqdm

from pipeline.errors import ConfigError

FAKE_GPUS_ENV = "DDPM_FAKE_GPUS"  # test-only: "1" runs GPU work on the CPU (module docstring)


def fake_gpus() -> bool:
    """Whether this process runs its GPU work on the CPU (``DDPM_FAKE_GPUS=1``, test-only).

    Raises ConfigError when the switch is set in a process that sees a CUDA device.
    """
    if os.environ.get(FAKE_GPUS_ENV) != "1":
        return False
    if torch.cuda.is_available():
        raise ConfigError(
            f"{FAKE_GPUS_ENV}=1 is a test-only switch for machines without GPUs (GPU work on "
            "the CPU), but this process sees a CUDA device: unset it"
        )
    return True


def compute_device(use_gpu: bool) -> str:
    """The torch device type GPU work asked for with ``use_gpu`` computes on: ``cuda``, or
    ``cpu`` (no GPU asked for, or fake GPUs)."""
    return "cuda" if use_gpu and not fake_gpus() else "cpu"


def check_task_device(use_gpu: bool, what: str) -> None:
    """In a Ray task or actor: stop when GPU work cannot run here.

    ``what`` names the setting (``sample.use_gpu``). A real GPU run needs a visible CUDA device;
    a fake-GPU run needs a (fake) GPU that Ray gave this task (``CUDA_VISIBLE_DEVICES`` set).
    """
    if not use_gpu:
        return
    if fake_gpus():
        if not os.environ.get("CUDA_VISIBLE_DEVICES"):
            raise RuntimeError(
                f"{FAKE_GPUS_ENV}: {what} is true but Ray gave this task no (fake) GPU"
            )
        return
    if not torch.cuda.is_available():
        raise RuntimeError(f"{what} is true but this Ray worker sees no CUDA device")


def task_device(use_gpu: bool, what: str) -> torch.device:
    """The device of a Ray task's GPU-or-CPU work (a sample or NLL block, a figure chain):
    checked (:func:`check_task_device`), then :func:`compute_device`."""
    check_task_device(use_gpu, what)
    return torch.device(compute_device(use_gpu))


def train_backend(use_gpu: bool) -> str:
    """Ray Train's torch process group: NCCL on GPUs, gloo on CPUs and fake GPUs."""
    return "nccl" if use_gpu and not fake_gpus() else "gloo"


def train_worker_device() -> torch.device:
    """In a Ray Train worker: its device (Ray Train's: the worker's GPU with ``train.use_gpu``,
    else cpu); cpu under fake GPUs, once Ray gave the worker a (fake) GPU."""
    if fake_gpus():
        check_task_device(True, "train.use_gpu")
        return torch.device("cpu")
    import ray.train.torch

    return ray.train.torch.get_device()


CUBLAS_WORKSPACE_CONFIG = ":4096:8"  # one of the two settings deterministic cuBLAS accepts


def deterministic_training(device_type: str) -> None:
    """In a training worker on ``device_type`` (cpu | cuda): deterministic kernels on CUDA.

    cuDNN's deterministic algorithms without benchmarking (the kernel chosen by timing would
    change the bits), ``torch.use_deterministic_algorithms(True)`` (every other op: a
    deterministic kernel or a RuntimeError, never a silent atomic sum) and the cuBLAS workspace
    setting it requires, ``CUBLAS_WORKSPACE_CONFIG`` (kept when already ``:4096:8`` or
    ``:16:8``): torch reads it when it creates this process's first cuBLAS workspace, so this
    runs before the worker's first matmul. The precision flags (TF32) stay
    :func:`pipeline.model.precision.set_matmul_precision`'s, set explicitly beside it. On the
    CPU nothing changes: its kernels already repeat for a fixed thread count, and the global
    switch would only add work (it fills every ``torch.empty`` with NaN).
    """
    if device_type != "cuda":
        return
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (":4096:8", ":16:8"):
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


def scorer_devices(use_gpu: bool, inception: str) -> tuple[torch.device, str]:
    """Evaluation during training, in its Ray task: (the sampler's device, the Inception pass's
    ``eval.inception_device``). The sampler's: cuda with ``sample.use_gpu`` (checked as a
    sample block's), else cpu; the Inception pass's: ``inception``, or cpu under fake GPUs."""
    device = task_device(use_gpu, "sample.use_gpu")
    return device, "cpu" if fake_gpus() else inception


def inception_device(setting: str) -> str:
    """``eval.inception_device`` as the device an Inception pass runs on: ``cpu`` or ``cuda``.

    ``cuda`` without a visible CUDA device is a ConfigError (never a silent CPU fall-back);
    ``auto`` takes cuda when visible and says so on stderr when it falls back to the CPU.
    """
    if setting not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"eval.inception_device: {setting!r} is not one of auto, cpu, cuda")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "eval.inception_device is cuda but this process sees no CUDA device "
            "(run the stage on a GPU node, or set eval.inception_device: cpu)"
        )
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
        if setting == "cpu":
            tqdm.write(
                "Inception runs on the CPU (eval.inception_device: auto, no CUDA device "
                "visible); set eval.inception_device: cuda to require a GPU",
                file=sys.stderr,
            )
    return setting


def inception_needs_gpu_task(setting: str) -> bool:
    """Whether an Inception pass on ``setting`` (eval.inception_device) must run as a Ray GPU
    task: ``cuda`` asked for and no CUDA device visible in this process (a CPU driver)."""
    return setting == "cuda" and not torch.cuda.is_available()


def inception_task_device() -> str:
    """The device of an Inception pass submitted as a GPU task: cuda; cpu under fake GPUs, once
    Ray gave the task a (fake) GPU."""
    if fake_gpus():
        check_task_device(True, "eval.inception_device: cuda")
        return "cpu"
    return "cuda"
