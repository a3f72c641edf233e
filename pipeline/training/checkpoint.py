"""A training state <-> a checkpoint folder (what Ray Train stores and restores).

A checkpoint folder holds ``state.pt`` (a ``torch.save``d dict of tensors and plain values,
loadable with ``weights_only=True``) and ``meta.json`` (the step and run, for people)::

    step        optimiser steps done; training continues at this step
    model       the raw network's state_dict
    ema         the EMA network's state_dict
    optimizer   Adam's state_dict;  schedule: the LambdaLR's
    rng         torch, numpy and python RNG states of rank 0, and CUDA's per device when used:
                ``cuda = {"devices": [state of visible device 0, 1, ...]}``
    data        {"seed", "step"}: the data order is a pure function of these
    run         run name and config hash, checked on restore

Correctness does not depend on the RNG states (every step reseeds from (seed, step); see
:mod:`pipeline.training.randomness`), but they are restored so that code outside the step
continues as it would have. A run resumes on any worker or GPU count: each process restores the
CUDA states of the devices it has (device i gets saved device i's state; devices beyond those
saved keep theirs, saved devices beyond those present are ignored).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from pipeline.training.ema import EMA

STATE = "state.pt"
META = "meta.json"


@dataclass
class TrainState:
    """Everything a worker needs to continue training (the unwrapped network, not DDP)."""

    model: nn.Module
    ema: EMA
    optimizer: Optimizer
    schedule: LRScheduler
    step: int = 0


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values."""
    # the global RandomState is MT19937: the legacy tuple (numpy's stub picks the dict overload)
    state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    _kind, keys, pos, has_gauss, gauss = state
    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)},
        "numpy_gauss": [int(has_gauss), float(gauss)],
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = {"devices": torch.cuda.get_rng_state_all()}
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    """Set this process's RNG states from :func:`capture_rng`'s output."""
    torch.set_rng_state(rng["torch"])
    keys = rng["numpy"]["keys"].numpy().astype(np.uint32)
    has_gauss, gauss = rng["numpy_gauss"]
    np.random.set_state(("MT19937", keys, rng["numpy"]["pos"], has_gauss, gauss))
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in rng and torch.cuda.is_available():
        restore_cuda_rng(rng["cuda"])


def restore_cuda_rng(saved: dict[str, list[torch.Tensor]] | list[torch.Tensor]) -> int:
    """Set the CUDA RNG of each device this process sees from the saved per-device states.

    ``saved`` is ``{"devices": [...]}`` (or the bare list of older checkpoints). A checkpoint
    written where more GPUs were visible (W workers, or 8 GPUs a node) resumes where fewer are,
    and vice versa. Returns the number of devices restored.
    """
    states = saved["devices"] if isinstance(saved, dict) else saved
    count = min(len(states), torch.cuda.device_count())
    for index in range(count):
        torch.cuda.set_rng_state(states[index], index)
    return count


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss_next = state
    return [version, list(internal), gauss_next]


def save_checkpoint(folder: str | Path, state: TrainState, run: dict[str, Any], seed: int) -> None:
    """Write ``state`` into ``folder`` (created if needed) as state.pt and meta.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "step": state.step,
        "model": state.model.state_dict(),
        "ema": state.ema.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "schedule": state.schedule.state_dict(),
        "rng": capture_rng(),
        "data": {"seed": seed, "step": state.step},
        "run": run,
    }
    torch.save(payload, folder / STATE)
    (folder / META).write_text(json.dumps({"step": state.step, **run}, indent=2) + "\n")


def read_checkpoint(folder: str | Path) -> dict[str, Any]:
    """The payload of a checkpoint folder, on the CPU."""
    return torch.load(Path(folder) / STATE, map_location="cpu", weights_only=True)


def load_checkpoint(folder: str | Path, state: TrainState, run: dict[str, Any]) -> None:
    """Restore ``state`` (and this process's RNGs) from ``folder``, in place.

    ``run`` must match the checkpoint's run identity; a mismatch is a bug in the caller
    (checkpoints of another configuration are never offered), so it raises RuntimeError.
    """
    payload = read_checkpoint(folder)
    if payload["run"].get("config_hash") != run.get("config_hash"):
        raise RuntimeError(f"{folder}: checkpoint of run {payload['run']}, not of {run}")
    state.model.load_state_dict(payload["model"])
    state.ema.load_state_dict(payload["ema"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.schedule.load_state_dict(payload["schedule"])
    state.step = int(payload["step"])
    restore_rng(payload["rng"])
