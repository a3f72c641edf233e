"""The paper's denoising network (official ``unet.py``, "Model").

A U-Net after PixelCNN++: residual blocks with GroupNorm and Swish, the timestep's sinusoidal
embedding added into every residual block, single-head self-attention at the 16x16 resolution,
stride-2 convolutions padded like TensorFlow's "SAME" to downsample, nearest-neighbour
upsampling followed by a convolution. Initialisation follows the official code: variance
scaling (fan_avg, uniform), with the last layer of each residual branch, of each attention block
and of the network starting at (nearly) zero.

CIFAR10: ch 128, ch_mult (1, 2, 2, 2), 2 blocks per level, dropout 0.1: 35,746,307 parameters.
LSUN/CelebA-HQ 256: ch_mult (1, 1, 2, 2, 4, 4), dropout 0.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import ModelConfig

GROUPNORM_EPS = 1e-6  # TensorFlow's group_norm default, which the official code used


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of integer timesteps: [B] -> [B, dim] float32, sines then cosines.

    Frequencies are 10000^(-i / (dim/2 - 1)) for i = 0 .. dim/2 - 1, as in the official code.
    """
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / max(half - 1, 1))
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _init_(layer: nn.Conv2d | nn.Linear, scale: float = 1.0) -> None:
    """TensorFlow variance_scaling(scale, 'fan_avg', 'uniform'); scale 0 means 1e-10; zero bias."""
    scale = 1e-10 if scale == 0 else scale
    receptive = layer.weight[0, 0].numel() if layer.weight.ndim > 2 else 1
    fan_in = layer.weight.shape[1] * receptive
    fan_out = layer.weight.shape[0] * receptive
    limit = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2.0))
    with torch.no_grad():
        layer.weight.uniform_(-limit, limit)
        if layer.bias is not None:
            layer.bias.zero_()


