"""One training step, top to bottom: the per-worker loop of Algorithm 1. Start reading here.

Every Ray Train worker (and the train stage's own process with ``train.backend: process``) runs
:func:`run_worker`: it builds the network, its EMA, Adam and the warmup schedule from the config,
restores the latest checkpoint if there is one, and from that step s on repeats:

1. **batch** (:class:`StepInputs`): this rank's slice of global batch s
   (:class:`pipeline.data.TrainBatches`), its slice of the global batch's t and noise drawn on
   the device from (seed, s), dropout reseeded from (seed, s, rank)
   (:mod:`pipeline.training.randomness`), so a step does not depend on the RNGs' history;
2. **forward and backward** (:func:`forward_backward`): the loss of Algorithm 1 (its kl form in
   bits with ``train.kl_units: bits``), backward, DDP averaging the gradient over the ranks, the
   gradient norm clipped to ``grad_clip``; with ``train.clip_replicas`` > 1 each virtual
   replica's gradient is clipped before the average instead, as the official TPU run did
   (:mod:`pipeline.training.replicas`);
3. **optimise** (:func:`optimize`): Adam at the warmed-up learning rate, lr * min(s / warmup, 1)
   (:func:`make_optimizer`), then the EMA of the weights (:mod:`pipeline.training.ema`);
4. **reduce and check**: the loss and gradient norm are added up on the device
   (:class:`IntervalStats`, no host synchronisation); every ``log_every`` steps they are
   combined over the ranks, sent to the driver (:class:`~pipeline.training.monitor.Monitor`), and
   a non-finite loss or norm stops every rank at the same step, before anything is saved: the
   loop returns ``status: diverged`` and the driver raises :class:`TrainingDivergedError`;
5. **checkpoint**: every ``checkpoint_every`` steps (and at the end) rank 0 writes the state
   (:mod:`pipeline.training.checkpoint`) and the session stores it
   (:mod:`pipeline.training.session`: Ray Train, or a local folder).

The driver around it (run identity, Ray Train, MLflow, export) is :mod:`pipeline.training.trainer`.
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from pipeline.cluster import devices
from pipeline.cluster.storage import node_local_data, record_placement
from pipeline.config import Config, TrainConfig, Variant
from pipeline.data import TrainBatches, open_split
from pipeline.errors import UserError
from pipeline.model.diffusion import GaussianDiffusion, linear_beta_schedule
from pipeline.model.precision import compute_precision, set_matmul_precision
from pipeline.model.unet import build_unet
from pipeline.training import faults
from pipeline.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
from pipeline.training.ema import EMA
from pipeline.training.monitor import Interval, Monitor
from pipeline.training.randomness import diffusion_inputs, seed_dropout
from pipeline.training.replicas import ReplicaClipping
from pipeline.training.session import RaySession, Session, checkpoint_name


@dataclass(frozen=True)
class TrainJob:
    """What every worker needs (sent to the workers; paths absolute: workers run elsewhere)."""

    cfg: Config
    variant: Variant
    data_dir: (
        str  # prepared data folder, or its bucket URI (pipeline.cluster.storage.node_local_data)
    )
    run_dir: str  # the Ray run's storage folder or bucket URI (placements, test-fault markers)
    run: dict[str, str]  # run identity: {"name", "config_hash"}
    board: Any = None  # progress actor handle (pipeline.cluster.progress), or None
    fault: faults.Fault | None = None  # test-only


# ---------------------------------------------------------------------------------------------
# The loop.


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's entry point: ``config = {"job": TrainJob}``."""
    logging.getLogger().setLevel(logging.WARNING)  # Ray's per-report INFO lines
    session = RaySession()
    record_placement(config["job"].run_dir, session.rank)
    return run_worker(config["job"], session)


