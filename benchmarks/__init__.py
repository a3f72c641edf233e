"""Benchmarks of the pipeline (see benchmarks/README.md)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_RESULTS = Path(__file__).parent / "results"


def results_dir() -> Path:
    """Where results files go (created): ``$DDPM_BENCH_RESULTS`` (tests), else ``results/``."""
    folder = Path(os.environ.get("DDPM_BENCH_RESULTS") or DEFAULT_RESULTS)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
