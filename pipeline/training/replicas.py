"""Gradient clipping per virtual replica: the official run's semantics.

The official CIFAR10 run trained on a TPU v3-8: 8 replicas of 16 images of the 128-image batch.
``CrossShardOptimizer`` clipped each replica's gradient (of its loss scaled by 1/8, to
``grad_clip / 8``) before the cross-replica sum, so the update is the mean over the replicas of
each replica's gradient clipped to ``grad_clip``:

    g = 1/R * sum_r clip(g_r, grad_clip),   g_r = the gradient of replica r's mean loss.

``train.clip_replicas: R`` reproduces this whatever the number of workers W (R a multiple of W):
the global batch is cut into R consecutive slices of ``batch_size / R`` images; worker w holds
replicas w*R/W .. (w+1)*R/W - 1, runs each one's forward and backward without DDP's all-reduce,
clips it and accumulates the clipped gradients; one all-reduce then averages them over the
workers. Dropout is reseeded per replica (not per worker), so 1 worker and W workers compute the
same update. ``clip_replicas: 1`` clips the gradient of the whole batch (all-reduced by DDP).
The step that calls it is :func:`pipeline.training.loop.forward_backward`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Protocol, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipeline.training.randomness import seed_dropout

# loss(model, x_start, t, noise) -> the mean loss of those images (a scalar tensor)
LossFn = Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]


class _NoSync(Protocol):
    """A model with DDP's ``no_sync()`` (DDP itself, or torch.compile of it, which forwards it)."""

    def no_sync(self) -> contextlib.AbstractContextManager[None]: ...


class ReplicaClipping:
    """This worker's share of ``clip_replicas`` virtual replicas (see the module doc).

    Host-light: each replica's gradient comes from ``torch.autograd.grad`` (no ``.grad`` to
    zero or steal per parameter), its norm and clip are torch's ``clip_grad_norm_`` computation
    (``get_total_norm``, then one ``_foreach_mul_`` by the clamped coefficient) and it is added
    into one flat buffer with one ``_foreach_add_``: a constant number of kernel launches per
    replica on a GPU whatever the number of parameters (the backward's aside), and no Python
    loop that launches per parameter. The parameters' ``.grad`` are views of a second flat
    buffer (bound once); the step ends with one division into it and, over several workers, one
    all-reduce of it, started as soon as the last replica is clipped (the earliest the maths
    allows: a replica's clipped gradient needs its whole norm). The update is bit-identical to
    the per-parameter implementation it replaced (kept as the reference in
    tests/test_replicas.py).
    """

    def __init__(self, replicas: int, rank: int, world_size: int, grad_clip: float, seed: int):
        if replicas % world_size:
            raise ValueError(f"clip_replicas {replicas} is not a multiple of {world_size} workers")
        self.replicas, self.world_size = replicas, world_size
        self.local = replicas // world_size
        self.first = rank * self.local  # global index of this worker's first replica
        self.grad_clip, self.seed = grad_clip, seed
        self.max_norm = grad_clip if grad_clip > 0 else math.inf  # as loop.clip_gradients
        self._module: nn.Module | None = None
        self._params: list[nn.Parameter] = []
        self._views: list[Tensor] = []  # .grad of each parameter: views of self._grad
        self._sums: list[Tensor] = []  # views of self._total, parameter by parameter
        self._grad = self._total = torch.empty(0)

    def _bind(self, module: nn.Module) -> None:
        """Make ``module``'s gradients views of one flat buffer (once; again if replaced)."""
        if module is self._module and self._params and self._params[0].grad is self._views[0]:
            return
        params = [p for p in module.parameters() if p.requires_grad]
        if len({(p.dtype, p.device) for p in params}) != 1:
            raise ValueError("ReplicaClipping needs parameters of one dtype on one device")
        numel = sum(p.numel() for p in params)
        self._grad = torch.zeros(numel, dtype=params[0].dtype, device=params[0].device)
        self._total = torch.zeros_like(self._grad)
        self._views, self._sums, offset = [], [], 0
        for p in params:
            self._views.append(self._grad[offset : offset + p.numel()].view_as(p))
            self._sums.append(self._total[offset : offset + p.numel()].view_as(p))
            p.grad = self._views[-1]
            offset += p.numel()
        self._module, self._params = module, params

    def backward(
        self,
        model: nn.Module,
        module: nn.Module,
        loss_fn: LossFn,
        x_start: Tensor,
        t: Tensor,
        noise: Tensor,
        step: int,
    ) -> tuple[Tensor, Tensor]:
        """Leave the replica-clipped mean gradient in ``module``'s ``.grad``.

        ``model`` is the network to call (DDP-wrapped or not), ``module`` the same one
        unwrapped; x_start [b, C, H, W], t [b], noise [b, C, H, W] are this worker's b images.
        Returns (mean loss of this worker's images, mean of its replicas' gradient norms before
        clipping), on the device. The parameters' ``.grad`` are views of this object's buffer
        afterwards (zeroing them with ``set_to_none`` is harmless: they are bound again).
        """
        self._bind(module)
        n = x_start.shape[0] // self.local
        losses, norms = [], []
        sync = (
            cast(_NoSync, model).no_sync()
            if hasattr(model, "no_sync")
            else contextlib.nullcontext()
        )
        self._total.zero_()
        with sync:
            for i in range(self.local):
                rows = slice(i * n, (i + 1) * n)
                seed_dropout(self.seed, step, self.first + i, x_start.device)
                loss = loss_fn(model, x_start[rows], t[rows], noise[rows])
                grads = torch.autograd.grad(loss, self._params, allow_unused=True)
                sums = self._sums
                if any(g is None for g in grads):  # unused parameters: no gradient, no norm
                    sums = [s for s, g in zip(sums, grads, strict=True) if g is not None]
                    grads = tuple(g for g in grads if g is not None)
                norms.append(self._clip(grads))
                torch._foreach_add_(sums, grads)
                losses.append(loss.detach())
        torch.div(self._total, self.replicas, out=self._grad)  # the .grad views: the mean
        if self.world_size > 1:
            dist.all_reduce(self._grad)  # the sum over workers of their replicas' share
        return torch.stack(losses).mean(), torch.stack(norms).mean()

    def _clip(self, grads: tuple[Tensor, ...]) -> Tensor:
        """torch's clip_grad_norm_ on ``grads`` in place (same kernels, same bits); the norm."""
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        coef = torch.clamp(self.max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(list(grads), coef)
        return norm
