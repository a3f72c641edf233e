"""The arithmetic the network computes in: one setting (``model.precision``) for training,
sampling, the NLL bound and the scorer of evaluation during training.

- ``fp32``: full float32 on every device: on a GPU, TF32 is switched off explicitly for
  matmuls and cuDNN convolutions (PyTorch's defaults differ: TF32 convolutions, float32
  matmuls). On the CPU nothing changes: results are bit-identical to those of earlier versions.
- ``tf32``: TF32 tensor cores for matmuls and convolutions on a GPU (Ampere and later; 10-bit
  mantissa inputs, float32 accumulation); the CPU has no TF32 and computes in float32.
- ``bf16``: bf16 autocast (float32 weights and accumulation, bf16 matmul/convolution inputs),
  on a GPU with TF32 off for what autocast leaves in float32; on the CPU the same autocast.

The setting is part of every key of computed work (training run identity when not fp32, sample
and NLL block keys), of the sample manifest and of the MLflow params (``model.precision``).
The legacy ``train.bf16`` / ``sample.bf16`` flags still turn bf16 autocast on for their stage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from pipeline.choices import PRECISIONS, Precision


def set_matmul_precision(precision: Precision, device_type: str) -> None:
    """TF32 on (``tf32``) or off (``fp32``, ``bf16``) for CUDA matmuls and cuDNN convolutions,
    explicitly, for this process. A no-op on the CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if device_type == "cuda":
        tf32 = precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


@contextlib.contextmanager
def compute_precision(precision: Precision, device_type: str, bf16: bool = False) -> Iterator[None]:
    """The block runs in ``precision`` on ``device_type`` (cpu | cuda): the TF32 flags set
    (and restored afterwards) on CUDA, bf16 autocast for ``bf16`` (or the legacy ``bf16``
    flag). With fp32 on the CPU it changes nothing."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_matmul_precision(precision, device_type)
    try:
        if precision == "bf16" or bf16:
            with torch.autocast(device_type, dtype=torch.bfloat16):
                yield
        else:  # no autocast context at all: fp32 on the CPU is what it always was
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
