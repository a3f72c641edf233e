"""The feature network (pipeline.evaluation.featurenet): trained on the synthetic labels, it makes
FID and IS through torch-fidelity discriminate: real test images score close to the training set,
degraded ones monotonically worse, IS near the classes' diversity, one repeated image IS ~1.

One classifier is trained per module (8x8 images, seconds) and shared.
"""

from __future__ import annotations

import itertools
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from pipeline.data.synthetic import LABEL_NAMES, synthetic_images, synthetic_labels
from pipeline.errors import DataError
from pipeline.evaluation import featurenet, fidelity
from pipeline.evaluation.fidelity import compute_fid_is, compute_reference_stats
from pipeline.evaluation.inception import InceptionWeights
from pipeline.model.weights import sha256_file

RES = 8
N_TRAIN, N_TEST = 1024, 256


@pytest.fixture(scope="module")
def net(tmp_path_factory) -> types.SimpleNamespace:
    train = synthetic_images(0, np.arange(N_TRAIN), RES)
    test = synthetic_images(0, np.arange(N_TEST), RES, "test")
    y_train = synthetic_labels(0, np.arange(N_TRAIN))
    y_test = synthetic_labels(0, np.arange(N_TEST), "test")
    trained = featurenet.train_classifier(
        train, y_train, test, y_test, len(LABEL_NAMES), epochs=10, seed=0
    )
    root = tmp_path_factory.mktemp("featurenet")
    path = root / "classifier.pt"
    featurenet.save_classifier(trained.net, path)
    weights = featurenet.classifier_weights(path)
    ref = compute_reference_stats(
        train, "train", weights, root / "cache", root / "ref", is_splits=2
    )
    return types.SimpleNamespace(
        trained=trained, weights=weights, root=root, ref=ref, train=train, test=test
    )


def fid_is(net, images: np.ndarray) -> dict:
    return compute_fid_is(images, {"train": net.ref}, net.weights, net.root / "cache", 2)


def test_classifier_learns_the_labels(net):
    assert net.trained.test_accuracy > 0.4  # chance: 1/8 (16x16, 2048 images: ~0.73)
    assert net.trained.train_accuracy >= net.trained.test_accuracy - 0.05


def test_weights_file_reloads_with_weights_only(net, tmp_path):
    payload = torch.load(net.weights.path, weights_only=True)
    assert payload["format"] == featurenet.FORMAT and payload["arch"]["resolution"] == RES
    again = tmp_path / "again.pt"
    featurenet.save_classifier(featurenet.load_classifier(net.weights.path), again)
    assert sha256_file(again) == net.weights.sha256  # same weights, same bytes
    assert net.weights.identity == f"classifier-{net.weights.sha256[:12]}"
    assert net.weights.stand_in and net.weights.extractor == featurenet.EXTRACTOR
    (tmp_path / "bad.pt").write_bytes(b"not a file")
    with pytest.raises(DataError, match="unreadable feature network"):
        featurenet.classifier_weights(tmp_path / "bad.pt")


def test_cache_never_mixes_extractors(net, tmp_path):
    other = InceptionWeights(None, "stand-in-000000000000", stand_in=True)
    assert fidelity.cache_dir(tmp_path, other) != fidelity.cache_dir(tmp_path, net.weights)
    with pytest.raises(DataError, match="computed with Inception weights classifier-"):
        compute_fid_is(net.test[:16], {"train": net.ref}, other, tmp_path, 2)


