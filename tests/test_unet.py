"""The paper's U-Net: parameter counts, the sinusoidal embedding, padding, precision modes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig
from pipeline.model.unet import UNet, build_unet, count_parameters, timestep_embedding


def small(**kw):
    args = {"resolution": 16, "ch": 32, "ch_mult": (1, 2, 2), "num_res_blocks": 1}
    return UNet(**{**args, "attn_resolutions": (8,), "dropout": 0.0, **kw})


def test_cifar10_model_has_the_official_parameter_count():
    model = build_unet(ModelConfig(), resolution=32)
    assert count_parameters(model) == 35_746_307


def test_lsun_256_model_parameter_count():
    model = build_unet(ModelConfig(ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0), resolution=256)
    assert count_parameters(model) == 113_673_219  # the paper's "114M"


def test_learned_variance_doubles_the_output_channels():
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 99])
    assert small(out_channels=6)(x, t).shape == (2, 6, 16, 16)
    assert small()(x, t).shape == (2, 3, 16, 16)


def test_timestep_embedding_matches_the_official_formula():
    t = torch.tensor([0, 1, 17, 999])
    dim, half = 64, 32
    freqs = np.exp(-math.log(10000) * np.arange(half) / (half - 1))
    args = t.numpy()[:, None] * freqs[None]
    ref = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    np.testing.assert_allclose(timestep_embedding(t, dim).numpy(), ref, atol=1e-4)


def test_downsample_pads_like_tensorflow_same():
    """Stride-2 'SAME' on an even input pads one row/column at the end only."""
    model = small()
    down = model.down[0].resample
    x = torch.randn(1, 32, 16, 16)
    ref = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    torch.testing.assert_close(down(x), ref, atol=1e-6, rtol=1e-6)
    symmetric = F.conv2d(x, down.conv.weight, down.conv.bias, stride=2, padding=1)
    assert not torch.allclose(down(x), symmetric)


def test_zero_initialised_output_and_residual_branches():
    model = small()
    assert model.conv_out.weight.abs().max() < 1e-4
    assert model.down[0].blocks[0].conv2.weight.abs().max() < 1e-4
    assert model.mid_attn_1.proj_out.weight.abs().max() < 1e-4


def test_bad_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by 2"):
        UNet(resolution=20, ch_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="32 groups"):
        UNet(resolution=16, ch=24, ch_mult=(1, 2))


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def test_channels_last_gives_the_same_output():
    model = _randomise(small()).eval()
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([1, 50, 99])
    ref = model(x, t)
    cl = model.to(memory_format=torch.channels_last)
    out = cl(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_bf16_autocast_runs_close_to_float32():
    model = _randomise(small()).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 70])
    ref = model(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    assert out.dtype == torch.bfloat16
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05


def test_dropout_only_in_training_mode():
    model = _randomise(small(dropout=0.5))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 70])
    model.eval()
    assert torch.equal(model(x, t), model(x, t))
    model.train()
    assert not torch.equal(model(x, t), model(x, t))


@pytest.mark.parametrize("threads", [1, 2])
def test_output_for_an_image_does_not_depend_on_the_batch(threads):
    """Per-image determinism that the sampler's reproducibility rests on (CPU)."""
    torch.set_num_threads(threads)
    model = _randomise(small(out_channels=6)).eval()
    x, t = torch.randn(20, 3, 16, 16), torch.arange(20) * 5
    with torch.no_grad():
        full = model(x, t)
        for k in (1, 2, 3, 4, 7, 16, 19):  # batch 1 and 1x1 kernels under 16 are special cases
            assert torch.equal(full, torch.cat([model(x[:k], t[:k]), model(x[k:], t[k:])]))