def memory_format(x: Tensor) -> torch.memory_format:
    """channels_last if x is laid out so (and not also plain contiguous), else contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class Conv2d(nn.Conv2d):
    """nn.Conv2d that, for float32 on the CPU, always runs oneDNN's convolution.

    PyTorch picks its own or oneDNN's CPU kernel by batch size and thread count (a batch of one,
    or 1x1 kernels with fewer than 16 images on one thread, take its own), and the two round
    differently. Calling oneDNN directly makes an image's output independent of the batch it is
    in, which per-image reproducible sampling needs. GPUs, autocast and
    ``torch.backends.mkldnn.flags(enabled=False)`` use F.conv2d.
    """

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu")
        ):
            padding = cast("tuple[int, ...]", self.padding)  # conv() never passes a string
            return torch.mkldnn_convolution(
                x, self.weight, self.bias, padding, self.stride, self.dilation, self.groups
            )
        return super().forward(x)


def conv(
    in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, init_scale: float = 1.0
) -> Conv2d:
    """Conv2d with 'same' padding for stride 1 (padding 0 for the stride-2 downsampler)."""
    layer = Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2 if stride == 1 else 0)
    _init_(layer, init_scale)
    return layer


class Dense(nn.Linear):
    """A linear layer computed row by row, so that a row's result does not depend on the batch.

    ``nn.Linear`` hands the whole batch to one GEMM whose blocking (and so its rounding) depends
    on the batch size; a batched matrix-vector product gives each image the same arithmetic in
    any batch. Sampling relies on this: an image's samples are bit-identical whatever batch size
    or number of workers drew them. These layers only see the timestep embedding: the cost is
    negligible next to the convolutions.
    """

    def forward(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        weight = self.weight.t().expand(B, *self.weight.t().shape)
        return torch.baddbmm(self.bias.expand(B, 1, -1), x.unsqueeze(1), weight).squeeze(1)


def dense(in_features: int, out_features: int, init_scale: float = 1.0) -> Dense:
    layer = Dense(in_features, out_features)
    _init_(layer, init_scale)
    return layer


def norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=GROUPNORM_EPS)


class ResnetBlock(nn.Module):
    """GN, swish, conv3x3, + dense(swish(temb)), GN, swish, dropout, conv3x3; 1x1 skip if needed."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = norm(in_ch, groups)
        self.conv1 = conv(in_ch, out_ch)
        self.temb_proj = dense(temb_ch, out_ch)
        self.norm2 = norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(out_ch, out_ch, init_scale=0.0)
        self.nin_shortcut = conv(in_ch, out_ch, kernel=1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        out: Tensor = self.nin_shortcut(x) + h  # (nn.Module calls are typed Any)
        return out


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with a residual connection.

    q, k, v are 1x1 convolutions of the normalised input (one fused conv here); the weights are
    softmax(q k^T / sqrt(C)) as in the official code (computed by scaled_dot_product_attention).
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = norm(channels, groups)
        self.qkv = Conv2d(channels, 3 * channels, 1)
        assert self.qkv.bias is not None
        for i in range(3):  # initialise q, k and v like three separate 1x1 layers
            part = nn.Conv2d(channels, channels, 1)
            _init_(part)
            assert part.bias is not None
            with torch.no_grad():
                self.qkv.weight[i * channels : (i + 1) * channels] = part.weight
                self.qkv.bias[i * channels : (i + 1) * channels] = part.bias
        self.proj_out = conv(channels, channels, kernel=1, init_scale=0.0)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        # Back to [B, C, H, W] in x's own memory layout (the view's strides are ambiguous).
        h = h.transpose(1, 2).reshape(B, C, H, W).contiguous(memory_format=memory_format(x))
        out: Tensor = x + self.proj_out(h)
        return out


class Downsample(nn.Module):
    """Stride-2 conv3x3 with TensorFlow 'SAME' padding: pad right and bottom by one."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv(channels, channels, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.conv(F.pad(x, (0, 1, 0, 1)))
        return out


class Upsample(nn.Module):
    """Nearest-neighbour x2, then conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return out


class Level(nn.Module):
    """The residual blocks (each optionally followed by attention) of one resolution."""

    def __init__(self, blocks: list[ResnetBlock], attns: list[nn.Module], resample: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)
        self.resample = resample


class UNet(nn.Module):
    """The DDPM U-Net: ``model(x, t)`` with x [B, in_channels, R, R] and t long [B].

    Returns [B, out_channels, R, R] (out_channels = 2 * in_channels for a learned variance).
    """

    def __init__(
        self,
        resolution: int = 32,
        in_channels: int = 3,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.1,
        norm_groups: int = 32,
    ):
        super().__init__()
        levels = len(ch_mult)
        if resolution % 2 ** (levels - 1):
            raise ValueError(
                f"resolution {resolution} is not divisible by 2^{levels - 1} "
                f"(ch_mult has {levels} levels)"
            )
        widths = [ch * m for m in (1, *ch_mult)]
        if any(w % norm_groups for w in widths):
            raise ValueError(
                f"every width {sorted(set(widths))} must divide into {norm_groups} groups"
            )
        self.init_kwargs = {
            "resolution": resolution,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "ch": ch,
            "ch_mult": list(ch_mult),
            "num_res_blocks": num_res_blocks,
            "attn_resolutions": list(attn_resolutions),
            "dropout": dropout,
            "norm_groups": norm_groups,
        }
        self.resolution, self.in_channels, self.out_channels = resolution, in_channels, out_channels
        self.ch = ch
        temb_ch = 4 * ch

        self.temb_dense0 = dense(ch, temb_ch)
        self.temb_dense1 = dense(temb_ch, temb_ch)
        self.conv_in = conv(in_channels, ch)

        def block(i: int, o: int) -> ResnetBlock:
            return ResnetBlock(i, o, temb_ch, dropout, norm_groups)

        def attn(c: int, res: int) -> nn.Module:
            return AttnBlock(c, norm_groups) if res in attn_resolutions else nn.Identity()

        # Downsampling: remember every output's width for the skip connections.
        skip_widths, width, res = [ch], ch, resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(block(width, ch * mult))
                width = ch * mult
                attns.append(attn(width, res))
                skip_widths.append(width)
            last = i == levels - 1
            self.down.append(Level(blocks, attns, nn.Identity() if last else Downsample(width)))
            if not last:
                skip_widths.append(width)
                res //= 2

        self.mid_block_1 = block(width, width)
        self.mid_attn_1 = AttnBlock(width, norm_groups)
        self.mid_block_2 = block(width, width)

        # Upsampling: num_res_blocks + 1 blocks per level, each eating one skip connection.
        up: list[Level] = []
        for i, mult in reversed(list(enumerate(ch_mult))):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(block(width + skip_widths.pop(), ch * mult))
                width = ch * mult
                attns.append(attn(width, res))
            up.append(Level(blocks, attns, Upsample(width) if i != 0 else nn.Identity()))
            if i != 0:
                res *= 2
        self.up = nn.ModuleList(reversed(up))  # self.up[i] is level i, as in the official code

        self.norm_out = norm(width, norm_groups)
        self.conv_out = conv(width, out_channels, init_scale=0.0)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        temb = timestep_embedding(t, self.ch).to(self.temb_dense0.weight.dtype)
        temb = self.temb_dense1(F.silu(self.temb_dense0(temb)))

        hs = [self.conv_in(x)]
        for level in cast("list[Level]", self.down):
            for blk, att in zip(level.blocks, level.attns, strict=True):
                hs.append(att(blk(hs[-1], temb)))
            if not isinstance(level.resample, nn.Identity):
                hs.append(level.resample(hs[-1]))

        h = self.mid_block_2(self.mid_attn_1(self.mid_block_1(hs[-1], temb)), temb)

        for level in reversed(cast("list[Level]", self.up)):
            for blk, att in zip(level.blocks, level.attns, strict=True):
                h = att(blk(torch.cat([h, hs.pop()], dim=1), temb))
            h = level.resample(h)

        out: Tensor = self.conv_out(F.silu(self.norm_out(h)))
        return out


def build_unet(cfg: ModelConfig, resolution: int, out_channels: int = 3) -> UNet:
    """The U-Net of the params' model section for images of side ``resolution``."""
    return UNet(
        resolution=resolution,
        in_channels=3,
        out_channels=out_channels,
        ch=cfg.ch,
        ch_mult=tuple(cfg.ch_mult),
        num_res_blocks=cfg.num_res_blocks,
        attn_resolutions=tuple(cfg.attn_resolutions),
        dropout=cfg.dropout,
        norm_groups=cfg.norm_groups,
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