def test_fid_of_test_split_is_small_and_degradations_monotonically_worse(net):
    rng = np.random.default_rng(0)
    test = net.test.astype(np.float64)
    base = fid_is(net, net.test)["fid_train"]

    def noise(sigma):
        return test + rng.normal(0.0, sigma, test.shape)

    def blur(s):
        return gaussian_filter(test, sigma=(0, s, s, 0))

    def shuffle(fraction):  # that fraction of each image's pixels permuted among themselves
        out = test.reshape(len(test), RES * RES, 3).copy()
        k = round(fraction * RES * RES)
        for image in out:
            idx = rng.choice(RES * RES, k, replace=False)
            image[idx] = image[rng.permutation(idx)]
        return out.reshape(test.shape)

    for name, degrade, levels in (
        ("noise", noise, (30.0, 90.0)),
        ("blur", blur, (0.7, 1.5)),
        ("shuffle", shuffle, (0.3, 1.0)),
    ):
        fids = [base]
        for level in levels:
            images = np.clip(np.rint(degrade(level)), 0, 255).astype(np.uint8)
            fids.append(fid_is(net, images)["fid_train"])
        assert all(a < b for a, b in itertools.pairwise(fids)), (name, fids)
        assert fids[-1] > 2 * base, (name, fids)


def test_inception_score_of_real_images_and_of_one_image(net):
    real = fid_is(net, net.test)
    # at most the classes' effective number exp(H(p(y))) <= 8, well above 1 when recognisable
    assert 2.0 < real["is_mean"] <= len(LABEL_NAMES)  # 8x8 here: 2.5; 16x16 (smoke): ~4
    one = fid_is(net, np.repeat(net.test[:1], 32, axis=0))
    assert one["is_mean"] == pytest.approx(1.0, abs=1e-4)


def test_confidence_separates_data_from_noise(net):
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, net.test.shape, dtype=np.uint8)
    real = featurenet.confidence(net.trained.net, net.test)
    assert real > 0.4 and featurenet.confidence(net.trained.net, noise) < real - 0.1
    scores = featurenet.classifier_scores(net.weights, net.test)
    assert scores["classifier_confidence"] == pytest.approx(real)


def test_test_accuracy_reaches_the_metrics_and_mlflow(net, tmp_path):
    """The featurenet stage's manifest beside the weights gives featurenet_test_accuracy, which
    mlflow_metrics logs next to classifier_confidence."""
    import dataclasses
    import json
    import shutil

    from pipeline.config import load_config
    from pipeline.evaluation.evaluate import Evaluation
    from pipeline.evaluation.outputs import mlflow_metrics

    assert "featurenet_test_accuracy" not in featurenet.classifier_scores(net.weights, net.test)
    path = tmp_path / "classifier.pt"
    shutil.copy(net.weights.path, path)
    (tmp_path / "manifest.json").write_text(json.dumps({"test_accuracy": 0.625}))
    weights = dataclasses.replace(net.weights, path=path)
    scores = featurenet.classifier_scores(weights, net.test)
    assert scores["featurenet_test_accuracy"] == 0.625
    result = Evaluation("v", dict(scores), {})
    logged = mlflow_metrics(load_config(None, "tiny"), result)
    assert logged["featurenet_test_accuracy"] == 0.625
    assert logged["classifier_confidence"] == pytest.approx(scores["classifier_confidence"])


def test_featurenet_stage(tmp_path, monkeypatch, capsys):
    import json

    import yaml

    from pipeline.config import load_config
    from pipeline.data import prepare
    from stages import featurenet as stage

    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["scale"] = "tiny"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DDPM_PARAMS", raising=False)
    prepare(load_config())
    stage.main([])
    out = tmp_path / "featurenet" / "tiny"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["used"] and manifest["sha256"] == sha256_file(out / "classifier.pt")
    assert manifest["classes"] == LABEL_NAMES and 0 <= manifest["test_accuracy"] <= 1
    assert manifest["stand_in"] and manifest["stand_in_note"] == featurenet.NOTE
    assert featurenet.load_classifier(out / "classifier.pt").arch["resolution"] == 8

    data = tmp_path / "data" / "tiny" / "manifest.json"  # data without labels: one error line
    raw = json.loads(data.read_text())
    del raw["splits"]["train"]["labels"]
    data.write_text(json.dumps(raw))
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        stage.main([])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: ") and "no labels" in err
    assert len(err.strip().splitlines()) == 1 and (out / "classifier.pt").is_file()

    params["presets"]["tiny"]["eval"]["inception_weights"] = "stand-in"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    stage.main([])
    assert not json.loads((out / "manifest.json").read_text())["used"]
    assert not (out / "classifier.pt").exists()
