"""The paper's optimiser: Adam, linear learning-rate warmup, gradient-norm clipping.

Official code (``get_warmed_up_lr``): lr(s) = lr * min(s / warmup, 1) at optimiser step s,
counting from 0, so the first update uses lr 0 (Adam's moments still see its gradient).
Adam keeps torch's defaults (betas 0.9, 0.999; eps 1e-8), as the official code kept
TensorFlow's (eps 1e-8 there too).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from pipeline.config import TrainConfig


def warmup_factor(step: int, warmup: int) -> float:
    """The learning-rate multiplier at optimiser step ``step``: min(step / warmup, 1)."""
    return 1.0 if warmup <= 0 else min(step / warmup, 1.0)


def make_optimizer(model: nn.Module, train: TrainConfig) -> tuple[torch.optim.Adam, LambdaLR]:
    """Adam at ``train.lr`` with a LambdaLR scheduler for the warmup (step it once per update)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr)
    schedule = LambdaLR(optimizer, functools.partial(warmup_factor, warmup=train.warmup))
    return optimizer, schedule


def clip_gradients(model: nn.Module | Iterable[Tensor], max_norm: float) -> Tensor:
    """Clip the global gradient norm to ``max_norm`` (<= 0: no clipping); the norm before it.

    ``model`` is a module or its parameters. The norm stays on the device (no
    synchronisation); it is non-finite when any gradient is.
    """
    limit = max_norm if max_norm > 0 else math.inf
    params = model.parameters() if isinstance(model, nn.Module) else model
    return torch.nn.utils.clip_grad_norm_(params, limit)
