"""Import diffusers-format DDPM checkpoints into the paper's U-Net (pipeline.model.unet.UNet).

The official TensorFlow CIFAR10 and LSUN checkpoints are published converted to diffusers'
``UNet2DModel`` layout (a folder with ``config.json`` and ``diffusion_pytorch_model.safetensors``
or ``.bin``; a whole pipeline folder with a ``unet/`` subfolder works too). This module checks
that the config describes the DDPM architecture and maps every tensor to our names, failing with
the exact missing, unexpected or mis-shaped keys otherwise. diffusers itself is not needed.

CLI: ``ddpm-convert SRC_DIR OUT.pt`` (or ``python -m pipeline.model.convert``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.cli import entry_point
from pipeline.errors import UserError
from pipeline.model.unet import GROUPNORM_EPS, UNet
from pipeline.model.weights import save_weights, sha256_file

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# What the DDPM architecture requires of a UNet2DModel config (missing keys take these values).
REQUIRED = {
    "_class_name": "UNet2DModel",
    "act_fn": "silu",
    "time_embedding_type": "positional",
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "downsample_padding": 0,
    "center_input_sample": False,
    "mid_block_scale_factor": 1,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "time_embedding_dim": None,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "mid_block_type": "UNetMidBlock2D",
    "attn_norm_num_groups": None,
}
# diffusers' attention names, and the deprecated ones of early conversions.
ATTN_NAMES = {
    "q": ("to_q", "query"),
    "k": ("to_k", "key"),
    "v": ("to_v", "value"),
    "out": ("to_out.0", "proj_attn"),
}


class ConversionError(UserError):
    """A checkpoint that is not the DDPM U-Net in diffusers' layout."""


# DDPMScheduler's defaults: what a scheduler_config.json that leaves a key out means.
SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "variance_type": "fixed_small",
}


def find_weights(folder: Path) -> tuple[Path, Path]:
    """(config.json, weights file) of a UNet2DModel folder or a pipeline folder's unet/."""
    if not folder.is_dir():
        raise ConversionError(f"{folder}: no such checkpoint folder")
    if not (folder / "config.json").is_file() and (folder / "unet" / "config.json").is_file():
        folder = folder / "unet"
    config = folder / "config.json"
    if not config.is_file():
        raise ConversionError(f"{folder}: no config.json (expected a diffusers UNet2DModel folder)")
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return config, folder / name
    raise ConversionError(f"{folder}: no weights file (expected one of {', '.join(WEIGHT_FILES)})")


