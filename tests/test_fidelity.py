"""FID and IS through torch-fidelity (pipeline.evaluation.fidelity, pipeline.evaluation.inception)
and stage reference.

Real torch-fidelity computations on a few dozen 16x16 images with the stand-in weights; the
Fréchet distance is re-derived here in float64 from the extractor's features. One Inception
image costs ~0.1-0.3 s here and one 2048-d FID ~8 s (torch-fidelity's eigvals), so the module
shares one set of computations.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import yaml
from inception_score import inception_score
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from pipeline.config import config_from_dict
from pipeline.errors import ConfigError, DataError
from pipeline.evaluation import fidelity, inception
from pipeline.evaluation.feature_weights import resolve_inception_weights
from pipeline.evaluation.fidelity import compute_fid_is, compute_reference_stats, stand_in_label
from pipeline.evaluation.inception import InceptionWeights, stand_in_weights
from pipeline.model.weights import sha256_file

ROOT = Path(__file__).resolve().parents[1]
RES = 16


def blobs(n: int, seed: int, res: int = RES) -> np.ndarray:
    """Smooth random colour fields plus pixel noise: uint8 [n, res, res, 3]."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(n, 4, 4, 3)).repeat(res // 4, axis=1).repeat(res // 4, axis=2)
    return np.clip(128 + 60 * coarse + rng.normal(scale=10, size=coarse.shape), 0, 255).astype(
        np.uint8
    )


