"""A feature network for FID and IS on the synthetic images: a small classifier, not Inception.

Inception (real or the He-initialised stand-in) sees little in 16x16 procedural images: the
stand-in rates noise and data alike and gives IS 1.0. This small CNN is trained (stage
``featurenet``, seeded, seconds on a CPU) to tell the synthetic set's 10 classes
(``pipeline.data.synthetic.LABEL_NAMES``: the shapes drawn x the background's brightness). Its
penultimate activations (``FEATURES`` dims, after ReLU) replace Inception's 2048-d pool features
for FID, its logits replace Inception's for IS, through torch-fidelity as the registered feature
extractor ``EXTRACTOR`` (``eval.inception_weights: classifier``): FID and IS are still computed
by torch-fidelity. Numbers measured with it are labelled ``NOTE``.

The weights file (``featurenet/<scale>/classifier.pt``) holds only tensors and plain values
(``FORMAT``, the architecture, the state_dict), loaded with ``weights_only=True``; its sha256
names the statistics cache (``classifier-<sha12>``), so features of different networks (or of
Inception) never mix.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_fidelity
from torch import nn
from torch.nn import functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from pipeline.atomic import atomic_path
from pipeline.data import ImageSet
from pipeline.errors import DataError
from pipeline.evaluation.inception import InceptionWeights
from pipeline.model.weights import sha256_file

EXTRACTOR = "ddpm-synthetic-classifier"
FID_LAYER = "penultimate"
IS_LAYER = "logits"
FORMAT = "ddpm-repro/feature-net-v1"
# What classifier_scores adds to a variant's metrics (and its MLflow run).
CLASSIFIER_SCORES = ("classifier_confidence", "featurenet_test_accuracy")
NOTE = (
    "a classifier trained on the synthetic set, not Inception: not comparable to published numbers"
)
WIDTH = 16  # channels of the first two convolutions (twice that after the first pooling)
FEATURES = 64  # penultimate (FID feature) dimensions


class SmallClassifier(nn.Module):
    """conv3x3 x2 -> maxpool -> conv3x3 x2 -> maxpool -> linear (FEATURES, ReLU) -> linear.

    Input float [B, 3, R, R] in [-1, 1] (R divisible by 4); ``forward`` returns
    (penultimate [B, features], logits [B, classes]).
    """

    def __init__(self, resolution: int, classes: int, width: int = WIDTH, features: int = FEATURES):
        super().__init__()
        if resolution % 4:
            raise DataError(f"the feature network needs a resolution divisible by 4 ({resolution})")
        self.arch = dict(resolution=resolution, classes=classes, width=width, features=features)
        w = width
        self.conv = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.fc = nn.Linear(2 * w * (resolution // 4) ** 2, features)
        self.out = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.fc(self.conv(x).flatten(1)))
        return h, self.out(h)


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, R, R, 3] (numpy, HWC) or [N, 3, R, R] (torch) -> float [N, 3, R, R], [-1, 1]."""
    if isinstance(images, np.ndarray):
        # a copy: read-only memory maps (sample shards) would make torch warn on every stage
        images = torch.from_numpy(np.array(images, copy=True)).permute(0, 3, 1, 2)
    return images.float() * (2.0 / 255.0) - 1.0


@dataclass
class TrainedClassifier:
    """A trained network with its training record."""

    net: SmallClassifier
    train_seconds: float
    train_accuracy: float
    test_accuracy: float
    epochs: int


def train_classifier(
    train: np.ndarray,
    train_labels: np.ndarray,
    test: np.ndarray,
    test_labels: np.ndarray,
    classes: int,
    *,
    epochs: int = 12,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    threads: int | None = 1,
) -> TrainedClassifier:
    """Adam on cross-entropy over uint8 ``train`` [N, R, R, 3] with int labels [N], seeded.

    No flips (a flip changes the class: the gradient's direction); the learning rate decays
    linearly to 0. Deterministic for a given seed and thread count (seeded weights, one CPU
    generator draws the order).
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        started = time.perf_counter()
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = SmallClassifier(train.shape[1], classes)
        x, y = to_input(train), torch.as_tensor(train_labels, dtype=torch.int64)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        steps = epochs * -(-len(x) // batch_size)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
        net.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for start in range(0, len(x), batch_size):
                idx = order[start : start + batch_size]
                loss = F.cross_entropy(net(x[idx])[1], y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        net.eval()
        seconds = time.perf_counter() - started
        train_acc, test_acc = accuracy(net, train, train_labels), accuracy(net, test, test_labels)
        return TrainedClassifier(net, seconds, train_acc, test_acc, epochs)
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def predict(net: SmallClassifier, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """int64 [N]: the most likely class of each uint8 image [N, R, R, 3]."""
    out = [
        net(to_input(images[s : s + batch_size]))[1].argmax(1)
        for s in range(0, len(images), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


def accuracy(net: SmallClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``images`` classified as ``labels``."""
    return float((predict(net, images) == np.asarray(labels)).mean())


