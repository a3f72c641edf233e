"""Where each stage reads and writes, relative to the project root (DVC's working directory).

One function per output so that stages, tests and dvc.yaml agree. Ray workers run in another
directory: pass them ``.resolve()``d paths.

The per-variant functions take the name of a variant's outputs: the variant's own name for its
main training seed (params.yaml ``seeds[0]``), ``<variant>-s<k>`` for a further seed k
(``Config.run_key``): models/eps_fixed_mse-s1/ beside models/eps_fixed_mse/, never inside it
(DVC refuses an output inside another stage's).
"""

from __future__ import annotations

from pathlib import Path

DATA = Path("data")
REFERENCE = Path("reference")
FEATURENET = Path("featurenet")
MODELS = Path("models")
CHECKPOINTS = Path("checkpoints")
SAMPLES = Path("samples")
WORK = Path("work")
FIDELITY_CACHE = WORK / "fidelity"  # torch-fidelity weights and statistics caches
METRICS = Path("metrics")
PLOTS = Path("plots")
FIGURES = Path("figures")
REPORTS = Path("reports")
EXPORT = Path("export")


def data_dir(scale: str) -> Path:
    """Prepared images of a scale: train/test uint8 arrays (or shards) and manifest.json."""
    return DATA / scale


def reference_dir(scale: str) -> Path:
    """Cached Inception statistics of the reference splits (shared by every variant)."""
    return REFERENCE / scale


def classifier_path(scale: str) -> Path:
    """The feature network of a scale (stage featurenet; eval.inception_weights: classifier)."""
    return FEATURENET / scale / "classifier.pt"


def model_dir(variant: str) -> Path:
    """Final weights of a variant: ema.pt (what sampling uses), model.pt, model.json."""
    return MODELS / variant


def checkpoint_dir(variant: str) -> Path:
    """Ray Train storage of a variant (no DVC output: its files differ from run to run; a
    rerun resumes from it by the run's name)."""
    return CHECKPOINTS / variant


def samples_dir(variant: str) -> Path:
    """Merged samples of a variant: samples.npz and manifest.json."""
    return SAMPLES / variant


def work_dir(stage: str, variant: str) -> Path:
    """Resumable per-block shards of a stage (persistent DVC out, never cached)."""
    return WORK / stage / variant


def metrics_path(variant: str) -> Path:
    """DVC metrics of a variant."""
    return METRICS / f"{variant}.json"


def plots_dir(variant: str) -> Path:
    """DVC plots data (CSV) of a variant."""
    return PLOTS / variant


def figures_dir(variant: str) -> Path:
    """PNG figures of a variant (also logged to MLflow)."""
    return FIGURES / variant


def export_dir(variant: str) -> Path:
    """A variant's model leaving the pipeline: a diffusers folder with its model card."""
    return EXPORT / variant