def run_worker(job: TrainJob, session: Session) -> dict[str, Any]:
    """Train from the latest checkpoint to ``train.steps``; returns the outcome.

    Returns ``{"status": "finished" | "diverged", "start": step resumed at, "step": steps done,
    "bad_step": first non-finite step (0-based) or None}``; rank 0's is Ray's
    ``result.return_value``.
    """
    train = job.cfg.train
    if session.device.type == "cpu":
        torch.set_num_threads(train.torch_threads)
    devices.deterministic_training(session.device.type)  # before the first CUDA matmul
    set_matmul_precision(job.cfg.model.precision, session.device.type)  # backward too
    state = make_state(job.cfg, job.variant, session.device)
    with session.latest_checkpoint() as folder:
        if folder is not None:
            load_checkpoint(folder, state, job.run)
    start = state.step
    model = session.wrap(state.model)  # DDP over the ranks; state.model stays unwrapped
    if train.compile:  # the wrapped model: DDP's hooks stay outside the compiled graph
        model = cast(nn.Module, torch.compile(model))  # an OptimizedModule
    diffusion = make_diffusion(job.cfg, job.variant)
    inputs = StepInputs(job, session)
    stats = IntervalStats(session.device)
    monitor = Monitor(session.rank == 0, train.batch_size, job.board)
    monitor.start(start, train.steps, session.world_size)  # the driver records W
    replicas, scale = _replica_clipping(job.cfg, session), loss_scale(job.cfg, job.variant)
    model.train()
    for step in range(start, train.steps):
        faults.maybe_inject(job.fault, job.run_dir, session.rank, step, state.model)  # test-only
        x_start, t, noise = inputs(step)  # 1. the batch (dropout reseeded)
        loss, grad_norm = train_step(  # 2.-3. forward, backward, clip, reduce; Adam, EMA
            model, state, diffusion, x_start, t, noise, job.cfg, replicas, scale
        )
        stats.add(step, loss, grad_norm)  # 4. on the device
        checkpoint = state.step % train.checkpoint_every == 0 or state.step == train.steps
        if state.step % train.log_every == 0 or checkpoint:
            interval = stats.close()  # over the ranks: the same on every rank
            lr = cast(float, state.schedule.get_last_lr()[0])  # Adam's lr is a float (not a Tensor)
            metrics = monitor.interval(state.step, interval, lr)
            if interval.first_bad_step is not None:
                monitor.close()
                return _outcome("diverged", start, state.step, interval.first_bad_step)
            if checkpoint:  # 5.
                report = {"step": state.step, "world_size": session.world_size, **metrics}
                _report_checkpoint(session, state, job, report)
    monitor.close()
    return _outcome("finished", start, state.step, None)


# ---------------------------------------------------------------------------------------------
# One step: forward and backward, then optimise.


