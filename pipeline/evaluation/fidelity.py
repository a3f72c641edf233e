"""FID and Inception Score through torch-fidelity, with cached reference statistics.

torch-fidelity does the work (Inception features, statistics, the Fréchet distance, IS); this
module feeds it uint8 image arrays and manages its file cache:

- The cache is content-addressed: an image set is named ``x<sha256 of its pixels>``, under one
  cache folder per weights identity and torch-fidelity version (``<cache_root>/<identity>-tf<v>``;
  torch-fidelity's own key ignores the weights). So an Inception pass over the same images with
  the same weights happens once, however often DVC reruns a stage.
- One Inception pass per image set leaves its IS logits and 2048-d features in the cache; the
  first FID computes and caches its statistics (mu float32, sigma float64), after which the
  features are deleted. FIDs and IS are further ``calculate_metrics`` calls that read the cache
  (each builds the extractor, ~1 s, and an FID costs ~8 s of 2048-d eigvals on 2 CPU cores).
- Reference statistics (stage ``reference``) are also written as self-describing files
  ``reference/<scale>/<split>-stats.pt`` (mu, sigma, count, resolution, weights identity), a DVC
  output; ``compute_fid_is`` copies them into the cache under torch-fidelity's stat file name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.defaults import DEFAULTS as TORCH_FIDELITY_DEFAULTS

from pipeline.atomic import atomic_path
from pipeline.cluster.devices import inception_device
from pipeline.cluster.storage import safe_load
from pipeline.config import STAND_IN_NOTE, Config
from pipeline.errors import DataError
from pipeline.evaluation.bootstrap import bootstrap_errors, bootstrap_missing, plan_pass
from pipeline.evaluation.heap import bound_heap
from pipeline.evaluation.inception import STAND_IN_IS_NOTE, InceptionWeights

if TYPE_CHECKING:
    from pipeline.cluster.taskprogress import BlockProgress

EXTRACTOR = "inception-v3-compat"  # the Inception weights' extractor; others: InceptionWeights
FID_LAYER = "2048"  # torch-fidelity's default FID feature for this extractor
IS_LAYER = "logits_unbiased"  # and its IS feature
STATS_FORMAT = "ddpm-repro/fid-stats-v1"
REFERENCE_HINT = "run `dvc repro reference`"
HASH_CHUNK_BYTES = 16 << 20  # content_key reads this much at a time


class ImageArrayDataset(Dataset):
    """uint8 images [N, R, R, 3] (an array or memory map) as uint8 [3, R, R] tensors.

    ``progress`` (a BlockProgress) advances by one per image read, up to N (torch-fidelity
    reads image 0 once more to check its type).
    """

    def __init__(self, images: Any, progress: BlockProgress | None = None) -> None:
        self.images = images
        self.progress = progress
        self.read = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.progress is not None and self.read < len(self):
            self.read += 1
            self.progress.advance(1)
        return torch.from_numpy(np.ascontiguousarray(np.asarray(self.images[i]).transpose(2, 0, 1)))


# ---------------------------------------------------------------------------------------------
# Public API: reference statistics, FID/IS of samples, labels.


def inception_options(eval_cfg) -> dict[str, Any]:
    """The Inception keyword arguments of an EvalConfig (batch size, device, CPU threads)."""
    return {
        "batch_size": eval_cfg.batch_size,
        "device": eval_cfg.inception_device,
        "threads": eval_cfg.inception_threads,
    }


def compute_reference_stats(
    images: Any,
    name: str,
    weights: InceptionWeights,
    cache_root: Path,
    out_dir: Path,
    *,
    is_splits: int = 10,
    meta: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    device: str = "auto",
    threads: int | None = None,
    key: str | None = None,
) -> Path:
    """Inception statistics of reference ``images`` [N, R, R, 3] uint8, written atomically.

    Returns ``out_dir/<name>-stats.pt``: mu [2048] float32, sigma [2048, 2048] float64, count,
    resolution, weights identity, the images' IS (None when N < is_splits) and ``meta``.
    ``key``: the images' :func:`content_key` when the caller knows it already.
    """
    count, resolution = check_images(images, f"reference images {name!r}")
    device = inception_device(device)
    cache = cache_dir(cache_root, weights, device)
    key = key or content_key(images)
    opts = {"batch_size": batch_size, "device": device, "threads": threads}
    _extract(images, key, weights, cache, what=f"{name} images", **opts)
    stat = _statistics(key, weights, cache, **opts)
    _drop_fid_features(cache, key, weights)
    isc = _inception_score(key, weights, cache, is_splits, **opts) if count >= is_splits else {}
    payload = {
        "format": STATS_FORMAT,
        "name": name,
        "mu": torch.from_numpy(stat["mu"]),
        "sigma": torch.from_numpy(stat["sigma"]),
        "count": count,
        "resolution": resolution,
        "content_key": key,
        "weights": weights.identity,
        "stand_in": weights.stand_in,
        "torch_fidelity": torch_fidelity.__version__,
        "inception_device": device,  # cuda: TF32 off (see _calculate)
        "is_mean": isc.get("is_mean"),
        "is_std": isc.get("is_std"),
        **dict(meta or {}),
    }
    path = Path(out_dir) / f"{name}-stats.pt"
    _save_pt(path, payload)
    return path


def compute_fid_is(
    samples: Any,
    reference: Mapping[str, Path] | Path,
    weights: InceptionWeights,
    cache_root: Path,
    is_splits: int = 10,
    *,
    expected: int | None = None,
    batch_size: int = 64,
    device: str = "auto",
    threads: int | None = None,
    key: str | None = None,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
) -> dict[str, Any]:
    """FID of ``samples`` [N, R, R, 3] uint8 against each reference split, and their IS.

    ``reference`` is a reference folder (all splits in its manifest.json) or {split: stats
    file}. Returns {"fid_train", "fid_test" (None for a split not given), "is_mean", "is_std",
    "n_samples"}, and with ``bootstrap`` > 1 "fid_<split>_se", the FID's standard error over
    that many resamples of the sample features (pipeline.evaluation.bootstrap, seeded).
    At least max(2, is_splits, expected) samples are required. ``key``: the samples'
    :func:`content_key` when the caller knows it already.
    """
    minimum = max(2, is_splits, expected or 0)
    count, resolution = check_images(samples, "samples", minimum, hint="rerun `dvc repro sample`")
    refs = load_reference(reference)
    for split, stats in refs.items():
        _check_compatible(stats, split, resolution, weights)
    device = inception_device(device)
    cache = cache_dir(cache_root, weights, device)
    key = key or content_key(samples)
    opts = {"batch_size": batch_size, "device": device, "threads": threads}
    features = _features_file(cache, key, weights.fid_layer, weights)
    missing = bootstrap_missing(cache, key, refs, bootstrap, bootstrap_seed)
    bootstrap = plan_pass(samples, features, _stat_file(cache, key, weights), missing, bootstrap)
    _extract(samples, key, weights, cache, what="samples", **opts)
    result: dict[str, Any] = {"fid_train": None, "fid_test": None}
    for split, stats in refs.items():
        ref_key = _install_reference(stats, cache, weights)
        result[f"fid_{split}"] = _fid(key, ref_key, weights, cache, **opts)
    result.update(bootstrap_errors(cache, key, refs, features, bootstrap, bootstrap_seed, device))
    _drop_fid_features(cache, key, weights)
    result.update(_inception_score(key, weights, cache, is_splits, **opts))
    result["n_samples"] = count
    return result


def load_reference(reference: Mapping[str, Path] | Path) -> dict[str, dict[str, Any]]:
    """Reference statistics by split, from a reference folder or a {split: file} mapping."""
    if not isinstance(reference, Mapping):
        reference = reference_files(Path(reference))
    return {split: _load_stats(Path(path)) for split, path in reference.items()}


def reference_files(reference_dir: Path) -> dict[str, Path]:
    """{split: stats file} listed by ``reference_dir/manifest.json``."""
    manifest = Path(reference_dir) / "manifest.json"
    if not manifest.is_file():
        raise DataError(f"{reference_dir}: no reference statistics ({REFERENCE_HINT})")
    splits = json.loads(manifest.read_text())["splits"]
    return {split: Path(reference_dir) / entry["file"] for split, entry in splits.items()}


def stand_in_label(
    cfg: Config, weights: InceptionWeights | None = None, synthetic: bool = False
) -> dict[str, Any]:
    """What the metrics JSON, the MLflow tags and the report say about comparability.

    ``synthetic``: the prepared data's manifest says synthetic (whatever the config says).
    Returns {"stand_in", "stand_in_reasons", and when stand-in "stand_in_note" and "is_note"}.
    """
    reasons = list(cfg.stand_in_reasons())
    if synthetic and "synthetic data" not in reasons:
        reasons.append("synthetic data")
    own = ("stand-in", "classifier")  # already a reason of cfg.stand_in_reasons()
    if weights is not None and weights.stand_in and cfg.eval.inception_weights not in own:
        reasons.append("Inception weights other than torch-fidelity's official file")
    label: dict[str, Any] = {"stand_in": bool(reasons), "stand_in_reasons": reasons}
    if reasons:
        label["stand_in_note"] = STAND_IN_NOTE
    if cfg.eval.inception_weights == "stand-in":
        label["is_note"] = STAND_IN_IS_NOTE
    return label


# ---------------------------------------------------------------------------------------------
# Checks and keys.


def check_images(
    images: Any, what: str, minimum: int = 2, hint: str | None = None
) -> tuple[int, int]:
    """(N, R) of uint8 images [N, R, R, 3]; a DataError naming ``what`` otherwise."""
    shape, dtype = getattr(images, "shape", None), getattr(images, "dtype", None)
    if shape is None or len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2]:
        raise DataError(f"{what}: expected uint8 images [N, R, R, 3], got shape {shape}")
    if dtype != np.uint8:
        raise DataError(f"{what}: expected dtype uint8, got {dtype}")
    if shape[0] < minimum:
        extra = f"; {hint}" if hint else ""
        raise DataError(f"{what}: {shape[0]} images, need at least {minimum}{extra}")
    return int(shape[0]), int(shape[1])


def content_key(images: Any, chunk: int | None = None) -> str:
    """sha256 of the pixels (and shape) of uint8 ``images``, read ``chunk`` images at a time.

    The default chunk is ~16 MB of images (85 at 256x256, 5461 at 32x32): memory flat in N.
    """
    digest = hashlib.sha256(f"uint8{tuple(images.shape)}".encode())
    chunk = chunk or max(1, HASH_CHUNK_BYTES // max(1, int(np.prod(images.shape[1:]))))
    for start in range(0, len(images), chunk):
        digest.update(np.ascontiguousarray(images[start : start + chunk]).data)
    return digest.hexdigest()


def cache_dir(cache_root: Path, weights: InceptionWeights, device: str = "cpu") -> Path:
    """torch-fidelity's cache_root for ``weights`` on ``device`` (cpu | cuda, resolved).

    Features of other weights, or computed on another device (GPU and CPU convolutions differ
    in the last bits), never mix.
    """
    return Path(cache_root) / f"{weights.identity}-tf{torch_fidelity.__version__}-{device}"


def _check_compatible(
    stats: dict[str, Any], split: str, resolution: int, weights: InceptionWeights
) -> None:
    if stats["weights"] != weights.identity:
        raise DataError(
            f"reference statistics of {split!r} were computed with Inception weights "
            f"{stats['weights']}, but these samples use {weights.identity} ({REFERENCE_HINT})"
        )
    if stats["resolution"] != resolution:
        raise DataError(
            f"samples are {resolution}x{resolution} but the {split!r} reference statistics are "
            f"of {stats['resolution']}x{stats['resolution']} images; compare like with like"
        )


def _load_stats(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: missing reference statistics ({REFERENCE_HINT})")
    try:
        stats = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"{path}: unreadable reference statistics ({type(e).__name__})") from None
    if not isinstance(stats, dict) or stats.get("format") != STATS_FORMAT:
        raise DataError(f"{path}: not a {STATS_FORMAT} file ({REFERENCE_HINT})")
    return stats


# ---------------------------------------------------------------------------------------------
# torch-fidelity calls and its cache files.


def _cache_name(key: str) -> str:
    return f"x{key[:32]}"


def _stat_file(cache: Path, key: str, weights: InceptionWeights) -> Path:
    return cache / f"{_cache_name(key)}-{weights.extractor}-stat-fid-{weights.fid_layer}.pt"


def _features_file(cache: Path, key: str, layer: str, weights: InceptionWeights) -> Path:
    return cache / f"{_cache_name(key)}-{weights.extractor}-features-{layer}.pt"


def _extract(
    images: Any, key: str, weights: InceptionWeights, cache: Path, what: str = "images", **opts
) -> None:
    """One Inception pass over ``images`` (content ``key``, ``what`` they are: the progress
    lines' name) unless its features are cached.

    torch-fidelity extracts and caches the features that the requested metrics need. IS needs
    the logits and KID the 2048-d features that FID uses, so IS plus a token KID (one subset of
    two images, the set as both inputs; both values are discarded) fills the cache in a single
    pass without computing a Fréchet distance nobody needs (~8 s of eigvals on 2 CPU cores).
    """
    if extracted(cache, key, weights):
        return
    from pipeline.cluster.taskprogress import BlockProgress  # imports ray: only when a pass runs

    bound_heap()  # resident memory flat over the pass (pipeline/evaluation/heap.py)
    name = _cache_name(key)
    # a bar on a terminal, else a line every 30 s with rate and ETA (DVC logs)
    desc = f"Inception ({weights.identity}, {opts['device']}) features of {what}"
    bar = BlockProgress(len(images), 0, desc, unit="images")
    try:
        data = ImageArrayDataset(images, bar)
        inputs: dict[str, Any] = {
            "input1": data,
            "input1_cache_name": name,
            "input2": data,
            "input2_cache_name": name,
        }
        token_kid: dict[str, Any] = {"kid": True, "kid_subsets": 1, "kid_subset_size": 2}
        _calculate(weights, cache, isc=True, isc_splits=1, **token_kid, **inputs, **opts)
    finally:
        bar.close()


def extracted(cache: Path, key: str, weights: InceptionWeights) -> bool:
    """Whether ``cache`` holds what FID and IS of image set ``key`` need (no pass to run)."""
    fid_ready = (
        _stat_file(cache, key, weights).is_file()
        or _features_file(cache, key, weights.fid_layer, weights).is_file()
    )
    return fid_ready and _features_file(cache, key, weights.is_layer, weights).is_file()


def _statistics(key: str, weights: InceptionWeights, cache: Path, **opts) -> dict[str, np.ndarray]:
    """FID statistics {mu float32, sigma float64} of extracted image set ``key``.

    When not cached yet, torch-fidelity computes them from the cached features during an FID of
    the set against itself (the only call that computes statistics; its value is discarded).
    """
    if not _stat_file(cache, key, weights).is_file():
        _fid(key, key, weights, cache, **opts)
    return load_numpy_dict(_stat_file(cache, key, weights))


def load_numpy_dict(path: Path) -> dict[str, np.ndarray]:
    """A ``torch.save``d dict of numpy arrays, loaded with ``weights_only=True`` and an allow-list.

    Cache folders may sit on shared storage, so a file holding anything else (a tampered one
    whose unpickling would run code) is refused with a DataError; nothing in it is executed.
    """
    out = safe_load(path)
    if not isinstance(out, dict) or not all(isinstance(v, np.ndarray) for v in out.values()):
        raise DataError(f"{path}: refused, not a dict of arrays")
    return out


def _fid(key1: str, key2: str, weights: InceptionWeights, cache: Path, **opts) -> float:
    """FID between two extracted image sets, from cached statistics (or features)."""
    inputs: dict[str, Any] = {
        "input1": _NeverRead(),
        "input1_cache_name": _cache_name(key1),
        "input2": _NeverRead(),
        "input2_cache_name": _cache_name(key2),
    }
    out = _calculate(weights, cache, fid=True, **inputs, **opts)
    return float(out[torch_fidelity.KEY_METRIC_FID])


def _inception_score(key: str, weights, cache: Path, is_splits: int, **opts) -> dict[str, float]:
    """IS (mean, std over ``is_splits`` splits) from the cached logits of image set ``key``."""
    inputs: dict[str, Any] = {"input1": _NeverRead(), "input1_cache_name": _cache_name(key)}
    out = _calculate(weights, cache, isc=True, isc_splits=is_splits, **inputs, **opts)
    mean, std = out[torch_fidelity.KEY_METRIC_ISC_MEAN], out[torch_fidelity.KEY_METRIC_ISC_STD]
    return {"is_mean": float(mean), "is_std": float(std)}


def _install_reference(stats: dict[str, Any], cache: Path, weights: InceptionWeights) -> str:
    """Reference ``stats`` as torch-fidelity's stat file in ``cache``; returns its content key."""
    key = stats["content_key"]
    if not _stat_file(cache, key, weights).is_file():  # the reference came from DVC, not here
        stat = {"mu": stats["mu"].numpy().astype(np.float32), "sigma": stats["sigma"].numpy()}
        _save_pt(_stat_file(cache, key, weights), stat)
    return key


def _save_pt(path: Path, obj: Any) -> None:
    """torch.save ``obj`` to ``path`` atomically, with the same bytes for the same content.

    Through a file object: torch.save to a path names the zip's records after the (random)
    temporary file, and DVC would see a changed output on every rerun.
    """
    with atomic_path(path, ".pt") as tmp, tmp.open("wb") as f:
        torch.save(obj, f)


def _drop_fid_features(cache: Path, key: str, weights: InceptionWeights) -> None:
    """Delete the FID features (Inception's: 8 kB an image) once the statistics supersede them."""
    if _stat_file(cache, key, weights).is_file():
        _features_file(cache, key, weights.fid_layer, weights).unlink(missing_ok=True)


class _NeverRead(Dataset):
    """Stands for an input whose features or statistics are cached: reading it is a bug."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> torch.Tensor:
        raise RuntimeError("torch-fidelity cache miss: expected cached features or statistics")


def _calculate(
    weights: InceptionWeights,
    cache: Path,
    *,
    batch_size: int,
    device: str,
    threads: int | None,
    **kwargs,
) -> dict[str, float]:
    """torch_fidelity.calculate_metrics with this project's extractor, weights and cache.

    torch-fidelity silently ignores keywords it does not know, so a misspelt one is a bug here.
    """
    unknown = set(kwargs) - set(TORCH_FIDELITY_DEFAULTS)
    if unknown:
        raise TypeError(f"not torch-fidelity keywords: {', '.join(sorted(unknown))}")
    cuda = inception_device(device) == "cuda"
    with _torch_threads(None if cuda else threads), _no_tf32():
        return torch_fidelity.calculate_metrics(
            feature_extractor=weights.extractor,
            feature_extractor_weights_path=str(weights.path) if weights.path else None,
            cache_root=str(cache),
            cache=True,
            cuda=cuda,
            batch_size=batch_size,
            save_cpu_ram=True,  # no DataLoader worker processes: the images are in memory
            verbose=False,  # its progress bar and log lines; _extract shows its own bar
            **kwargs,
        )


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """Full float32 convolutions and matmuls (no TF32) for the block, then restored.

    On Ampere and later GPUs cuDNN convolutions default to TF32 (10-bit mantissa), which moves
    Inception features and so FID; the published FIDs were computed in float32.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` for the block (None: unchanged)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
