"""Exponential moving average of the weights (paper: decay 0.9999; sampling uses the EMA).

As in the official code (TensorFlow's ExponentialMovingAverage), the average starts at the
initial weights and after every optimiser step becomes
``ema <- decay * ema + (1 - decay) * theta``. The update is torch's own
``get_ema_multi_avg_fn`` (one fused lerp over all parameters, no host synchronisation).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMA:
    """A frozen copy of ``model`` that tracks its weights' moving average.

    ``ema.model`` is a plain module of the same class (what is exported as ``ema.pt``);
    ``state_dict``/``load_state_dict`` are that module's.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1] (got {decay})")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._update = get_ema_multi_avg_fn(decay)
        self._lists: tuple[nn.Module, list[nn.Parameter], list[nn.Parameter]] | None = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards ``model``'s current parameters (same architecture).

        The two parameter lists are built once per ``model`` (parameters are updated in place,
        also by ``load_state_dict``), so a step is the one fused lerp, no per-parameter Python.
        """
        if self._lists is None or self._lists[0] is not model:
            ema_params = list(self.model.parameters())
            params = list(model.parameters())
            if len(ema_params) != len(params):
                raise ValueError("EMA.update: the model's parameters do not match the average's")
            self._lists = (model, ema_params, params)
        _, ema_params, params = self._lists
        self._update(ema_params, params, None)  # under no_grad: no detach needed

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
