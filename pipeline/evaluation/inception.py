"""Inception-v3 weights for FID and IS: torch-fidelity's official file, a local copy, or a stand-in.

``eval.inception_weights`` picks the source:

- ``default``: torch-fidelity's port of the TensorFlow weights (``OFFICIAL_FILE``), downloaded
  by torch.hub into ``$TORCH_HOME/hub/checkpoints`` on first use and checked against its sha256.
- a path: a local copy of that file for machines without internet, checked against
  ``eval.inception_sha256`` (required).
- ``classifier`` (synthetic data only): not Inception but the small classifier that the
  ``featurenet`` stage trains on the synthetic training split (``pipeline.evaluation.featurenet``):
  its
  penultimate activations for FID, its logits for IS, through torch-fidelity as a registered
  feature extractor. Informative on these images, but not comparable to published numbers.
- ``stand-in``: the same architecture with seeded He-normal weights, built locally and cached.
  Its features vary with the input, so FID still ranks image sets, but no number is comparable
  to a published one and IS is ~1 (uninformative). torch-fidelity's own initialisation would be
  useless: every input gives the same features (FID ~1e-16, IS 1.0).

Each source has an identity (``inception-<sha256[:12]>`` for real weights, ``stand-in-<sha[:12]>``)
that keys the statistics cache, so statistics of different weights never mix.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

from pipeline.atomic import atomic_path
from pipeline.errors import ConfigError, DataError
from pipeline.model.weights import sha256_file

OFFICIAL_FILE = "weights-inception-2015-12-05-6726825d.pth"
OFFICIAL_URL = tf_inception.URL_INCEPTION_V3
OFFICIAL_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
STAND_IN_SEED = 0
STAND_IN_IS_NOTE = "IS under stand-in Inception weights is ~1 and uninformative"


@dataclass(frozen=True)
class InceptionWeights:
    """The weights torch-fidelity's InceptionV3 feature extractor loads."""

    path: Path | None  # a state_dict file; None would let torch-fidelity download its own
    identity: str  # cache key: inception-<sha12> (real weights) | stand-in-<sha12>
    stand_in: bool  # True unless these are the official weights: not comparable to papers
    sha256: str | None = None
    extractor: str = "inception-v3-compat"  # torch-fidelity's registered feature extractor
    fid_layer: str = "2048"  # its feature for FID (and KID)
    is_layer: str = "logits_unbiased"  # its feature for IS (softmax taken by torch-fidelity)


def official_weights() -> InceptionWeights:
    """torch-fidelity's weights from the torch.hub cache, downloaded there when missing."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / OFFICIAL_FILE
    if not path.is_file():
        _download_official(path)
    found = sha256_file(path)
    if found != OFFICIAL_SHA256:
        raise DataError(
            f"{path}: sha256 mismatch: expected {OFFICIAL_SHA256}, found {found} "
            "(delete the file to download it again)"
        )
    return InceptionWeights(path, f"inception-{found[:12]}", stand_in=False, sha256=found)


def local_weights(path: Path, expected_sha256: str | None) -> InceptionWeights:
    """A local weights file, checked against ``expected_sha256`` (eval.inception_sha256)."""
    if not path.is_file():
        raise DataError(
            f"eval.inception_weights: {path}: no such file (give a local copy of "
            f"{OFFICIAL_FILE}, `default` to download it, or `stand-in`)"
        )
    found = sha256_file(path)
    if not expected_sha256:
        raise ConfigError(
            f"eval.inception_sha256 must be set for the local weights file {path} "
            f"(this file's sha256 is {found}; the official {OFFICIAL_FILE} has {OFFICIAL_SHA256})"
        )
    if found != expected_sha256.strip().lower():
        raise DataError(
            f"{path}: sha256 mismatch: expected {expected_sha256} (eval.inception_sha256), "
            f"found {found}"
        )
    _check_state_dict(path)
    stand_in = found != OFFICIAL_SHA256
    return InceptionWeights(path.resolve(), f"inception-{found[:12]}", stand_in, found)


def stand_in_weights(weights_dir: Path, seed: int = STAND_IN_SEED) -> InceptionWeights:
    """The stand-in's state_dict file under ``weights_dir``, built once (same bytes each time)."""
    path = Path(weights_dir) / f"stand-in-inception-seed{seed}.pt"
    if not path.is_file():
        # to a file object: torch.save to a path names the zip's records after the (random)
        # temporary file, so the same weights would give other bytes and another identity
        with atomic_path(path, ".pt") as tmp, tmp.open("wb") as f:
            torch.save(stand_in_state_dict(seed), f)
    found = sha256_file(path)
    return InceptionWeights(path.resolve(), f"stand-in-{found[:12]}", stand_in=True, sha256=found)


def stand_in_state_dict(seed: int = STAND_IN_SEED) -> dict[str, torch.Tensor]:
    """torch-fidelity's InceptionV3 with N(0, 2/fan_in) Conv/Linear weights, zero biases.

    BatchNorm keeps its identity defaults (mean 0, var 1, scale 1, shift 0). Deterministic: one
    CPU generator seeded with ``seed`` draws the weights in module order.
    """
    net = _bare_inception()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


class _InceptionArchitecture(tf_inception.FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 that accepts a partial state_dict (the stand-in loads none)."""

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return super().load_state_dict(state_dict, strict=False, assign=assign)


def _bare_inception() -> nn.Module:
    """The feature extractor's architecture with its initial weights (global RNG untouched):
    torch-fidelity's own constructor, given an empty state_dict in place of a weights file."""
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.random.fork_rng(devices=[]):
        return _InceptionArchitecture(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=empty
        )


def _download_official(path: Path) -> None:
    """Fetch OFFICIAL_URL to ``path`` (torch.hub writes a temporary file, then renames it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(OFFICIAL_URL, str(path), progress=True)
    except OSError as e:  # URLError, HTTPError, timeouts
        reason = getattr(e, "reason", e)
        raise DataError(
            f"cannot download the Inception weights ({reason}). Offline, download "
            f"{OFFICIAL_FILE} from {OFFICIAL_URL} elsewhere, copy it here and set "
            f"eval.inception_weights: /path/to/{OFFICIAL_FILE} and eval.inception_sha256: "
            f"{OFFICIAL_SHA256} (or eval.inception_weights: stand-in, labelled stand-in)"
        ) from None


def _check_state_dict(path: Path) -> None:
    """A clear error when ``path`` is not an InceptionV3 state_dict for torch-fidelity."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise DataError(f"{path}: not a readable weights file ({type(e).__name__})") from None
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if fc is None or tuple(fc.shape) != (1008, 2048) or "Conv2d_1a_3x3.conv.weight" not in state:
        raise DataError(
            f"{path}: not torch-fidelity InceptionV3 weights (a state_dict like {OFFICIAL_FILE})"
        )
