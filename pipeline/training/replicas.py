"""Gradient clipping per virtual replica and the kl loss in bits: the official run's semantics.

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

The kl loss (the bound's term) was trained in bits, ``meanflat(kl) / log(2)``:
:func:`loss_scale` is the factor applied to the per-image loss (``train.kl_units``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipeline.config import Config, Variant
from pipeline.training.optim import clip_gradients
from pipeline.training.randomness import seed_dropout

# loss(model, x_start, t, noise) -> the mean loss of those images (a scalar tensor)
LossFn = Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]


def loss_scale(cfg: Config, variant: Variant) -> float:
    """The factor on the per-image loss: 1/ln 2 for a kl loss trained in bits, else 1."""
    bits = variant.loss_type == "kl" and cfg.train.kl_units == "bits"
    return 1.0 / math.log(2.0) if bits else 1.0


class ReplicaClipping:
    """This worker's share of ``clip_replicas`` virtual replicas (see the module doc)."""

    def __init__(self, replicas: int, rank: int, world_size: int, grad_clip: float, seed: int):
        if replicas % world_size:
            raise ValueError(f"clip_replicas {replicas} is not a multiple of {world_size} workers")
        self.replicas, self.world_size = replicas, world_size
        self.local = replicas // world_size
        self.first = rank * self.local  # global index of this worker's first replica
        self.grad_clip, self.seed = grad_clip, seed

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
        clipping), on the device.
        """
        params = [p for p in module.parameters() if p.requires_grad]
        total = [torch.zeros_like(p) for p in params]
        n = x_start.shape[0] // self.local
        losses, norms = [], []
        sync = model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()
        with sync:
            for i in range(self.local):
                rows = slice(i * n, (i + 1) * n)
                seed_dropout(self.seed, step, self.first + i)
                loss = loss_fn(model, x_start[rows], t[rows], noise[rows])
                loss.backward()
                norms.append(clip_gradients(module, self.grad_clip))
                for acc, p in zip(total, params, strict=True):
                    if p.grad is not None:
                        acc.add_(p.grad)
                        p.grad = None
                losses.append(loss.detach())
        flat = torch.cat([g.reshape(-1) for g in total]) / self.replicas
        if self.world_size > 1:
            dist.all_reduce(flat)  # the sum over workers of their replicas' share of the mean
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        return torch.stack(losses).mean(), torch.stack(norms).mean()
