"""Test-only hooks: the environment variables through which tests make the pipeline fail, hang
or report, all read here. Never set them in a real run (tests/test_cluster_manifests.py checks
that the cluster manifests set no ``DDPM_TEST*``).

=========================  ===================================  ==================================
variable                   read by                              what it does
=========================  ===================================  ==================================
``DDPM_TEST_FAULT``        :func:`train_fault` (the train       one training worker fails, is
                           driver; forwarded to the workers)    killed, hangs or diverges once
``DDPM_TEST_FAIL_BLOCK``   :func:`fail_block` (the driver of    one sample/NLL block fails (or its
                           sample/NLL blocks)                   worker is killed) once
``DDPM_WATCHDOG_SEEN``     :func:`watchdog_seen` (the           the watchdog writes the pids it
                           watchdog process)                    has seen to this file
=========================  ===================================  ==================================

The fourth test-only switch, ``DDPM_FAKE_GPUS`` (GPU work on the CPU), is a device decision: it
is read by pipeline.cluster.devices, with the devices it changes.
"""

from __future__ import annotations

import os

TRAIN_FAULT_ENV = "DDPM_TEST_FAULT"
FAIL_BLOCK_ENV = "DDPM_TEST_FAIL_BLOCK"
WATCHDOG_SEEN_ENV = "DDPM_WATCHDOG_SEEN"


def train_fault() -> str | None:
    """``DDPM_TEST_FAULT``: a fault to inject into training, ``ACTION:RANK:STEP``, or None.

    ``fail``, ``kill``, ``hang`` or ``nan``: rank RANK raises, SIGKILLs itself, sleeps until it
    is killed, or sets one weight to NaN, before optimiser step STEP, once per run. Read by the
    train stage's driver (pipeline.training.trainer), which hands the parsed fault to every
    worker (pipeline.training.faults).
    """
    return os.environ.get(TRAIN_FAULT_ENV) or None


def fail_block() -> str:
    """``DDPM_TEST_FAIL_BLOCK``: ``<start>`` or ``kill:<start>``, or "" (no fault).

    The block of sample/NLL items starting at ``<start>`` fails once (a RuntimeError), or its
    worker process is SIGKILLed once (``kill:``); Ray's retry then reruns it. Read by the driver
    of the blocks (pipeline.cluster.blocks), which arms the block's task with a marker file.
    """
    return os.environ.get(FAIL_BLOCK_ENV, "")


def watchdog_seen() -> str | None:
    """``DDPM_WATCHDOG_SEEN``: a file path, or None. The watchdog process
    (pipeline.cluster.watchdog) rewrites it on every poll with the pids it has seen, so that a
    test can wait until it has seen the processes it must stop."""
    return os.environ.get(WATCHDOG_SEEN_ENV) or None
