"""diffusers-format DDPM checkpoints -> our U-Net: same function, clear errors otherwise."""

from __future__ import annotations

import json
import subprocess
import sys

import diffusers  # noqa: F401  (dev extra: a missing install fails here, never skips)
import pytest
import torch
from data_formats import ddpm_unet

from pipeline.model.convert import ConversionError, load_diffusers_unet
from pipeline.model.weights import load_weights

CIFAR_LAYOUT = {
    "block_out_channels": (32, 64, 64, 64),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "sample_size": 32,
}
LSUN_LAYOUT = {
    "block_out_channels": (32, 32, 64, 64, 128, 128),
    "down_block_types": ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    "sample_size": 256,
}


def assert_same_function(ref, ours, resolution, batch=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, resolution, resolution, generator=g)
    t = torch.tensor([0, 999, 500, 17][:batch])
    with torch.no_grad():
        want = ref(x, t).sample
        got = ours(x, t)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("out_channels", [3, 6])
def test_cifar10_layout_converts_exactly(tmp_path, out_channels):
    ref = ddpm_unet(CIFAR_LAYOUT, out_channels)
    ref.save_pretrained(tmp_path / "ckpt")
    ours, info = load_diffusers_unet(tmp_path / "ckpt")
    assert info["unet"]["attn_resolutions"] == [16] and info["unet"]["ch_mult"] == [1, 2, 2, 2]
    assert len(info["sha256"]) == 64
    assert_same_function(ref, ours, 32)


def test_lsun_256_layout_converts_exactly(tmp_path):
    ref = ddpm_unet(LSUN_LAYOUT)
    ref.save_pretrained(tmp_path / "ckpt", safe_serialization=False)  # the .bin format
    ours, info = load_diffusers_unet(tmp_path / "ckpt")
    assert info["unet"]["ch_mult"] == [1, 1, 2, 2, 4, 4]
    assert info["unet"]["attn_resolutions"] == [16]
    assert_same_function(ref, ours, 256, batch=1)


def test_deprecated_attention_names_and_pipeline_folder(tmp_path):
    """Early conversions name attention tensors query/key/value/proj_attn; pipelines nest unet/."""
    ref = ddpm_unet(CIFAR_LAYOUT)
    folder = tmp_path / "pipe" / "unet"
    ref.save_pretrained(folder, safe_serialization=False)
    sd = torch.load(folder / "diffusion_pytorch_model.bin", weights_only=True)
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value."}
    renames[".to_out.0."] = ".proj_attn."
    old = {}
    for key, value in sd.items():
        for new, dep in renames.items():
            key = key.replace(new, dep)
        old[key] = value
    assert any(".query." in k for k in old)
    torch.save(old, folder / "diffusion_pytorch_model.bin")
    ours, _ = load_diffusers_unet(tmp_path / "pipe")
    assert_same_function(ref, ours, 32)


def _save_state(folder, sd):
    from safetensors.torch import save_file

    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))


def test_missing_and_unexpected_keys_are_named(tmp_path):
    ref = ddpm_unet(CIFAR_LAYOUT)
    ref.save_pretrained(tmp_path / "ckpt")
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    del sd["down_blocks.1.attentions.0.to_k.weight"]
    sd["extra.weight"] = torch.zeros(1)
    _save_state(tmp_path / "ckpt", sd)
    with pytest.raises(ConversionError, match=r"down\.1\.attns\.0\.qkv\.weight.*unexpected.*extra"):
        load_diffusers_unet(tmp_path / "ckpt")


def test_wrong_shape_is_named(tmp_path):
    ref = ddpm_unet(CIFAR_LAYOUT)
    ref.save_pretrained(tmp_path / "ckpt")
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    sd["conv_in.weight"] = torch.zeros(32, 3, 5, 5)
    _save_state(tmp_path / "ckpt", sd)
    with pytest.raises(ConversionError, match=r"conv_in\.weight.*\(32, 3, 5, 5\).*\(32, 3, 3, 3\)"):
        load_diffusers_unet(tmp_path / "ckpt")


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("flip_sin_to_cos", True, "flip_sin_to_cos = True is not the DDPM U-Net"),
        ("attention_head_dim", 8, "single-head attention"),
        ("downsample_padding", 1, "downsample_padding = 1"),
        ("down_block_types", ["CrossAttnDownBlock2D"] * 4, "down_block_types"),
    ],
)
def test_unsupported_config_is_rejected(tmp_path, key, value, match):
    ref = ddpm_unet(CIFAR_LAYOUT)
    ref.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config[key] = value
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=match):
        load_diffusers_unet(tmp_path / "ckpt")


def test_cli_writes_weights_and_reports_errors_in_one_line(tmp_path):
    ref = ddpm_unet(CIFAR_LAYOUT)
    ref.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "ema.pt"
    cli = [sys.executable, "-m", "pipeline.model.convert"]
    done = subprocess.run([*cli, str(tmp_path / "ckpt"), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ours, meta = load_weights(out)
    assert meta["source"] == "diffusers"
    assert_same_function(ref, ours, 32)
    missing = tmp_path / "nowhere"
    bad = subprocess.run([*cli, str(missing), str(out)], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"error: {missing}: no such checkpoint folder"]
