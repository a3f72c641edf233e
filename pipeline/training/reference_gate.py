"""What training reads of the reference statistics, as a file DVC can depend on.

DVC's templating cannot make a stage's dependency list depend on a parameter (no nested
``${presets.${scale}...}``, no list interpolation in ``deps``), yet training reads
reference/<scale>/train-stats.pt only when the preset evaluates during training
(``train.eval_every > 0``, ``train.select: best_fid``). Stage ``train_reference`` depends on
reference/<scale> and writes ``work/train-reference/<scale>.json``; every ``train@<variant>``
depends on that file:

- eval_every > 0: the file names the statistics and their sha256 and holds the resolved
  ``sample`` and ``eval`` sections (the evaluations during training read them), so a changed
  reference or setting changes it and reruns the training's checkpoint selection;
- eval_every = 0 (smoke, tiny): the file's content is constant, so a changed reference or
  sample/eval setting reruns only this seconds-long stage and never the training.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.atomic import write_text
from pipeline.config import Config
from pipeline.errors import DataError
from pipeline.layout import WORK, reference_dir

NOT_READ = {"reads_reference": False}


def gate_path(scale: str) -> Path:
    """work/train-reference/<scale>.json (dvc.yaml: train_reference's output, train's dep)."""
    return WORK / "train-reference" / f"{scale}.json"


def gate_content(cfg: Config, root: Path = Path(".")) -> dict:
    """The file's content: NOT_READ, or the train statistics' path and sha256 and the
    settings the evaluations during training read."""
    if cfg.train.eval_every <= 0:
        return dict(NOT_READ)
    stats = reference_dir(cfg.scale) / "train-stats.pt"
    if not (root / stats).is_file():
        raise DataError(f"{stats}: missing; run the reference stage (dvc repro reference)")
    digest = hashlib.sha256((root / stats).read_bytes()).hexdigest()
    settings = cfg.section_dict("sample", "eval")
    return {"reads_reference": True, "file": str(stats), "sha256": digest, "settings": settings}


def write_gate(cfg: Config, root: Path = Path(".")) -> Path:
    """Write the scale's file (atomically, same bytes for the same content); returns its path."""
    path = root / gate_path(cfg.scale)
    write_text(path, json.dumps(gate_content(cfg, root), sort_keys=True) + "\n")
    return path
