"""Where a training loop runs: a Ray Train worker, or this process (tests, debugging).

The loop asks its session for its rank, world size and device, wraps its network with it,
reads the checkpoint to resume from, and reports checkpoints to it. :class:`RaySession` maps
these onto Ray Train (``get_context``, ``prepare_model`` (DistributedDataParallel),
``get_checkpoint``, ``report``); :class:`LocalSession` is one process keeping its checkpoints
in a folder, with the same semantics.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from pipeline.cluster import devices


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model to train (DDP across the workers); ``model`` stays the unwrapped one."""

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """A local folder with the checkpoint to resume from, or None for a fresh start."""

    def report(self, metrics: dict[str, Any], checkpoint: Path | None, name: str) -> None:
        """Hand over a checkpoint folder (rank 0; others pass None). Every rank must call it."""


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint after ``step`` optimiser steps."""
    return f"checkpoint_{step:09d}"


class RaySession:
    """Inside ``ray.train.torch.TorchTrainer``'s ``train_loop_per_worker``."""

    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = devices.train_worker_device()

    def wrap(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(
            model, move_to_device=self.device, parallel_strategy="ddp"
        )

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def report(self, metrics: dict[str, Any], checkpoint: Path | None, name: str) -> None:
        import ray.train

        if checkpoint is None:
            ray.train.report(metrics)
        else:
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(checkpoint),
                checkpoint_dir_name=name,
            )


class LocalSession:
    """One process on the CPU (``train.backend: process`` has no use_gpu), checkpoints in
    ``folder/<name>`` (the last ``keep`` kept)."""

    def __init__(self, folder: str | Path, keep: int = 2):
        self.rank, self.world_size, self.device = 0, 1, torch.device("cpu")
        self.folder, self.keep = Path(folder), keep
        self.reports: list[dict[str, Any]] = []

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = sorted(self.folder.glob("checkpoint_*"))
        yield found[-1] if found else None

    def report(self, metrics: dict[str, Any], checkpoint: Path | None, name: str) -> None:
        self.reports.append(dict(metrics))
        if checkpoint is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.folder) as tmp:
            shutil.copytree(checkpoint, Path(tmp) / name)
            (Path(tmp) / name).rename(self.folder / name)
        for old in sorted(self.folder.glob("checkpoint_*"))[: -self.keep]:
            shutil.rmtree(old)
