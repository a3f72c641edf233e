"""Which network scores FID and IS: ``eval.inception_weights`` resolved to weights to load.

The official, local or stand-in Inception weights (:mod:`pipeline.evaluation.inception`) or the
synthetic set's classifier (:mod:`pipeline.evaluation.featurenet`). Both own modules import only
the weights type from ``inception``; this module is the one place that chooses between them.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import layout
from pipeline.errors import ConfigError
from pipeline.evaluation.featurenet import classifier_weights
from pipeline.evaluation.inception import (
    InceptionWeights,
    local_weights,
    official_weights,
    stand_in_weights,
)


def project_inception_weights(cfg, root: Path = Path(".")) -> InceptionWeights:
    """The weights every scoring of the project uses (reference, evaluate, evaluation during
    training): ``cfg.eval.inception_weights`` resolved with the cache in ``root/work/fidelity``
    and the featurenet stage's classifier of ``cfg.scale``."""
    root = Path(root)
    classifier = root / layout.classifier_path(cfg.scale)
    return resolve_inception_weights(cfg.eval, root / layout.FIDELITY_CACHE, classifier)


def resolve_inception_weights(
    eval_cfg, cache_root: Path, classifier: Path | None = None
) -> InceptionWeights:
    """The weights named by ``eval_cfg.inception_weights`` (an EvalConfig), ready to load.

    ``cache_root`` holds the stand-in (``weights/``); real weights live where torch.hub keeps
    them or where the user put them; ``classifier`` is the featurenet stage's file (used only
    when the choice is ``classifier``).
    """
    choice = eval_cfg.inception_weights
    if choice == "classifier":
        if classifier is None:
            raise ConfigError("eval.inception_weights: classifier needs the featurenet stage")
        return classifier_weights(Path(classifier))
    if choice == "stand-in":
        return stand_in_weights(Path(cache_root) / "weights")
    if choice == "default":
        return official_weights()
    return local_weights(Path(choice), eval_cfg.inception_sha256)
