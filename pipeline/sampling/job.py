"""The network description that sampling and evaluation share: :class:`SamplingJob`.

One frozen value holds what every Ray task of a sampling, NLL or figure run needs (the U-Net's
constructor arguments and EMA weights, the training schedule, the variant's types and the
sampler's settings); it is shipped once through the object store, so no task reads a file of
the driver. :func:`make_job` builds it from the params and ``models/<variant>/ema.pt``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.choices import LossType, MeanType, Precision, VarType
from pipeline.cluster import devices
from pipeline.config import Config, Variant
from pipeline.errors import ConfigError, DataError
from pipeline.model.diffusion import GaussianDiffusion, linear_beta_schedule
from pipeline.model.respace import RespacedDiffusion, sampler_label, space_timesteps
from pipeline.model.unet import UNet
from pipeline.model.weights import load_weights


@dataclass(frozen=True)
class SamplingJob:
    """The network and the sampler settings of one sampling run."""

    unet: dict[str, Any]  # UNet constructor kwargs
    state_dict: dict[str, Tensor]  # EMA weights
    betas: tuple[float, ...]  # the training schedule (float64 values)
    mean_type: MeanType
    var_type: VarType  # the sampler's (sampler_var_type)
    loss_type: LossType
    steps: int | None  # None: all T steps (Algorithm 2); fewer: respaced
    seed: int
    batch_size: int
    bf16: bool = False
    channels_last: bool = False
    use_gpu: bool = False
    precision: Precision = "fp32"  # model.precision (pipeline.model.precision)
    torch_threads: int = 1

    @property
    def respaced(self) -> bool:
        """Whether this is the respaced extension (fewer steps than T), not Algorithm 2."""
        return self.steps is not None and self.steps != len(self.betas)

    @property
    def device_type(self) -> str:
        """cuda with use_gpu, else cpu (pipeline.cluster.devices)."""
        return devices.compute_device(self.use_gpu)

    @property
    def batch_invariant(self) -> bool:
        """Whether an image's output is independent of its batch (measured; see
        pipeline.model.unet)."""
        return (
            self.device_type == "cpu"
            and not self.bf16
            and self.precision != "bf16"
            and not self.channels_last
        )

    def weights_digest(self) -> str:
        """sha256 of the architecture and every tensor's name, dtype, shape and bytes.

        Unlike the file's sha256, it ignores the file's ``meta`` (step, provenance): only what
        changes a sample's bytes.
        """
        digest = hashlib.sha256(json.dumps(self.unet, sort_keys=True).encode())
        for name in sorted(self.state_dict):
            tensor = self.state_dict[name].detach().cpu().contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        return digest.hexdigest()

    def diffusion(self) -> GaussianDiffusion:
        base = GaussianDiffusion(
            np.array(self.betas), self.mean_type, self.var_type, self.loss_type
        )
        if not self.respaced or self.steps is None:  # (respaced implies steps)
            return base
        return RespacedDiffusion(base, space_timesteps(base.num_timesteps, self.steps))

    def label(self) -> str:
        return sampler_label(len(self.betas), self.steps)

    def model(self, device: torch.device) -> UNet:
        model = UNet(**self.unet)
        model.load_state_dict(self.state_dict)
        model = model.to(device).eval()
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


def variant_types(variant: Variant) -> dict[str, str]:
    """A variant's mean_type, var_type and loss_type, as model.json records them."""
    return {
        "mean_type": variant.mean_type,
        "var_type": variant.var_type,
        "loss_type": variant.loss_type,
    }


def sampler_var_type(cfg: Config, variant: Variant) -> VarType:
    """The variance the sampler draws with: ``sample.var_type`` when set, else the variant's.

    Only a fixed variance can be swapped (the official LSUN sampler used beta~_t where CIFAR10
    used beta_t); a learned variance is the network's output: ConfigError.
    """
    chosen = cfg.sample.var_type
    if chosen is None or chosen == variant.var_type:
        return variant.var_type
    if variant.var_type == "learned":
        raise ConfigError(
            f"presets.{cfg.scale}.sample.var_type: {chosen!r} cannot replace the learned variance "
            f"of variant {variant.name}; set it to null"
        )
    return chosen


def make_job(cfg: Config, variant: Variant, weights: Path) -> SamplingJob:
    """The sampling job of a variant: its EMA weights and the params' sample section."""
    model, _ = load_weights(weights, "cpu")
    d, s = cfg.diffusion, cfg.sample
    betas = linear_beta_schedule(d.num_timesteps, d.beta_start, d.beta_end)
    diffusion = GaussianDiffusion(betas, variant.mean_type, variant.var_type, variant.loss_type)
    want = diffusion.model_output_channels(model.in_channels)
    if model.out_channels != want:
        raise DataError(
            f"{weights}: the network returns {model.out_channels} channels but var_type "
            f"{variant.var_type!r} needs {want}; rerun the train stage for this variant"
        )
    return SamplingJob(
        unet=dict(model.init_kwargs),
        state_dict=model.state_dict(),
        betas=tuple(float(b) for b in betas),
        mean_type=variant.mean_type,
        var_type=sampler_var_type(cfg, variant),
        loss_type=variant.loss_type,
        steps=s.steps,
        seed=s.seed,
        batch_size=s.batch_size,
        bf16=s.bf16,
        channels_last=s.channels_last,
        use_gpu=s.use_gpu,
        precision=cfg.model.precision,
        torch_threads=s.torch_threads,
    )
