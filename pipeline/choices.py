"""The choices of params.yaml and of the diffusion maths: each a ``Literal`` type, defined once.

pipeline.config reads a params value typed with one of these only if it is one of the type's
values (a ConfigError naming the allowed ones otherwise); pipeline.model takes the same types, so
mypy (``make lint``) finds a misspelt choice anywhere in the code. :func:`choices` gives the
allowed values at run time, in the order they are written here (the order error messages list).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

# The Table-2 rows (Ho et al. 2020, Sec. 3.2 and 4.2) with the official code's names
# (diffusion_utils_2.py of hojonathanho/diffusion).
MeanType = Literal["eps", "xprev", "xstart"]
"""What the network predicts: the noise eps, the posterior mean mu~ (xprev) or x_0 (xstart)."""
FixedVarType = Literal["fixedlarge", "fixedsmall"]
"""A fixed reverse-process variance: sigma_t^2 = beta_t (fixedlarge) or beta~_t (fixedsmall)."""
VarType = Literal[FixedVarType, "learned"]
"""The reverse-process variance: fixed, or learned (the network's second C channels)."""
LossType = Literal["mse", "kl"]
"""The training loss: mse on the network's target (L_simple with eps) or kl (the bound L)."""

LsunDataset = Literal["lsun_bedroom", "lsun_church_outdoor", "lsun_cat"]
Dataset = Literal["cifar10", LsunDataset, "synthetic"]
Split = Literal["train", "test"]
FlipSource = Literal["official", "paper"]  # data.flip_source

ModelSource = Literal["trained", "checkpoint"]  # model.source
Precision = Literal["fp32", "tf32", "bf16"]  # model.precision (pipeline.model.precision)
Schedule = Literal["linear"]  # diffusion.schedule

TrainBackend = Literal["ray", "process"]  # train.backend
KlUnits = Literal["bits", "nats"]  # train.kl_units
Selection = Literal["last", "best_fid"]  # train.select
InceptionDevice = Literal["auto", "cpu", "cuda"]  # eval.inception_device


def choices(literal: Any) -> tuple[str, ...]:
    """The values of a Literal type of this module, e.g. ``("eps", "xprev", "xstart")``."""
    return tuple(get_args(literal))


MEAN_TYPES = choices(MeanType)
VAR_TYPES = choices(VarType)
LOSS_TYPES = choices(LossType)
DATASETS = choices(Dataset)
LSUN_DATASETS = choices(LsunDataset)
PRECISIONS = choices(Precision)
