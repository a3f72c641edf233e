"""ddpm-repro: a reproduction pipeline for Denoising Diffusion Probabilistic Models.

The library is importable without side effects. Each idea lives in one module named after it,
grouped in wings; imports point down only (the import-linter contracts in pyproject.toml):

- base modules here: ``config``, ``layout``, ``errors``, ``atomic``, ``cli`` (import no wing);
- ``model`` (diffusion maths, U-Net) and ``data`` (sources, manifests, loaders);
- ``report`` (paper numbers, tables, MLflow tracking);
- ``cluster`` (Ray, storage, durable runs, blocks, GPU tasks, progress);
- ``sampling``, then ``evaluation``, then ``training``.

The DVC stages in ``stages/`` are thin wrappers on top.
"""

__version__ = "0.1.0"
