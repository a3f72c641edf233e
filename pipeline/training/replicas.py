"""Gradient clipping per virtual replica: the official run's semantics.

The official CIFAR10 run trained on a TPU v3-8: 8 replicas of 16 images of the 128-image batch.
``CrossShardOptimizer`` clipped each replica's gradient (of its loss scaled by 1/8, to
``grad_clip / 8``) before the cross-replica sum, so the update is the mean over the replicas of
each replica's gradient clipped to ``grad_clip``:

    g = 1/R * sum_r clip(g_r, grad_clip),   g_r = the gradient of replica r's mean loss.

``train.clip_replicas: R`` reproduces this whatever the number of workers W (R a multiple of W):
the global batch is cut into R consecutive slices of ``batch_size / R`` images; worker w holds
replicas w*R/W .. (w+1)*R/W - 1, runs each one's forward and backward without DDP's all-reduce,
clips it and accumulates the clipped gradients; one all-reduce then sums them over the
workers. Dropout is reseeded per replica (not per worker), so 1 worker and W workers compute the
same update. ``clip_replicas: 1`` clips the gradient of the whole batch (all-reduced by DDP).
The step that calls it is :func:`pipeline.training.loop.forward_backward`.

**Exact reduction: the same bits whatever W.** A float sum depends on its order, and the order
depends on W (each worker sums its replicas, then the all-reduce sums the workers). So each
clipped replica gradient is turned into fixed-point integers, ``round(g * 2^k)`` in int64, the
integers are summed (locally and by the all-reduce: integer addition is exact, so any order
gives the same sum) and the sum is turned back into floats once: ``sum / (R * 2^k)``. The update
is a function of the R replicas alone: W = 1, 2, 4, ... and a run resumed on another W give the
same bits. The scale (:func:`fixed_point_exponent`): a clipped replica gradient has L2 norm <=
``grad_clip``, so every element is <= ``grad_clip`` and a sum of R of them <= R * grad_clip;
k is the largest integer with R * grad_clip * 2^k < 2^62 (int64 holds < 2^63: a factor 2 to
spare for fp32's rounding in the clip and the +-1/2 of each rounding). The paper's R = 8,
grad_clip = 1: k = 58, a resolution of 2^-58 = 3.5e-18. An fp32 element |g| >= 2^(23-k) (2.9e-11
there) keeps every bit (its ulp is >= 2^-k); a smaller one keeps its value to 2^-(k+1) absolute,
and one below 2^-(k+1) (1.7e-18) becomes 0: far below anything Adam's eps (1e-8) lets move a
weight. The old fp32 sum rounded each of its R - 1 additions to half an ulp of the partial sum
(2^-24 relative: 6e-11 on an element of 1e-3), more than this scheme ever loses. Rounding is
deterministic: the clip coefficient times 2^k is exact in fp32 (a power of two moves the
exponent only, no overflow below 2^62), so ``g * (coef * 2^k)`` is fp32's one rounding of the
clipped value scaled exactly, ``torch.round`` rounds half to even and the integer-valued float
(< 2^62) converts to int64 exactly: no double rounding. The sum is divided by R * 2^k in
float64 (one rounding) and rounded to fp32 (a second: a fixed function of the integer sum).
No clip (``grad_clip <= 0``) leaves no bound, so no scale: per-replica clipping without a clip is
the whole batch's mean gradient, and the config refuses it (use ``clip_replicas: 1``), as it
refuses R * grad_clip >= 2^22 (k < 40: a clip that never bites would coarsen the sum). A
non-finite replica gradient has no integer value: that step's update is meaningless, as the
NaN update was before; its norm is non-finite, so the loop stops at the next log step before
anything is saved (the divergence stop). Cost: per replica three more flat kernels (copy into
the flat buffer, round, int64 add) and the all-reduce moves int64: 8 bytes a parameter instead
of 4.
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


FIXED_POINT_BITS = 62  # |sum of R clipped replicas| * 2^k < 2^62: int64 with a factor 2 spare
# k >= 40 (R * grad_clip < 2^22): a resolution of at most 2^-40 = 9e-13; k <= 126: 2^k is an fp32
EXPONENTS = range(40, 127)


def fixed_point_exponent(replicas: int, grad_clip: float) -> int:
    """The largest k with ``replicas * grad_clip * 2^k < 2^62`` (the module doc's argument).

    Raises ValueError without a finite positive ``grad_clip`` (no clip: no bound on a sum) or
    when k falls outside ``EXPONENTS``: a clip so large that it never bites (1e12 "to switch it
    off") would leave a resolution of ~2e-6 and erase the small gradients; one below 2^-65 / R
    has no fp32 scale. pipeline.config checks the same bounds.
    """
    k = -1
    if grad_clip > 0 and math.isfinite(grad_clip):
        _, e = math.frexp(replicas * grad_clip)  # replicas * grad_clip = f * 2^e, 0.5 <= f < 1
        k = FIXED_POINT_BITS - e
    if k not in EXPONENTS:
        raise ValueError(
            f"clip_replicas {replicas} needs 2^-65 <= clip_replicas x grad_clip < 2^22 (got "
            f"grad_clip {grad_clip}): the exact sum's fixed-point scale comes from the clip"
        )
    return k


class ReplicaClipping:
    """This worker's share of ``clip_replicas`` virtual replicas (see the module doc).

    Host-light: each replica's gradient comes from ``torch.autograd.grad`` (no ``.grad`` to
    zero or steal per parameter), its norm and clip are torch's ``clip_grad_norm_`` computation
    (``get_total_norm``, then one ``_foreach_mul_`` by the clamped coefficient, times 2^k);
    one ``_foreach_copy_`` puts it into one flat fp32 buffer, rounded there and added into the
    flat int64 sum: a constant number of kernel launches per replica on a GPU whatever the
    number of parameters (the backward's aside), and no Python loop that launches per
    parameter. The parameters' ``.grad`` are views of the flat fp32 buffer (bound once; free
    while the replicas run: autograd.grad does not touch ``.grad``); the step ends, over several
    workers, with one all-reduce of the int64 sum, started as soon as the last replica is added
    (the earliest the maths allows: a replica's clipped gradient needs its whole norm), and one
    division into the ``.grad`` views.
    """

    def __init__(self, replicas: int, rank: int, world_size: int, grad_clip: float, seed: int):
        if replicas % world_size:
            raise ValueError(f"clip_replicas {replicas} is not a multiple of {world_size} workers")
        self.replicas, self.world_size = replicas, world_size
        self.local = replicas // world_size
        self.first = rank * self.local  # global index of this worker's first replica
        self.grad_clip, self.seed = grad_clip, seed
        self.exponent = fixed_point_exponent(replicas, grad_clip)  # k: units of 2^-k
        self.scale = math.ldexp(1.0, self.exponent)  # 2^k, exact in fp32 and float64
        self._module: nn.Module | None = None
        self._params: list[nn.Parameter] = []
        self._views: list[Tensor] = []  # .grad of each parameter: views of self._grad
        self._grad = self._fixed = self._denominator = torch.empty(0)

    def _bind(self, module: nn.Module) -> None:
        """Make ``module``'s gradients views of one flat buffer (once; again if replaced)."""
        if module is self._module and self._params and self._params[0].grad is self._views[0]:
            return
        params = [p for p in module.parameters() if p.requires_grad]
        if len({(p.dtype, p.device) for p in params}) != 1:
            raise ValueError("ReplicaClipping needs parameters of one dtype on one device")
        numel, device = sum(p.numel() for p in params), params[0].device
        self._grad = torch.zeros(numel, dtype=params[0].dtype, device=device)
        self._fixed = torch.zeros(numel, dtype=torch.int64, device=device)  # the sum, x 2^k
        # a 0-dim float64 divisor: int64 / it computes in float64 (one rounding), then fp32
        self._denominator = torch.tensor(self.replicas * self.scale, dtype=torch.float64,
                                         device=device)  # fmt: skip
        self._views, offset = [], 0
        for p in params:
            self._views.append(self._grad[offset : offset + p.numel()].view_as(p))
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
        with sync:
            for i in range(self.local):
                rows = slice(i * n, (i + 1) * n)
                seed_dropout(self.seed, step, self.first + i, x_start.device)
                loss = loss_fn(model, x_start[rows], t[rows], noise[rows])
                grads = torch.autograd.grad(loss, self._params, allow_unused=True)
                views = self._views
                if any(g is None for g in grads):  # unused parameters: no gradient, no norm
                    views = [v for v, g in zip(views, grads, strict=True) if g is not None]
                    grads = tuple(g for g in grads if g is not None)
                norms.append(self._add(i, grads, views))
                losses.append(loss.detach())
        self._reduce()
        return torch.stack(losses).mean(), torch.stack(norms).mean()

    def _add(self, i: int, grads: tuple[Tensor, ...], views: list[Tensor]) -> Tensor:
        """Clip local replica ``i``'s gradient (torch's clip_grad_norm_ maths) and add it to the
        int64 sum in units of 2^-k; returns its norm before clipping."""
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        coef = torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0) * self.scale  # exact x 2^k
        torch._foreach_mul_(list(grads), coef)  # the clipped gradient x 2^k
        if len(views) < len(self._views):
            self._grad.zero_()  # the unused parameters' slots
        torch._foreach_copy_(views, grads)
        self._grad.round_()  # half to even: integers, |.| < 2^62
        if i == 0:
            self._fixed.copy_(self._grad)  # exact: integer-valued floats
        else:
            self._fixed.add_(self._grad.to(torch.int64))
        return norm

    def _reduce(self) -> None:
        """The sum over every worker's replicas (exact), then the mean into the ``.grad`` views."""
        if self.world_size > 1:
            dist.all_reduce(self._fixed)  # int64 SUM: the same in any order
        torch.div(self._fixed, self._denominator, out=self._grad)  # / (R 2^k) in float64