def unet_kwargs_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """Our UNet's constructor arguments for a diffusers UNet2DModel config (checked)."""
    for key, want in REQUIRED.items():
        got = config.get(key, want)
        if got != want:
            raise ConversionError(f"config.json: {key} = {got!r} is not the DDPM U-Net ({want!r})")
    if config.get("norm_eps", GROUPNORM_EPS) != GROUPNORM_EPS:
        raise ConversionError(f"config.json: norm_eps = {config['norm_eps']!r}, expected 1e-06")
    widths = list(config["block_out_channels"])
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    allowed = {"DownBlock2D", "AttnDownBlock2D"}
    if not set(down) <= allowed:
        raise ConversionError(f"config.json: down_block_types {down} (allowed: {sorted(allowed)})")
    mirrored = [t.replace("Down", "Up") for t in reversed(down)]
    if up != mirrored:
        raise ConversionError(f"config.json: up_block_types {up} do not mirror down ({mirrored})")
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ConversionError(f"config.json: block_out_channels {widths} are not multiples of {ch}")
    head_dim = config.get("attention_head_dim")
    attn_levels = [i for i, t in enumerate(down) if t == "AttnDownBlock2D"]
    if head_dim is not None and any(head_dim != widths[i] for i in attn_levels):
        raise ConversionError(
            f"config.json: attention_head_dim = {head_dim}: only single-head attention "
            "(null, or the block width) is the DDPM architecture"
        )
    size = config.get("sample_size")
    size = size[0] if isinstance(size, list | tuple) else size
    if not isinstance(size, int):
        raise ConversionError(f"config.json: sample_size = {size!r}, expected an integer")
    return {
        "resolution": size,
        "in_channels": int(config.get("in_channels", 3)),
        "out_channels": int(config.get("out_channels", 3)),
        "ch": ch,
        "ch_mult": [w // ch for w in widths],
        "num_res_blocks": int(config.get("layers_per_block", 2)),
        "attn_resolutions": [size // 2**i for i in attn_levels],
        "dropout": float(config.get("dropout", 0.0)),
        "norm_groups": int(config.get("norm_num_groups", 32)),
    }


def _resnet_map(src: str, dst: str) -> dict[str, str]:
    names = {"norm1": "norm1", "conv1": "conv1", "time_emb_proj": "temb_proj", "norm2": "norm2"}
    names |= {"conv2": "conv2", "conv_shortcut": "nin_shortcut"}
    return {
        f"{src}.{a}.{p}": f"{dst}.{b}.{p}" for a, b in names.items() for p in ("weight", "bias")
    }


def key_map(kwargs: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """(diffusers key -> our key for plain tensors, diffusers attention prefix -> our prefix)."""
    levels, blocks = len(kwargs["ch_mult"]), kwargs["num_res_blocks"]
    plain: dict[str, str] = {}
    attn: dict[str, str] = {}
    for p in ("weight", "bias"):
        plain |= {
            f"time_embedding.linear_1.{p}": f"temb_dense0.{p}",
            f"time_embedding.linear_2.{p}": f"temb_dense1.{p}",
            f"conv_in.{p}": f"conv_in.{p}",
            f"conv_norm_out.{p}": f"norm_out.{p}",
            f"conv_out.{p}": f"conv_out.{p}",
        }
    for i in range(levels):
        for j in range(blocks):
            plain |= _resnet_map(f"down_blocks.{i}.resnets.{j}", f"down.{i}.blocks.{j}")
            attn[f"down_blocks.{i}.attentions.{j}"] = f"down.{i}.attns.{j}"
        for p in ("weight", "bias"):
            plain[f"down_blocks.{i}.downsamplers.0.conv.{p}"] = f"down.{i}.resample.conv.{p}"
        ours = levels - 1 - i  # diffusers lists up blocks from the deepest level
        for j in range(blocks + 1):
            plain |= _resnet_map(f"up_blocks.{i}.resnets.{j}", f"up.{ours}.blocks.{j}")
            attn[f"up_blocks.{i}.attentions.{j}"] = f"up.{ours}.attns.{j}"
        for p in ("weight", "bias"):
            plain[f"up_blocks.{i}.upsamplers.0.conv.{p}"] = f"up.{ours}.resample.conv.{p}"
    plain |= _resnet_map("mid_block.resnets.0", "mid_block_1")
    plain |= _resnet_map("mid_block.resnets.1", "mid_block_2")
    attn["mid_block.attentions.0"] = "mid_attn_1"
    return plain, attn


def _pop_attn(sd: dict[str, Tensor], prefix: str, part: str, param: str) -> Tensor | None:
    for name in ATTN_NAMES[part]:
        key = f"{prefix}.{name}.{param}"
        if key in sd:
            return sd.pop(key)
    return None


def _as_conv1x1(t: Tensor) -> Tensor:
    """A Linear weight [out, in] as a 1x1 conv weight [out, in, 1, 1]; biases unchanged."""
    return t.reshape(*t.shape, 1, 1) if t.ndim == 2 else t


def convert_state_dict(source: dict[str, Tensor], kwargs: dict[str, Any]) -> dict[str, Tensor]:
    """Map a diffusers UNet2DModel state dict onto ours; ConversionError names any mismatch."""
    sd = dict(source)
    plain, attn = key_map(kwargs)
    target = UNet(**kwargs).state_dict()
    out: dict[str, Tensor] = {}
    for src, dst in plain.items():
        if src in sd and dst in target:
            out[dst] = sd.pop(src)
    for src, dst in attn.items():
        if f"{dst}.qkv.weight" not in target:
            continue
        for p in ("weight", "bias"):
            if (norm := sd.pop(f"{src}.group_norm.{p}", None)) is not None:
                out[f"{dst}.norm.{p}"] = norm
            parts = [_pop_attn(sd, src, x, p) for x in ("q", "k", "v")]
            present = [x for x in parts if x is not None]
            if len(present) == len(parts):
                qkv = torch.cat(present, dim=0)
                out[f"{dst}.qkv.{p}"] = qkv.reshape(*qkv.shape, 1, 1) if p == "weight" else qkv
            if (proj := _pop_attn(sd, src, "out", p)) is not None:
                out[f"{dst}.proj_out.{p}"] = (
                    proj.reshape(*proj.shape, 1, 1) if p == "weight" else proj
                )
    missing = sorted(set(target) - set(out))
    if missing or sd:
        raise ConversionError(_mismatch_message(missing, sorted(sd)))
    for key, value in out.items():
        if value.shape != target[key].shape:
            raise ConversionError(
                f"{key}: checkpoint tensor has shape {tuple(value.shape)}, the architecture in "
                f"config.json needs {tuple(target[key].shape)}"
            )
    return out


def _mismatch_message(missing: list[str], unexpected: list[str]) -> str:
    def show(keys: list[str]) -> str:
        return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")

    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensor(s) for: {show(missing)}")
    if unexpected:
        parts.append(f"unexpected key(s): {show(unexpected)}")
    return "checkpoint does not match its config.json: " + "; ".join(parts)


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a .safetensors or torch .bin file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConversionError(f"{path}: unreadable weights ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict):
        raise ConversionError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return sd


def load_diffusers_unet(folder: str | Path) -> tuple[UNet, dict[str, Any]]:
    """Our UNet holding a diffusers checkpoint's weights, and provenance (paths, sha256)."""
    config_path, weights_path = find_weights(Path(folder))
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{config_path}: not valid JSON ({e})") from None
    try:
        kwargs = unet_kwargs_from_config(config)
    except KeyError as e:
        raise ConversionError(f"{config_path}: missing key {e}") from None
    model = UNet(**kwargs)
    model.load_state_dict(convert_state_dict(read_state_dict(weights_path), kwargs))
    info = {
        "source": "diffusers",
        "config": str(config_path),
        "weights": str(weights_path),
        "sha256": sha256_file(weights_path),
        "unet": kwargs,
    }
    return model.eval(), info


def scheduler_info(folder: str | Path) -> dict[str, Any] | None:
    """The checkpoint's DDPMScheduler config (betas, T, variance type), if the folder has one."""
    folder = Path(folder)
    for path in (folder / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json"):
        if path.is_file():
            try:
                config = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConversionError(f"{path}: not a readable JSON file ({e})") from None
            if not isinstance(config, dict):
                raise ConversionError(f"{path}: expected a JSON object")
            return {**SCHEDULER_DEFAULTS, **config}
    return None


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ddpm-convert",
        description="Convert a diffusers-format DDPM checkpoint (e.g. google/ddpm-cifar10-32) "
        "into this project's weights file.",
    )
    parser.add_argument("source", type=Path, help="folder with config.json and the weights")
    parser.add_argument("output", type=Path, help="weights file to write (e.g. models/ema.pt)")
    args = parser.parse_args(argv)
    model, info = load_diffusers_unet(args.source)
    scheduler = scheduler_info(args.source)
    if scheduler is not None:
        info["scheduler"] = {k: v for k, v in scheduler.items() if not k.startswith("_")}
    save_weights(args.output, model, meta=info)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output}: {params:,} parameters from {info['weights']}")
    print(f"source sha256: {info['sha256']}")


if __name__ == "__main__":
    main()
