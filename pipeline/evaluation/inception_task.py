"""Inception (or feature-network) passes on a GPU of the cluster when the driver has none.

``eval.inception_device: cuda`` (the GPU presets) asks for a GPU. A driver that sees a CUDA
device runs the pass itself, as before. A driver that sees none (the CPU head of KubeRay,
Anyscale and most ``ray up`` clusters) submits the whole computation (:func:`compute_fid_is` or
:func:`compute_reference_stats` of pipeline.evaluation.fidelity) as one Ray task that holds one
GPU, through pipeline.cluster.gputasks (a fresh worker per GPU task):

- what the task needs travels through Ray's object store: the images in chunks of
  :data:`CHUNK_BYTES` (the driver never holds them whole; the task reads them chunk by chunk,
  as the pass goes), the weights file's bytes (checked against their sha256 on arrival), the
  reference statistics files, and the driver's cache files of these image sets (so a set whose
  features are cached is not shipped at all: a placeholder with its shape and content key goes
  instead, and no Inception pass runs);
- the task computes in a temporary folder of its own node (the cache included) and returns the
  result with every cache file it wrote; the driver installs them into its own cache folder
  (``cache_dir(cache_root, weights, "cuda")``), so a rerun finds them exactly as if the driver
  had computed on its own GPU.

Where the pass runs is decided by pipeline.cluster.devices (``inception_needs_gpu_task``, and
``inception_task_device``: cpu under the test-only fake GPUs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import ray

from pipeline.atomic import atomic_path
from pipeline.cluster import devices
from pipeline.cluster.blocks import check_resources
from pipeline.cluster.gputasks import submit
from pipeline.cluster.raycluster import init_ray
from pipeline.config import Config
from pipeline.evaluation import fidelity
from pipeline.evaluation.inception import InceptionWeights

CHUNK_BYTES = 64 << 20  # images per object-store chunk: ~64 MB (1365 at 32x32, 341 at 256x256)


@dataclasses.dataclass(frozen=True)
class InceptionRunner:
    """The Inception passes of one config: in this process, or as a GPU task (see the module
    docstring). Keyword arguments are those of pipeline.evaluation.fidelity's functions minus
    ``batch_size``, ``device`` and ``threads``, which come from ``cfg.eval``."""

    cfg: Config

    @property
    def options(self) -> dict[str, Any]:
        return fidelity.inception_options(self.cfg.eval)

    @property
    def remote(self) -> bool:
        return devices.inception_needs_gpu_task(self.cfg.eval.inception_device)

    def resources(self) -> dict[str, float]:
        """One task's Ray resources: eval.cpus_per_worker and one GPU (eval.gpus_per_worker
        when eval.use_gpu)."""
        e = self.cfg.eval
        return {"num_cpus": e.cpus_per_worker, "num_gpus": e.gpus_per_worker if e.use_gpu else 1.0}

    def fid_is(
        self,
        samples: Any,
        reference: Mapping[str, Path] | Path,
        weights: InceptionWeights,
        cache_root: Path,
        is_splits: int = 10,
        *,
        expected: int | None = None,
        bootstrap: int = 0,
        bootstrap_seed: int = 0,
    ) -> dict[str, Any]:
        """pipeline.evaluation.fidelity.compute_fid_is, here or as a GPU task."""
        boot: dict[str, Any] = {"bootstrap": bootstrap, "bootstrap_seed": bootstrap_seed}
        if not self.remote:
            return fidelity.compute_fid_is(
                samples, reference, weights, cache_root, is_splits, expected=expected,
                **boot, **self.options,
            )  # fmt: skip
        if not isinstance(reference, Mapping):
            reference = fidelity.reference_files(Path(reference))
        refs = {split: Path(p).read_bytes() for split, p in reference.items()}
        ref_keys = [fidelity.load_reference({s: p})[s]["content_key"] for s, p in reference.items()]
        kwargs = {"is_splits": is_splits, "expected": expected, **boot}
        result, files = self._run("fid_is", samples, weights, cache_root, refs, ref_keys, kwargs)
        self._install(cache_root, weights, files)
        return result

    def reference_stats(
        self,
        images: Any,
        name: str,
        weights: InceptionWeights,
        cache_root: Path,
        out_dir: Path,
        *,
        is_splits: int = 10,
        meta: Mapping[str, Any] | None = None,
    ) -> Path:
        """pipeline.evaluation.fidelity.compute_reference_stats, here or as a GPU task."""
        if not self.remote:
            return fidelity.compute_reference_stats(
                images, name, weights, cache_root, out_dir, is_splits=is_splits, meta=meta,
                **self.options,
            )  # fmt: skip
        kwargs = {"name": name, "is_splits": is_splits, "meta": dict(meta or {})}
        stats, files = self._run("reference", images, weights, cache_root, {}, [], kwargs)
        self._install(cache_root, weights, files)
        path = Path(out_dir) / f"{name}-stats.pt"
        with atomic_path(path, ".pt") as tmp:
            tmp.write_bytes(stats)
        return path

    def _run(self, what, images, weights, cache_root, refs, ref_keys, kwargs):
        init_ray(self.cfg.ray)
        check_resources(self.resources())  # one error line when the cluster has no GPU
        key = fidelity.content_key(images)
        cache = fidelity.cache_dir(cache_root, weights, "cuda")
        names = [fidelity._cache_name(k) for k in (key, *ref_keys)]
        cached = {
            p.name: p.read_bytes()
            for p in (sorted(cache.iterdir()) if cache.is_dir() else [])
            if p.is_file() and any(p.name.startswith(f"{n}-") for n in names)
        }
        if fidelity.extracted(cache, key, weights):
            shipped: Any = _Placeholder(images.shape, images.dtype)
        else:
            shipped = _put_chunks(images)
        data = Path(weights.path).read_bytes() if weights.path is not None else None
        ref = submit(
            _task,
            what,
            shipped,
            key,
            weights,
            ray.put(data),
            refs,
            cached,
            kwargs,
            self.options,
            resources=self.resources(),
            max_retries=2,
        )
        return ray.get(ref)

    @staticmethod
    def _install(cache_root, weights: InceptionWeights, files: dict[str, bytes]) -> None:
        """The task's cache files into the driver's cache folder of ``weights`` on cuda."""
        cache = fidelity.cache_dir(cache_root, weights, "cuda")
        cache.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            with atomic_path(cache / Path(name).name, ".part") as tmp:
                tmp.write_bytes(content)
        # features superseded by statistics (fidelity._drop_fid_features), as a local pass does
        for stat in cache.glob("*-stat-fid-*.pt"):
            key_name = stat.name.split("-")[0]
            (cache / f"{key_name}-{weights.extractor}-features-{weights.fid_layer}.pt").unlink(
                missing_ok=True
            )


class _Placeholder:
    """Images whose features are cached: their shape and dtype only (reading one is a bug)."""

    def __init__(self, shape: tuple[int, ...], dtype: Any) -> None:
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        raise RuntimeError("Inception task: expected cached features, found none")


@dataclasses.dataclass
class _Chunks:
    """Images [N, R, R, 3] uint8 as object-store chunks, read in the task one chunk at a time."""

    refs: list[Any]
    starts: list[int]
    shape: tuple[int, ...]
    dtype: Any = np.uint8
    _held: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def _chunk(self, c: int) -> np.ndarray:
        if self._held is None or self._held[0] != c:
            self._held = (c, ray.get(self.refs[c]))
        return self._held[1]

    def _row(self, i: int) -> np.ndarray:
        c = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self._chunk(c)[i - self.starts[c]]

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            return np.stack([self._row(i) for i in range(*key.indices(len(self)))]).reshape(
                (-1, *self.shape[1:])
            )
        i = int(key)
        if not -len(self) <= i < len(self):
            raise IndexError(f"image {i} out of range for {len(self)} images")
        return self._row(i % len(self))


def _put_chunks(images: Any) -> _Chunks:
    """``images`` put into Ray's object store in chunks of about CHUNK_BYTES."""
    shape = tuple(images.shape)
    per = max(1, CHUNK_BYTES // max(1, int(np.prod(shape[1:]))))
    starts = list(range(0, shape[0], per))
    refs = [ray.put(np.ascontiguousarray(images[s : s + per])) for s in starts]
    return _Chunks(refs, starts, shape, np.dtype(images.dtype))


def _task(what, images, key, weights, weights_file, refs, cached, kwargs, options):
    """The pass in a GPU task: inputs written into a temporary folder of this node; returns
    (result, {cache file name: bytes})."""
    if isinstance(weights_file, ray.ObjectRef):
        weights_file = ray.get(weights_file)
    if weights.extractor != fidelity.EXTRACTOR:  # the feature network's: registered on import
        import pipeline.evaluation.featurenet  # noqa: F401
    device = devices.inception_task_device()
    options = {**options, "device": device}
    with tempfile.TemporaryDirectory(prefix="ddpm-inception-") as tmp:
        root = Path(tmp)
        weights = localise_weights(weights, weights_file, root)
        cache = fidelity.cache_dir(root / "cache", weights, device)
        cache.mkdir(parents=True)
        for name, content in cached.items():
            (cache / name).write_bytes(content)
        before = {name: hashlib.sha256(content).digest() for name, content in cached.items()}
        if what == "reference":
            path = fidelity.compute_reference_stats(
                images, kwargs["name"], weights, root / "cache", root, key=key,
                is_splits=kwargs["is_splits"], meta=kwargs["meta"], **options,
            )  # fmt: skip
            result: Any = path.read_bytes()
        else:
            reference = {}
            for split, content in refs.items():
                reference[split] = root / f"ref-{split}-stats.pt"
                reference[split].write_bytes(content)
            result = fidelity.compute_fid_is(
                images, reference, weights, root / "cache", kwargs["is_splits"], key=key,
                expected=kwargs["expected"], bootstrap=kwargs.get("bootstrap", 0),
                bootstrap_seed=kwargs.get("bootstrap_seed", 0), **options,
            )  # fmt: skip
        files = {
            p.name: p.read_bytes()
            for p in sorted(cache.iterdir())
            if p.is_file() and before.get(p.name) != hashlib.sha256(p.read_bytes()).digest()
        }
    return result, files


def localise_weights(
    weights: InceptionWeights, data: bytes | None, folder: Path
) -> InceptionWeights:
    """``weights`` with their file written (sha256-checked) into ``folder`` on this node."""
    if data is None or weights.path is None:
        return weights
    if weights.sha256 and hashlib.sha256(data).hexdigest() != weights.sha256:
        raise RuntimeError(f"{weights.identity}: weights changed on the way to the task")
    local = folder / "weights" / Path(weights.path).name
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(data)
    return dataclasses.replace(weights, path=local)
