"""Data: prepared uint8 image sets (stage ``prepare``) and the loaders that read them.

Sources (``presets.<scale>.data.dataset``): ``cifar10`` (the official python archive),
``lsun_*`` (the LSUN project's LMDBs) and ``synthetic`` (procedural images for offline runs).
The on-disk format is described in :mod:`pipeline.data.manifest`; :mod:`pipeline.data.imageviews`
reads a lazy prefix of an image set. Imports only the base modules: no Ray, MLflow or DVC.
"""

from pipeline.data.loaders import (
    ImageSet,
    TrainBatches,
    eval_batches,
    open_split,
    to_model_input,
    to_uint8,
)
from pipeline.data.manifest import read_manifest
from pipeline.data.prepare import prepare, summary

__all__ = [
    "ImageSet",
    "TrainBatches",
    "eval_batches",
    "open_split",
    "prepare",
    "read_manifest",
    "summary",
    "to_model_input",
    "to_uint8",
]