def add_noise(images: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """``images`` plus Gaussian noise of ``sigma`` (pixel units), clipped to uint8."""
    noise = np.random.default_rng(seed).normal(scale=sigma, size=images.shape)
    return np.clip(images + noise, 0, 255).astype(np.uint8)


def inception_features(weights: InceptionWeights, *sets: np.ndarray) -> list[np.ndarray]:
    """2048-d features [N, 2048] float64 of each image set, straight from torch-fidelity's
    extractor (not through pipeline.evaluation.fidelity or torch-fidelity's cache)."""
    extractor = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights.path)
    )
    out = []
    for images in sets:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            (features,) = extractor(x)
        out.append(features.double().numpy())
    return out


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), float64, scipy.linalg.sqrtm.

    With fewer images than dimensions both covariances vanish outside the span of the centred
    features, so the matrices are taken in an orthonormal basis of that span (exact, and a
    well-posed sqrtm of a small matrix rather than of a singular 2048 x 2048 one).
    """
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    basis = scipy.linalg.orth(np.concatenate([f1 - mu1, f2 - mu2]).T)
    s1 = np.cov((f1 - mu1) @ basis, rowvar=False)
    s2 = np.cov((f2 - mu2) @ basis, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> InceptionWeights:
    return stand_in_weights(tmp_path_factory.mktemp("inception"))


@pytest.fixture(scope="module")
def run(weights, tmp_path_factory) -> types.SimpleNamespace:
    """Reference statistics of X, FID/IS of Y (a second set of the same distribution) and the
    features of both, computed independently."""
    root = tmp_path_factory.mktemp("fidelity")
    x, y = blobs(16, seed=1), blobs(16, seed=2)
    ref = compute_reference_stats(x, "train", weights, root, root / "reference", threads=2)
    fid_y = compute_fid_is(y, {"train": ref}, weights, root, is_splits=2, threads=2, bootstrap=8)
    fx, fy = inception_features(weights, x, y)
    return types.SimpleNamespace(
        root=root, x=x, y=y, ref=ref, fid_y=fid_y, fx=fx, fy=fy, weights=weights
    )


# ---------------------------------------------------------------------------------------------
# The metric itself.


def test_fid_matches_independent_frechet_distance(run, weights):
    expected = frechet_distance(run.fy, run.fx)
    assert expected > 0
    assert run.fid_y["fid_train"] == pytest.approx(expected, rel=1e-3)


def test_fid_of_a_set_with_itself_is_zero(run, weights):
    result = compute_fid_is(run.x, {"train": run.ref}, weights, run.root, is_splits=2, threads=2)
    assert abs(result["fid_train"]) < 1e-3 * run.fid_y["fid_train"]


def test_fid_bootstrap_resamples_the_features_of_the_pass(run, weights):
    """The standard error is the bootstrap of torch-fidelity's own features of the pass (here
    recomputed by the independent extractor), cached beside them; the features are dropped."""
    from pipeline.evaluation.bootstrap import fid_bootstrap

    ref = fidelity.load_reference({"train": run.ref})["train"]
    expected = fid_bootstrap(run.fy, ref["mu"].numpy(), ref["sigma"].numpy(), 8, 0)
    assert run.fid_y["fid_train_se"] == pytest.approx(expected["se"], rel=1e-3)
    assert run.fid_y["fid_train_se"] > 0 and expected["fid"] == pytest.approx(
        run.fid_y["fid_train"], rel=1e-3
    )
    cache = fidelity.cache_dir(run.root, weights)
    name = f"x{fidelity.content_key(run.y)[:32]}"
    assert len(list(cache.glob(f"{name}-fid-bootstrap-*-b8-s0.json"))) == 1
    assert not list(cache.glob(f"{name}-*-features-2048.pt"))


@pytest.mark.slow
def test_fid_bootstrap_of_an_older_cache_makes_one_more_pass(run, weights, tmp_path):
    """A cache whose features were dropped before the bootstrap existed (no bootstrap file):
    one Inception pass recomputes them; the rerun reads the cached result (~1 min here)."""
    import shutil

    root = tmp_path / "fid"
    shutil.copytree(run.root, root)
    for old in root.glob("*/*-fid-bootstrap-*.json"):
        old.unlink()
    args = ({"train": run.ref}, weights, root)
    out = compute_fid_is(run.y, *args, is_splits=2, threads=2, bootstrap=8)
    assert out["fid_train_se"] == pytest.approx(run.fid_y["fid_train_se"], rel=1e-6)
    again = compute_fid_is(run.y, *args, is_splits=2, threads=2, bootstrap=8)
    assert again["fid_train_se"] == out["fid_train_se"]


def test_result_and_reference_file_contents(run, weights):
    assert run.fid_y["fid_test"] is None
    assert run.fid_y["n_samples"] == 16
    logits = cached_logits(run, fidelity.content_key(run.y))
    assert logits.shape == (16, 1008)
    assert (run.fid_y["is_mean"], run.fid_y["is_std"]) == pytest.approx(
        inception_score(logits, splits=2), rel=1e-9
    )
    stats = torch.load(run.ref, weights_only=True)
    assert stats["mu"].dtype == torch.float32 and stats["mu"].shape == (2048,)
    assert stats["sigma"].dtype == torch.float64 and stats["sigma"].shape == (2048, 2048)
    assert (stats["count"], stats["resolution"], stats["weights"]) == (16, RES, weights.identity)
    np.testing.assert_allclose(stats["mu"].numpy(), run.fx.mean(axis=0), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(stats["sigma"].numpy(), np.cov(run.fx, rowvar=False), atol=1e-7)


def cached_logits(run, key: str) -> np.ndarray:
    """The IS logits [N, 1008] that the Inception pass over image set ``key`` left in the cache."""
    cache = fidelity.cache_dir(run.root, run.weights)
    path = fidelity._features_file(cache, key, fidelity.IS_LAYER, run.weights)
    return torch.load(path, weights_only=True).double().numpy()


def test_inception_score_from_confident_logits_matches_numpy(run, weights):
    """IS far from 1: logits of a confident classifier over 20 classes, cached as an image
    set's IS features. The pipeline's IS (splits, layer, cache lookup) must equal the numpy
    one, and the score must be near the class count, as the definition says."""
    rng = np.random.default_rng(5)
    n, classes = 40, 20
    labels = np.arange(n) % classes
    logits = rng.normal(size=(n, 1008))
    logits[np.arange(n), labels] += 12.0  # p(y|x) ~ one-hot, p(y) ~ uniform over 20
    key = "confident-logits-test"
    cache = fidelity.cache_dir(run.root, weights)
    cached = torch.from_numpy(logits).float()  # torch-fidelity caches float32 logits
    torch.save(cached, fidelity._features_file(cache, key, fidelity.IS_LAYER, weights))
    got = fidelity._inception_score(key, weights, cache, 4, batch_size=8, device="cpu", threads=1)
    expected = inception_score(cached.double().numpy(), splits=4)
    assert (got["is_mean"], got["is_std"]) == pytest.approx(expected, rel=1e-9)
    assert 5 < got["is_mean"] <= 10  # each split of 10 holds 10 classes: IS <= 10, far above 1


def test_one_inception_pass_per_image_set(run, weights, capfd):
    images = blobs(2, seed=7)
    key = fidelity.content_key(images)
    cache = fidelity.cache_dir(run.root, weights)
    fidelity._extract(images, key, weights, cache, batch_size=64, device="cpu", threads=2)
    assert "Inception (" in capfd.readouterr().err  # the progress bar of a pass
    cached = {p.name for p in cache.glob(f"x{key[:32]}-*")}
    assert cached == {
        f"x{key[:32]}-inception-v3-compat-features-{f}.pt" for f in ("2048", "logits_unbiased")
    }
    fidelity._extract(images, key, weights, cache, batch_size=64, device="cpu", threads=2)
    assert "Inception (" not in capfd.readouterr().err


@pytest.mark.slow
def test_fid_grows_with_noise(run, weights):
    fids = [run.fid_y["fid_train"]]
    for sigma in (16, 48):
        noisy = add_noise(run.y, sigma)
        result = compute_fid_is(noisy, {"train": run.ref}, weights, run.root, 2, threads=2)
        fids.append(result["fid_train"])
    assert fids == sorted(fids) and fids[-1] > 2 * fids[0], fids


# ---------------------------------------------------------------------------------------------
# Inception weights.


def test_stand_in_is_deterministic_and_not_degenerate(weights, tmp_path):
    state = torch.random.get_rng_state()
    again = stand_in_weights(tmp_path)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    assert again.sha256 == weights.sha256 == sha256_file(again.path)
    assert again.identity == weights.identity and again.stand_in
    (features,) = inception_features(weights, blobs(4, seed=3))
    spread = features.std(axis=0).mean()
    assert spread > 1e-2 * np.abs(features).mean(), spread  # default init: identical features


def test_local_weights_checked_by_sha256(weights, tmp_path):
    cfg = types.SimpleNamespace(inception_weights=str(weights.path), inception_sha256="0" * 64)
    with pytest.raises(DataError, match=f"expected {'0' * 64} .*found {weights.sha256}"):
        resolve_inception_weights(cfg, tmp_path)
    cfg.inception_sha256 = None
    with pytest.raises(ConfigError, match="inception_sha256 must be set"):
        resolve_inception_weights(cfg, tmp_path)
    cfg.inception_sha256 = weights.sha256.upper()
    local = resolve_inception_weights(cfg, tmp_path)
    assert (local.path, local.identity) == (weights.path, f"inception-{weights.sha256[:12]}")
    assert local.stand_in  # not the official file
    cfg.inception_weights = str(tmp_path / "missing.pth")
    with pytest.raises(DataError, match="no such file"):
        resolve_inception_weights(cfg, tmp_path)


def test_local_file_that_is_not_inception_weights(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(10, 2048)}, path)
    cfg = types.SimpleNamespace(inception_weights=str(path), inception_sha256=sha256_file(path))
    with pytest.raises(DataError, match="not torch-fidelity InceptionV3 weights"):
        resolve_inception_weights(cfg, tmp_path)


def test_default_weights_offline_says_what_to_do(tmp_path, monkeypatch):
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cfg = types.SimpleNamespace(inception_weights="default", inception_sha256=None)
    with pytest.raises(DataError) as info:
        resolve_inception_weights(cfg, tmp_path)
    message = str(info.value)
    for needle in (inception.OFFICIAL_FILE, "eval.inception_weights", inception.OFFICIAL_SHA256):
        assert needle in message


def test_stand_in_label():
    raw = {"scale": "s", "presets": {"s": {"data": {"dataset": "cifar10"}}}}
    real = config_from_dict(raw)
    assert stand_in_label(real) == {"stand_in": False, "stand_in_reasons": []}
    official = InceptionWeights(Path("w.pth"), "inception-6726825d0af5", stand_in=False)
    assert stand_in_label(real, official, synthetic=False)["stand_in"] is False
    assert stand_in_label(real, synthetic=True)["stand_in_reasons"] == ["synthetic data"]
    raw["presets"]["s"]["eval"] = {"inception_weights": "stand-in"}
    label = stand_in_label(config_from_dict(raw))
    assert label["stand_in"] and label["stand_in_note"] and "uninformative" in label["is_note"]


# ---------------------------------------------------------------------------------------------
# Clear errors.


def test_bad_samples_are_clear_errors(run, weights):
    refs = {"train": run.ref}
    cases = [
        (run.y[:1], {}, "1 images, need at least 2"),
        (run.y[:4], {"is_splits": 10}, "4 images, need at least 10"),
        (run.y, {"expected": 32}, "16 images, need at least 32; rerun `dvc repro sample`"),
        (run.y[..., 0], {}, r"expected uint8 images \[N, R, R, 3\]"),
        (run.y.astype(np.float32), {}, "expected dtype uint8"),
        (blobs(16, seed=4, res=8), {}, "samples are 8x8 but the 'train' reference .* 16x16"),
    ]
    for samples, kwargs, message in cases:
        with pytest.raises(DataError, match=message):
            compute_fid_is(samples, refs, weights, run.root, **{"is_splits": 2, **kwargs})


def test_missing_or_foreign_reference_is_a_clear_error(run, weights, tmp_path):
    with pytest.raises(DataError, match=r"missing reference statistics .*dvc repro reference"):
        compute_fid_is(run.y, {"test": tmp_path / "test-stats.pt"}, weights, run.root, 2)
    with pytest.raises(DataError, match=r"no reference statistics .*dvc repro reference"):
        compute_fid_is(run.y, tmp_path, weights, run.root, 2)
    other = InceptionWeights(weights.path, "inception-000000000000", stand_in=False)
    with pytest.raises(DataError, match="computed with Inception weights stand-in-"):
        compute_fid_is(run.y, {"train": run.ref}, other, run.root, 2)


# ---------------------------------------------------------------------------------------------
# The reference stage, end to end, in a temporary project.


def make_project(root: Path, weights: InceptionWeights, splits: dict[str, np.ndarray], **eval_):
    """params.yaml, data/tiny (the prepared-data format) and the stand-in, under ``root``."""
    params = {
        "scale": "tiny",
        "presets": {
            "tiny": {
                "data": {"dataset": "synthetic", "resolution": RES},
                "eval": {"inception_weights": "stand-in", "is_splits": 2, **eval_},
            }
        },
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    data = root / "data" / "tiny"
    data.mkdir(parents=True)
    entries = {}
    for split, images in splits.items():
        np.save(data / f"{split}.npy", images)
        file = {"path": f"{split}.npy", "count": len(images), "sha256": "unused"}
        entries[split] = {"count": len(images), "shape": list(images.shape), "files": [file]}
    manifest = {"dataset": "synthetic", "synthetic": True, "resolution": RES, "splits": entries}
    (data / "manifest.json").write_text(json.dumps(manifest))
    (root / "work" / "fidelity" / "weights").mkdir(parents=True)
    os.link(weights.path, root / "work" / "fidelity" / "weights" / weights.path.name)


def run_stage(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DDPM_PARAMS": str(root / "params.yaml")}
    cmd = [sys.executable, "-m", "stages.reference"]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)


def cache_state(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*.pt")}


def test_reference_stage_end_to_end_and_cached(run, weights, tmp_path):
    # The module's cache (symlinked in) already holds X and Y: same content, same cache entries,
    # whoever computed them. Neither run may do an Inception pass or touch the cache.
    make_project(tmp_path, weights, {"train": run.x, "test": run.y}, ref_images=16)
    cache = tmp_path / "work" / "fidelity" / fidelity.cache_dir(run.root, weights).name
    cache.symlink_to(fidelity.cache_dir(run.root, weights), target_is_directory=True)
    state = cache_state(cache)
    first = run_stage(tmp_path)
    assert first.returncode == 0, first.stderr
    assert "Inception (" not in first.stderr and cache_state(cache) == state
    out = tmp_path / "reference" / "tiny"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stand_in"] and "stand-in Inception weights" in manifest["stand_in_reasons"]
    assert manifest["weights"]["identity"] == weights.identity
    assert {s: e["count"] for s, e in manifest["splits"].items()} == {"train": 16, "test": 16}
    train = torch.load(out / "train-stats.pt", weights_only=True)
    assert torch.equal(train["mu"], torch.load(run.ref, weights_only=True)["mu"])
    test = torch.load(out / "test-stats.pt", weights_only=True)
    np.testing.assert_allclose(test["mu"].numpy(), run.fy.mean(axis=0), rtol=1e-4, atol=1e-7)

    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["presets"]["tiny"]["eval"]["nll_images"] = 4  # an unrelated eval key
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    second = run_stage(tmp_path)
    assert second.returncode == 0, second.stderr
    assert "Inception (" not in second.stderr and cache_state(cache) == state
    assert json.loads((out / "manifest.json").read_text()) == manifest  # same bytes, same sums


def test_reference_stage_wrong_checksum_is_one_error_line(weights, tmp_path, monkeypatch, capsys):
    from stages import reference

    sums = {"inception_weights": str(weights.path), "inception_sha256": "f" * 64}
    make_project(tmp_path, weights, {"train": blobs(4, seed=6)}, fid_against=["train"], **sums)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DDPM_PARAMS", str(tmp_path / "params.yaml"))
    with pytest.raises(SystemExit) as info:
        reference.main([])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "sha256 mismatch" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "reference").exists()


def test_reference_stage_stopped_by_sigterm_leaves_no_output_and_reruns(weights, tmp_path):
    """SIGTERM during the Inception pass: exit 143, no reference output; the rerun computes the
    whole reference. (Ctrl-C, exit 130: the make-repro test stops an evaluate stage so.)"""
    sig = signal.SIGTERM
    x = blobs(6, seed=11)
    make_project(tmp_path, weights, {"train": x}, ref_images=6, fid_against=["train"])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DDPM_PARAMS": str(tmp_path / "params.yaml")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.reference"], cwd=tmp_path, env=env, stderr=subprocess.PIPE
    )
    seen = bytearray()
    try:
        while b"Inception (" not in seen:  # tqdm's bar: the pass has begun
            chunk = proc.stderr.read1(4096)
            assert chunk, f"the stage ended before its Inception pass: {seen.decode()[-2000:]}"
            seen += chunk
        proc.send_signal(sig)
        seen += proc.stderr.read()
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 128 + sig, seen.decode()[-2000:]
    assert b"interrupted: finished work is kept; rerun to resume" in seen
    assert not (tmp_path / "reference").exists() or not any((tmp_path / "reference").iterdir())
    again = run_stage(tmp_path)
    assert again.returncode == 0, again.stderr
    manifest = json.loads((tmp_path / "reference" / "tiny" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 6
