"""Synthetic images: deterministic per index, structured, diverse, cheap; labelled synthetic."""

from __future__ import annotations

import numpy as np
from data_formats import data_config

from pipeline.data import open_split, prepare
from pipeline.data.synthetic import LABEL_NAMES, synthetic_images, synthetic_labels, uniforms


def test_image_i_depends_only_on_seed_split_and_i():
    many = synthetic_images(7, np.arange(100), 16)
    np.testing.assert_array_equal(synthetic_images(7, np.arange(37, 50), 16), many[37:50])
    np.testing.assert_array_equal(synthetic_images(7, np.array([99, 3]), 16), many[[99, 3]])
    assert not np.array_equal(synthetic_images(8, np.arange(100), 16), many)
    test = synthetic_images(7, np.arange(100), 16, split="test")
    assert not (test == many).all(axis=(1, 2, 3)).any()  # no test image repeats its train twin


def test_images_are_structured_and_diverse():
    x = synthetic_images(0, np.arange(512), 16).astype(np.float64)
    neighbours = np.abs(np.diff(x, axis=2)).mean()
    shuffled = np.abs(x - x[np.random.default_rng(0).permutation(512)]).mean()
    assert neighbours < 0.15 * shuffled  # smooth within an image, different between images
    assert (x.std(axis=(1, 2)) > 10).mean() > 0.9  # hardly any flat image
    assert x.std(axis=0).mean() > 40  # every pixel varies across the set
    assert x.min() == 0 or x.max() == 255


def test_any_resolution():
    for resolution in (4, 8, 33, 64):
        assert synthetic_images(0, np.arange(3), resolution).shape == (3, resolution, resolution, 3)


def test_uniforms_look_uniform():
    u = uniforms(0, 0, np.arange(20000), 3)
    assert u.min() >= 0 and u.max() < 1
    assert np.abs(u.mean(axis=0) - 0.5).max() < 0.01
    assert np.abs(np.corrcoef(u.T)[np.triu_indices(3, 1)]).max() < 0.03


def test_prepare_writes_a_manifest_that_says_synthetic(tmp_path):
    cfg = data_config(dataset="synthetic", resolution=8, n_train=1500, n_test=40, seed=4)
    manifest = prepare(cfg, tmp_path / "d")
    assert manifest["synthetic"] is True and "stand-in" in manifest["note"]
    assert manifest["splits"]["train"]["shape"] == [1500, 8, 8, 3]
    assert manifest["source"]["seed"] == 4 and manifest["params"]["n_train"] == 1500
    train, test = open_split(tmp_path / "d", "train"), open_split(tmp_path / "d", "test")
    np.testing.assert_array_equal(train[:], synthetic_images(4, np.arange(1500), 8))
    np.testing.assert_array_equal(test[:], synthetic_images(4, np.arange(40), 8, "test"))


def test_labels_follow_the_generators_choices():
    labels = synthetic_labels(0, np.arange(20000))
    np.testing.assert_array_equal(synthetic_labels(0, np.arange(37, 50)), labels[37:50])
    assert len(LABEL_NAMES) == 8 and labels.min() == 0 and labels.max() == 7
    np.testing.assert_allclose(np.bincount(labels, minlength=8) / len(labels), 1 / 8, atol=0.01)
    # read back from the pixels, independently: the mean luma of each image's corners (where
    # the shapes rarely reach) against the label's background bin, and the brighter side
    images = synthetic_images(0, np.arange(2000), 16).astype(np.float64) / 255
    luma = images @ np.array([0.299, 0.587, 0.114])
    corners = (luma[:, 0, 0] + luma[:, -1, -1] + luma[:, 0, -1] + luma[:, -1, 0]) / 4
    clear = np.abs(corners - 0.5) > 0.15
    assert ((corners > 0.5) == (labels[:2000] >= 4))[clear].mean() > 0.97
    right = luma[:, :, -2:].mean(axis=(1, 2)) - luma[:, :, :2].mean(axis=(1, 2))
    down = luma[:, -2:].mean(axis=(1, 2)) - luma[:, :2].mean(axis=(1, 2))
    seen = np.stack([right, down, -right, -down], axis=1).argmax(axis=1)
    clear = np.abs(np.abs(right) - np.abs(down)) > 0.2  # ~7% of the images
    assert (seen == labels[:2000] % 4)[clear].mean() > 0.9


def test_prepare_saves_labels_like_cifar10(tmp_path):
    cfg = data_config(dataset="synthetic", resolution=8, n_train=300, n_test=40, seed=4)
    manifest = prepare(cfg, tmp_path / "d")
    for split, count in (("train", 300), ("test", 40)):
        entry = manifest["splits"][split]["labels"]
        assert entry["path"] == f"{split}-labels.npy" and entry["names"] == LABEL_NAMES
        loaded = open_split(tmp_path / "d", split).labels
        np.testing.assert_array_equal(loaded, synthetic_labels(4, np.arange(count), split))
