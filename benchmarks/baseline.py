"""The comparison point: diffusers' UNet2DModel + DDPMScheduler in the DDPM configuration.

Same layout as ours (pipeline.model.unet: ch, ch_mult, 2 blocks per level, single-head attention at
16x16, TF-style downsampling padding, sinusoidal embedding with freq shift 1), so both do the
same arithmetic; diffusers is a dev dependency only.
"""

from __future__ import annotations

from typing import Any

from pipeline.model.unet import UNet


def diffusers_unet(ours: UNet) -> Any:
    """A randomly initialised diffusers UNet2DModel with ``ours``' architecture."""
    from diffusers import UNet2DModel

    k = ours.init_kwargs
    widths = [k["ch"] * m for m in k["ch_mult"]]
    res = [k["resolution"] // 2**i for i in range(len(widths))]
    down = ["AttnDownBlock2D" if r in k["attn_resolutions"] else "DownBlock2D" for r in res]
    return UNet2DModel(
        sample_size=k["resolution"],
        in_channels=k["in_channels"],
        out_channels=k["out_channels"],
        block_out_channels=tuple(widths),
        down_block_types=tuple(down),
        up_block_types=tuple(t.replace("Down", "Up") for t in reversed(down)),
        layers_per_block=k["num_res_blocks"],
        attention_head_dim=None,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_eps=1e-6,
        norm_num_groups=k["norm_groups"],
        dropout=k["dropout"],
        act_fn="silu",
    )


def diffusers_scheduler(num_timesteps: int = 1000) -> Any:
    """DDPMScheduler with the paper's linear schedule and sigma_t^2 = beta_t."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=num_timesteps,
        beta_start=1e-4 * 1000 / num_timesteps,
        beta_end=0.02 * 1000 / num_timesteps,
        beta_schedule="linear",
        variance_type="fixed_large",
        clip_sample=True,
    )
