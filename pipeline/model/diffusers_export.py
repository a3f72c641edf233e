"""Our U-Net and sampler as a diffusers folder: the inverse of :mod:`pipeline.model.convert`.

:func:`write_diffusers_folder` writes what ``DDPMPipeline.from_pretrained(folder)`` loads:

::

    model_index.json                         the pipeline: UNet2DModel + DDPMScheduler
    unet/config.json                         the DDPM architecture in UNet2DModel's terms
    unet/diffusion_pytorch_model.safetensors the weights under diffusers' names
    scheduler/scheduler_config.json          betas, T, what the network predicts, the variance

diffusers' DDPMScheduler samples like our ``p_sample_loop`` (Ho et al. 2020, Algorithm 2 with
x_0 clipped to [-1, 1], the official sampler) for the noise prediction (``epsilon``) and the
x_0 prediction (``sample``) with a fixed variance (``fixed_large``: sigma_t^2 = beta_t,
``fixed_small``: beta~_t). It cannot express the other rows of Table 2:

- ``xprev`` (the network predicts the posterior mean mu~): DDPMScheduler's prediction types are
  epsilon, sample and v_prediction only;
- ``learned`` variances: the network's second C channels are a *log* variance, and
  DDPMScheduler's ``learned`` takes them as the variance itself (it scales the noise by their
  square root), ``learned_range`` as Improved DDPM's interpolation between the two fixed ones.

For those the folder holds ``unet/`` only (loadable with ``UNet2DModel.from_pretrained(folder,
subfolder="unet")``) and no model_index.json, so that ``DDPMPipeline.from_pretrained`` fails
instead of drawing from another model; :func:`scheduler_config` returns the reason. diffusers
itself is not needed to write the folder (tests/test_diffusers_export.py loads it with
diffusers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from pipeline.choices import MeanType, VarType
from pipeline.model.convert import REQUIRED, WEIGHT_FILES, key_map
from pipeline.model.unet import GROUPNORM_EPS, UNet

DIFFUSERS_VERSION = "0.42.1"  # the version the folder is written for and tested with
PREDICTION_TYPES: dict[str, str] = {"eps": "epsilon", "xstart": "sample"}
VARIANCE_TYPES: dict[str, str] = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}
NOT_EXPRESSIBLE = {
    "xprev": "diffusers' DDPMScheduler has no posterior-mean (x_{t-1}) prediction "
    "(its prediction types: epsilon, sample, v_prediction)",
    "learned": "the network's learned variance is a log variance; DDPMScheduler's 'learned' "
    "reads it as the variance itself and 'learned_range' as Improved DDPM's interpolation",
}


def unet_config(kwargs: dict[str, Any]) -> dict[str, Any]:
    """UNet2DModel's config.json for our UNet's constructor arguments ``kwargs``."""
    size, mult = int(kwargs["resolution"]), list(kwargs["ch_mult"])
    down = [
        "AttnDownBlock2D" if size // 2**i in kwargs["attn_resolutions"] else "DownBlock2D"
        for i in range(len(mult))
    ]
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        **REQUIRED,
        "sample_size": size,
        "in_channels": int(kwargs["in_channels"]),
        "out_channels": int(kwargs["out_channels"]),
        "block_out_channels": [int(kwargs["ch"]) * m for m in mult],
        "down_block_types": down,
        "up_block_types": [t.replace("Down", "Up") for t in reversed(down)],
        "layers_per_block": int(kwargs["num_res_blocks"]),
        "attention_head_dim": None,  # one head as wide as the block: the DDPM attention
        "norm_num_groups": int(kwargs["norm_groups"]),
        "norm_eps": GROUPNORM_EPS,
        "dropout": float(kwargs["dropout"]),
    }


def to_diffusers_state_dict(model: UNet) -> dict[str, Tensor]:
    """``model``'s tensors under UNet2DModel's names (contiguous, on the CPU): every tensor
    used once, the 1x1 attention convolutions as Linear weights [C, C]."""
    kwargs = model.init_kwargs
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    plain, attn = key_map(kwargs)
    out: dict[str, Tensor] = {}
    for src, dst in plain.items():
        if dst in ours:
            out[src] = ours.pop(dst)
    for src, dst in attn.items():
        if f"{dst}.qkv.weight" not in ours:
            continue  # no attention at this level
        for p in ("weight", "bias"):
            out[f"{src}.group_norm.{p}"] = ours.pop(f"{dst}.norm.{p}")
            q, k, v = ours.pop(f"{dst}.qkv.{p}").chunk(3, dim=0)
            proj = ours.pop(f"{dst}.proj_out.{p}")
            for name, tensor in (("to_q", q), ("to_k", k), ("to_v", v), ("to_out.0", proj)):
                out[f"{src}.{name}.{p}"] = tensor.flatten(1) if p == "weight" else tensor
    if ours:  # a tensor of our U-Net that diffusers' layout has no place for
        raise ValueError(f"no diffusers name for: {', '.join(sorted(ours))}")
    return {k: v.contiguous().clone() for k, v in sorted(out.items())}


def scheduler_config(
    num_timesteps: int,
    beta_start: float,
    beta_end: float,
    mean_type: MeanType,
    var_type: VarType,
) -> tuple[dict[str, Any] | None, str]:
    """DDPMScheduler's config for the linear schedule and a parameterisation, and ""; or None
    and why diffusers cannot sample it (see the module docstring)."""
    for reason_key in (mean_type, var_type):
        if reason_key in NOT_EXPRESSIBLE:
            return None, NOT_EXPRESSIBLE[reason_key]
    return {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": int(num_timesteps),
        "beta_start": float(beta_start),
        "beta_end": float(beta_end),
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": PREDICTION_TYPES[mean_type],
        "variance_type": VARIANCE_TYPES[var_type],
        "clip_sample": True,  # x_0 clipped to [-1, 1] before the posterior mean, as ours
        "clip_sample_range": 1.0,
        "thresholding": False,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }, ""


def _json(path: Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def write_diffusers_folder(folder: Path, model: UNet, scheduler: dict[str, Any] | None) -> None:
    """Write ``model`` (and ``scheduler``, when diffusers can express the sampler) as a
    diffusers pipeline folder into ``folder`` (an empty folder: the caller makes it atomic).
    The bytes depend on the weights and configs only (sorted keys, no metadata)."""
    from safetensors.torch import save

    _json(folder / "unet" / "config.json", unet_config(model.init_kwargs))
    # bytes written by us (safetensors' save_file makes a 0600 file): the umask's mode
    (folder / "unet" / WEIGHT_FILES[0]).write_bytes(save(to_diffusers_state_dict(model)))
    if scheduler is not None:
        _json(folder / "scheduler" / "scheduler_config.json", scheduler)
        _json(
            folder / "model_index.json",
            {
                "_class_name": "DDPMPipeline",
                "_diffusers_version": DIFFUSERS_VERSION,
                "scheduler": ["diffusers", "DDPMScheduler"],
                "unet": ["diffusers", "UNet2DModel"],
            },
        )