@torch.no_grad()
def confidence(net: SmallClassifier, images: np.ndarray | ImageSet, batch_size: int = 512) -> float:
    """Mean over uint8 ``images`` [N, R, R, 3] of the top class probability (1/classes: noise).

    Samples have no labels, so this stands for "accuracy on samples": how recognisable they are
    to the classifier, compared with the same figure on real test images.
    """
    top = [
        net(to_input(images[s : s + batch_size]))[1].softmax(1).amax(1)
        for s in range(0, len(images), batch_size)
    ]
    return float(torch.cat(top).mean())


def classifier_scores(weights: InceptionWeights, images: np.ndarray | ImageSet) -> dict[str, float]:
    """Scores of ``images`` when ``weights`` is the feature network, else {}.

    ``classifier_confidence`` (see :func:`confidence`) and, from the featurenet stage's manifest
    beside the weights, ``featurenet_test_accuracy``: the network's accuracy on the real test
    split, the yardstick that the confidence on samples is read against.
    """
    if weights.extractor != EXTRACTOR or weights.path is None:
        return {}
    out = {"classifier_confidence": confidence(load_classifier(weights.path), images)}
    manifest = Path(weights.path).parent / "manifest.json"
    if manifest.is_file():
        accuracy = json.loads(manifest.read_text()).get("test_accuracy")
        if accuracy is not None:
            out["featurenet_test_accuracy"] = float(accuracy)
    return out


def save_classifier(net: SmallClassifier, path: Path, meta: dict[str, Any] | None = None) -> str:
    """Write the weights file atomically (same bytes for the same weights); returns its sha256."""
    payload = {
        "format": FORMAT,
        "arch": dict(net.arch),
        "state_dict": {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()},
        **dict(meta or {}),
    }
    buffer = io.BytesIO()  # to a file object: a path would name the zip's records after it
    torch.save(payload, buffer)
    with atomic_path(path, ".pt") as tmp:
        tmp.write_bytes(buffer.getvalue())
    return sha256_file(path)


def load_classifier(path: Path) -> SmallClassifier:
    """The network in ``path`` (weights_only=True), in eval mode; a DataError if it is not one."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: missing feature network (run `dvc repro featurenet`)") from None
    except Exception as e:
        raise DataError(f"{path}: unreadable feature network ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} file (run `dvc repro featurenet`)")
    net = SmallClassifier(**payload["arch"])
    net.load_state_dict(payload["state_dict"])
    return net.eval()


def classifier_weights(path: Path) -> InceptionWeights:
    """The feature network at ``path`` as the weights that fidelity.py hands torch-fidelity."""
    load_classifier(path)  # a clear error now rather than inside torch-fidelity
    found = sha256_file(path)
    return InceptionWeights(
        path.resolve(), f"classifier-{found[:12]}", stand_in=True, sha256=found,
        extractor=EXTRACTOR, fid_layer=FID_LAYER, is_layer=IS_LAYER,
    )  # fmt: skip


class ClassifierFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity's view of the feature network: uint8 [B, 3, R, R] -> the requested features.

    ``feature_extractor_weights_path`` (torch-fidelity's keyword) names the weights file.
    """

    def __init__(self, name: str, features_list: list[str], **kwargs: Any) -> None:
        super().__init__(name, features_list)
        path = kwargs.get("feature_extractor_weights_path")
        if not path:
            raise DataError(f"the {EXTRACTOR} feature extractor needs its weights file")
        self.net = load_classifier(Path(path))

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return (FID_LAYER, IS_LAYER)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": IS_LAYER, "fid": FID_LAYER, "kid": FID_LAYER, "prc": FID_LAYER}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, R, R], got {x.dtype} {tuple(x.shape)}")
        penultimate, logits = self.net(to_input(x))
        found = {FID_LAYER: penultimate, IS_LAYER: logits}
        return tuple(found[name].float() for name in self.features_list)


if EXTRACTOR not in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(EXTRACTOR, ClassifierFeatureExtractor)