def train_step(
    model: nn.Module,
    state: TrainState,
    diffusion: GaussianDiffusion,
    x_start: Tensor,
    t: Tensor,
    noise: Tensor,
    cfg: Config,
    replicas: ReplicaClipping | None = None,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """One optimiser step on this rank's batch; returns (mean loss, gradient norm), on device.

    ``model`` is the network to call (DDP-wrapped when distributed); ``state.model`` is the same
    network unwrapped. x_start [b, C, H, W], t [b], noise [b, C, H, W] are this rank's b images.
    ``scale`` multiplies the per-image loss (:func:`loss_scale`); ``replicas`` clips per virtual
    replica (:func:`forward_backward`).
    """
    loss, grad_norm = forward_backward(
        model, state, diffusion, x_start, t, noise, cfg, replicas, scale
    )
    optimize(state)
    return loss.detach(), grad_norm.detach()


def forward_backward(
    model: nn.Module,
    state: TrainState,
    diffusion: GaussianDiffusion,
    x_start: Tensor,
    t: Tensor,
    noise: Tensor,
    cfg: Config,
    replicas: ReplicaClipping | None,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """The loss, and in ``state.model``'s ``.grad`` the clipped gradient averaged over the ranks.

    Without ``replicas``: the mean loss of the batch, backward (DDP all-reduces the gradient as
    it goes), then the whole gradient clipped to ``grad_clip``; returns (loss, its norm before
    clipping). With ``replicas``: each virtual replica's gradient is clipped before the average
    (pipeline.training.replicas); returns (loss, the mean of the replicas' norms).
    """
    if replicas is None:  # replicas keep .grad as views of their flat buffer
        state.optimizer.zero_grad(set_to_none=True)

    def loss_fn(net: nn.Module, x: Tensor, tt: Tensor, eps: Tensor) -> Tensor:
        with compute_precision(cfg.model.precision, x.device.type, cfg.train.bf16):
            losses = diffusion.training_losses(_float_output(net), x, tt, eps)["loss"]
        return losses.float().mean() * scale

    if replicas is not None:
        return replicas.backward(model, state.model, loss_fn, x_start, t, noise, state.step)
    loss = loss_fn(model, x_start, t, noise)
    loss.backward()
    return loss, clip_gradients(_parameters(state.model), cfg.train.grad_clip)


def optimize(state: TrainState) -> None:
    """Adam's update at this step's learning rate, the warmup's next rate, the EMA; step + 1."""
    state.optimizer.step()
    state.schedule.step()
    state.ema.update(state.model)
    state.step += 1


def loss_scale(cfg: Config, variant: Variant) -> float:
    """The factor on the per-image loss: 1/ln 2 for a kl loss trained in bits, else 1.

    The official code trained the kl loss (the bound's term) in bits, ``meanflat(kl) / log(2)``
    (``train.kl_units: bits``)."""
    bits = variant.loss_type == "kl" and cfg.train.kl_units == "bits"
    return 1.0 / math.log(2.0) if bits else 1.0


def _float_output(model: nn.Module):
    """The model's output in float32, so that the loss is computed in float32 under autocast."""
    return lambda x, t: model(x, t).float()


_PARAMETERS: weakref.WeakKeyDictionary[nn.Module, list[nn.Parameter]] = weakref.WeakKeyDictionary()


def _parameters(model: nn.Module) -> list[nn.Parameter]:
    """``list(model.parameters())``, built once per model: walking ~80 submodules every step
    costs more Python than the clip itself. Parameters are updated in place (optimizer,
    ``load_state_dict``), never replaced, during training."""
    params = _PARAMETERS.get(model)
    if params is None:
        params = _PARAMETERS[model] = list(model.parameters())
    return params


# ---------------------------------------------------------------------------------------------
# The paper's optimiser: Adam, linear learning-rate warmup, gradient-norm clipping.
#
# Official code (``get_warmed_up_lr``): lr(s) = lr * min(s / warmup, 1) at optimiser step s,
# counting from 0, so the first update uses lr 0 (Adam's moments still see its gradient). Adam
# keeps torch's defaults (betas 0.9, 0.999; eps 1e-8), as the official code kept TensorFlow's.


def make_optimizer(model: nn.Module, train: TrainConfig) -> tuple[torch.optim.Adam, LambdaLR]:
    """Adam at ``train.lr`` with a LambdaLR scheduler for the warmup (step it once per update)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr)
    schedule = LambdaLR(optimizer, functools.partial(warmup_factor, warmup=train.warmup))
    return optimizer, schedule


def warmup_factor(step: int, warmup: int) -> float:
    """The learning-rate multiplier at optimiser step ``step``: min(step / warmup, 1)."""
    return 1.0 if warmup <= 0 else min(step / warmup, 1.0)


def clip_gradients(model: nn.Module | Iterable[Tensor], max_norm: float) -> Tensor:
    """Clip the global gradient norm to ``max_norm`` (<= 0: no clipping); the norm before it.

    ``model`` is a module or its parameters. The norm stays on the device (no
    synchronisation); it is non-finite when any gradient is.
    """
    limit = max_norm if max_norm > 0 else math.inf
    params = model.parameters() if isinstance(model, nn.Module) else model
    return torch.nn.utils.clip_grad_norm_(params, limit)


# ---------------------------------------------------------------------------------------------
# Reduce and check: interval statistics over the ranks, and the non-finite ("diverged") stop.
#
# Each step adds its loss and gradient norm on the device; at a log or checkpoint step
# IntervalStats.close combines them over the ranks (one all-reduce each for the sums and for the
# first non-finite step) and reads them once. Every rank gets the same answer, so all ranks stop
# at the same step when training diverges. Divergence is not retried (it would diverge again).


class TrainingDivergedError(UserError):
    """The loss or the gradient norm became NaN or infinite."""


class IntervalStats:
    """Device-side sums of the loss and gradient norm since the last :meth:`close`."""

    def __init__(self, device: torch.device):
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self._sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, norm, n
        self._first_bad = torch.full((1,), math.inf, dtype=torch.float64, device=self.device)

    def add(self, step: int, loss: Tensor, grad_norm: Tensor) -> None:
        """Record optimiser step ``step``'s mean loss and gradient norm (device scalars)."""
        values = torch.stack([loss.detach().double(), grad_norm.detach().double()])
        self._sums[:2] += values
        self._sums[2] += 1
        bad = ~torch.isfinite(values).all()
        self._first_bad.copy_(torch.where(bad, self._first_bad.clamp(max=step), self._first_bad))

    def close(self) -> Interval:
        """Combine over the ranks (when distributed), read, and start a new interval."""
        sums, first_bad = self._sums.clone(), self._first_bad.clone()
        world = 1
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
        loss_sum, norm_sum, count = sums.tolist()
        steps = round(count / world)
        bad = first_bad.item()
        self._reset()
        return Interval(
            steps=steps,
            loss=loss_sum / max(count, 1),
            grad_norm=norm_sum / max(count, 1),
            first_bad_step=None if math.isinf(bad) else int(bad),
        )


# ---------------------------------------------------------------------------------------------
# What the loop is built from.


def make_diffusion(cfg: Config, variant: Variant) -> GaussianDiffusion:
    """The forward process and the variant's parameterisation (a Table-2 row)."""
    d = cfg.diffusion
    betas = linear_beta_schedule(d.num_timesteps, d.beta_start, d.beta_end)
    return GaussianDiffusion(betas, variant.mean_type, variant.var_type, variant.loss_type)


def make_state(cfg: Config, variant: Variant, device: torch.device) -> TrainState:
    """A fresh network (seeded by train.seed), its EMA, Adam and the warmup schedule."""
    torch.manual_seed(cfg.train.seed)
    out_channels = make_diffusion(cfg, variant).model_output_channels(3)
    model = build_unet(cfg.model, cfg.data.resolution, out_channels=out_channels).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, schedule = make_optimizer(model, cfg.train)
    return TrainState(model, EMA(model, cfg.train.ema_decay), optimizer, schedule)


def _replica_clipping(cfg: Config, session: Session) -> ReplicaClipping | None:
    """Per-replica clipping for ``train.clip_replicas`` > 1; None: clip the whole batch."""
    t = cfg.train
    if t.clip_replicas <= 1:
        return None
    return ReplicaClipping(t.clip_replicas, session.rank, session.world_size, t.grad_clip, t.seed)


class StepInputs:
    """This rank's x_0, t and noise of a step, on the session's device (see the module doc)."""

    def __init__(self, job: TrainJob, session: Session):
        cfg, train = job.cfg, job.cfg.train
        assert cfg.data.random_flip is not None  # resolved by config_from_dict
        self.batches = TrainBatches(
            open_split(node_local_data(job.data_dir), "train"),
            train.batch_size,
            session.rank,
            session.world_size,
            train.seed,
            cfg.data.random_flip,
        )
        self.shape = (train.batch_size, 3, cfg.data.resolution, cfg.data.resolution)
        self.num_timesteps, self.seed = cfg.diffusion.num_timesteps, train.seed
        self.rank, self.world_size = session.rank, session.world_size
        self.device, self.channels_last = session.device, train.channels_last

    def __call__(self, step: int) -> tuple[Tensor, Tensor, Tensor]:
        """(x_start, t, noise) of ``step``; also reseeds dropout for it."""
        x_start = self._to_device(self.batches.batch(step))
        t, noise = diffusion_inputs(
            self.seed, step, self.num_timesteps, self.shape, self.rank, self.world_size, self.device
        )  # drawn on the device: no copy, no sync
        seed_dropout(self.seed, step, self.rank, self.device)
        return x_start, t, noise.contiguous(memory_format=self._format())

    def _to_device(self, x: Tensor) -> Tensor:
        """The step's images on the device; from pinned memory on CUDA, so without a host sync."""
        if self.device.type == "cuda":
            x = x.pin_memory()
        return x.to(self.device, non_blocking=True).contiguous(memory_format=self._format())

    def _format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def _report_checkpoint(
    session: Session, state: TrainState, job: TrainJob, metrics: dict[str, Any]
) -> None:
    """Rank 0 writes the checkpoint to a temporary folder and reports it; the others report."""
    name = checkpoint_name(state.step)
    if session.rank != 0:
        session.report(metrics, None, name)
        return
    with tempfile.TemporaryDirectory(prefix="ddpm-checkpoint-") as tmp:
        save_checkpoint(tmp, state, job.run, job.cfg.train.seed)
        session.report(metrics, Path(tmp), name)


def _outcome(status: str, start: int, step: int, bad_step: int | None) -> dict[str, Any]:
    return {"status": status, "start": start, "step": step, "bad_step": bad_step}
