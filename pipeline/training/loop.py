"""The per-worker training loop (Algorithm 1) and one optimiser step.

A worker builds the network, the EMA, Adam and the warmup schedule from the config, restores
the latest checkpoint if there is one, and trains from that step on. At optimiser step s it
reads its slice of global batch s (:class:`pipeline.data.TrainBatches`), draws its slice of the
global batch's t and noise from (seed, s), and reseeds dropout from (seed, s, rank); see
:mod:`pipeline.training.randomness`. Every ``log_every`` steps the loss and gradient norm are
combined over the ranks and logged; every ``checkpoint_every`` steps (and at the end) rank 0
reports a checkpoint. A non-finite loss or gradient norm stops every rank at the next log or
checkpoint step, before anything is saved; the loop then returns ``status: diverged``.
"""

from __future__ import annotations

import logging
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.cluster.storage import node_local_data, record_placement
from pipeline.config import Config, Variant
from pipeline.data import TrainBatches, open_split
from pipeline.model.diffusion import GaussianDiffusion, linear_beta_schedule
from pipeline.model.precision import compute_precision, set_matmul_precision
from pipeline.model.unet import build_unet
from pipeline.training import faults
from pipeline.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
from pipeline.training.divergence import IntervalStats
from pipeline.training.ema import EMA
from pipeline.training.monitor import Monitor
from pipeline.training.optim import clip_gradients, make_optimizer
from pipeline.training.randomness import diffusion_inputs, seed_dropout
from pipeline.training.replicas import ReplicaClipping, loss_scale
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

    ``model`` is the network to call (DDP-wrapped when distributed; it averages the gradients
    over the ranks in backward); ``state.model`` is the same network unwrapped. ``scale``
    multiplies the per-image loss (1/ln 2: a kl loss in bits); with ``replicas`` each virtual
    replica's gradient is clipped before averaging (pipeline.training.replicas), else the whole
    batch's gradient is clipped (the norm returned is then the mean of the replicas' norms).
    """
    if replicas is None:  # replicas keep .grad as views of their flat buffer
        state.optimizer.zero_grad(set_to_none=True)

    def loss_fn(net: nn.Module, x: Tensor, tt: Tensor, eps: Tensor) -> Tensor:
        with compute_precision(cfg.model.precision, x.device.type, cfg.train.bf16):
            losses = diffusion.training_losses(_float_output(net), x, tt, eps)["loss"]
        return losses.float().mean() * scale

    if replicas is None:
        loss = loss_fn(model, x_start, t, noise)
        loss.backward()
        grad_norm = clip_gradients(_parameters(state.model), cfg.train.grad_clip)
    else:
        loss, grad_norm = replicas.backward(
            model, state.model, loss_fn, x_start, t, noise, state.step
        )
    state.optimizer.step()
    state.schedule.step()
    state.ema.update(state.model)
    state.step += 1
    return loss.detach(), grad_norm.detach()


_PARAMETERS: weakref.WeakKeyDictionary[nn.Module, list[nn.Parameter]] = weakref.WeakKeyDictionary()


def _parameters(model: nn.Module) -> list[nn.Parameter]:
    """``list(model.parameters())``, built once per model: walking ~80 submodules every step
    costs more Python than the clip itself. Parameters are updated in place (optimizer,
    ``load_state_dict``), never replaced, during training."""
    params = _PARAMETERS.get(model)
    if params is None:
        params = _PARAMETERS[model] = list(model.parameters())
    return params


def _float_output(model: nn.Module):
    """The model's output in float32, so that the loss is computed in float32 under autocast."""
    return lambda x, t: model(x, t).float()


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
    set_matmul_precision(job.cfg.model.precision, session.device.type)  # backward too
    state = make_state(job.cfg, job.variant, session.device)
    with session.latest_checkpoint() as folder:
        if folder is not None:
            load_checkpoint(folder, state, job.run)
    start = state.step
    model = session.wrap(state.model)
    if train.compile:  # the wrapped model: DDP's hooks stay outside the compiled graph
        model = torch.compile(model)
    diffusion = make_diffusion(job.cfg, job.variant)
    inputs = StepInputs(job, session)
    stats = IntervalStats(session.device)
    monitor = Monitor(session.rank == 0, train.batch_size, job.board)
    monitor.start(start, train.steps)
    replicas, scale = _replica_clipping(job.cfg, session), loss_scale(job.cfg, job.variant)
    model.train()
    for step in range(start, train.steps):
        faults.maybe_inject(job.fault, job.run_dir, session.rank, step, state.model)
        loss, grad_norm = train_step(
            model, state, diffusion, *inputs(step), job.cfg, replicas, scale
        )
        stats.add(step, loss, grad_norm)
        checkpoint = state.step % train.checkpoint_every == 0 or state.step == train.steps
        if state.step % train.log_every == 0 or checkpoint:
            interval = stats.close()
            metrics = monitor.interval(state.step, interval, state.schedule.get_last_lr()[0])
            if interval.first_bad_step is not None:
                monitor.close()
                return _outcome("diverged", start, state.step, interval.first_bad_step)
            if checkpoint:
                report = {"step": state.step, "world_size": session.world_size, **metrics}
                _report_checkpoint(session, state, job, report)
    monitor.close()
    return _outcome("finished", start, state.step, None)


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
