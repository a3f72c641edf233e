"""The weights file format shared by training, the checkpoint converter, sampling and evaluation.

A weights file (``models/<variant>/ema.pt`` and ``model.pt``) is a ``torch.save``d dict:
``format``, ``unet`` (the UNet constructor's keyword arguments), ``state_dict`` and ``meta``
(variant, diffusion settings, step, provenance). No pickled modules: loading needs only this
project's UNet class.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic import atomic_path
from pipeline.errors import DataError
from pipeline.model.unet import UNet

FORMAT = "ddpm-repro/unet-v1"


def unet_kwargs(model: UNet) -> dict[str, Any]:
    """The constructor arguments that rebuild ``model``'s architecture."""
    return dict(model.init_kwargs)


def save_weights(path: str | Path, model: UNet, meta: dict[str, Any]) -> None:
    """Save ``model``'s state dict, architecture and ``meta`` to ``path``, atomically."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "unet": unet_kwargs(model), "state_dict": state, "meta": meta}
    # Through a file object: torch.save names the zip's records after a *path* it is given,
    # which would put the random temporary name into the bytes.
    with atomic_path(path, ".pt") as tmp, tmp.open("wb") as f:
        torch.save(payload, f)


def load_weights(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[UNet, dict[str, Any]]:
    """Rebuild the UNet saved at ``path``; returns (model in eval mode, meta)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no weights file (run the train stage first)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise DataError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} weights file")
    model = UNet(**payload["unet"])
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), payload["meta"]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
