"""ddpm-repro: a reproduction pipeline for Denoising Diffusion Probabilistic Models.

The library is importable without side effects; each idea lives in one module named after it
(``diffusion``, ``unet``, ``config``, ...). The DVC stages in ``stages/`` are thin wrappers.
"""

__version__ = "0.1.0"
