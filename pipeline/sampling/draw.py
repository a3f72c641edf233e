"""Drawing N samples with Algorithm 2 from a variant's EMA weights, fanned out over Ray.

What each task gets, the network and sampler settings, is a :class:`pipeline.sampling.job.
SamplingJob` (shared with the NLL and the figures).

Sample i draws x_T and every step's noise from its own generator seeded by (seed, i), on the
sampling device (pipeline.sampling.noise: no per-step host copy or sync). Samples are computed in
fixed blocks of indices by pipeline.cluster.blocks (resumable, retried, written atomically as uint8
shards under ``work/sample/<variant>/<key>/``), which become ``samples/<variant>/``'s shards (hard
links, never merged: pipeline.sampling.shards).
``key`` hashes everything that changes a block's bytes (weights, seed, sampler, diffusion
settings, precision, memory format, block size, device type, torch version, and the batch size
where the network is not batch-invariant), so blocks are reused across reruns, more samples or
another worker count, and never mixed across weights.

Reproducibility: on the CPU in float32 (the default memory format) the U-Net is batch-invariant,
so sample i is bit-identical for any batch size and worker count. With bf16, channels_last or a
GPU it is not (kernels depend on the batch), so the key includes the batch size: the result
still does not depend on the number of workers (same blocks, same batch split in each block).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from pipeline import layout
from pipeline.atomic import atomic_dir, save_npz, write_json
from pipeline.choices import Precision
from pipeline.cluster import devices
from pipeline.cluster.blocks import BlockRun, run_blocks
from pipeline.cluster.gputasks import submit
from pipeline.cluster.raycluster import init_ray
from pipeline.cluster.runrecord import model_run_id
from pipeline.cluster.storage import shared_path, synced
from pipeline.config import STAND_IN_NOTE, Config, Variant, config_hash
from pipeline.data import to_uint8
from pipeline.errors import ConfigError, DataError
from pipeline.model.diffusion import GaussianDiffusion
from pipeline.model.precision import compute_precision, set_matmul_precision
from pipeline.model.unet import UNet
from pipeline.model.weights import sha256_file
from pipeline.report.tracking import tracking_uri, variant_run
from pipeline.sampling.figures import save_progressive, save_sample_grid
from pipeline.sampling.job import SamplingJob, make_job, variant_types
from pipeline.sampling.noise import ImageNoise
from pipeline.sampling.shards import SampleShards, map_blocks, publish_shards
from pipeline.uri import redact_uri

FORMAT = "ddpm-repro/samples-v2"  # v2: shards + manifest (v1: one samples.npz)
TAG_SAMPLER = "ddpm.sampler"  # MLflow tag: how the samples were drawn
TAG_KEY = "ddpm.sample_key"  # MLflow tag: the block key (work/sample/<variant>/<key>)


def block_key(job: SamplingJob, block_size: int) -> str:
    """The identity of a block's bytes (see the module docstring); names the shard folder."""
    payload = {
        "weights": job.weights_digest(),
        "seed": job.seed,
        "steps": job.steps if job.respaced else None,
        "betas": config_hash(list(job.betas), 16),
        "types": [job.mean_type, job.var_type, job.loss_type],
        "bf16": job.bf16,
        "precision": job.precision,
        "channels_last": job.channels_last,
        "block_size": block_size,
        "device": job.device_type,
        "torch": torch.__version__,
        "batch_size": None if job.batch_invariant else job.batch_size,
    }
    return config_hash(payload)


# ---------------------------------------------------------------------------------------------
# Sampling in one process (what a Ray task runs).


def _device(job: SamplingJob) -> torch.device:
    return devices.task_device(job.use_gpu, "sample.use_gpu")


def _setup_worker(job: SamplingJob) -> torch.device:
    torch.set_num_threads(job.torch_threads)
    torch.backends.cudnn.benchmark = False  # kernel choice by timing would change bits
    torch.backends.cudnn.deterministic = True
    set_matmul_precision(job.precision, job.device_type)  # TF32 flags explicit
    return _device(job)


def _network(model: UNet, channels_last: bool):
    """model(x, t), with x laid out channels_last when asked (the sampler's x is contiguous)."""
    if not channels_last:
        return model
    return lambda x, t: model(x.contiguous(memory_format=torch.channels_last), t)


def sample_images(
    model: UNet,
    diffusion: GaussianDiffusion,
    indices: range | list[int],
    seed: int,
    batch_size: int,
    bf16: bool = False,
    channels_last: bool = False,
    precision: Precision = "fp32",
) -> np.ndarray:
    """Samples ``indices`` (Algorithm 2, per-image noise from (seed, i)): uint8 [n, R, R, 3].

    ``precision``: model.precision (pipeline.model.precision); ``bf16``: the legacy flag."""
    device = next(model.parameters()).device
    shape = (model.in_channels, model.resolution, model.resolution)
    net = _network(model, channels_last)
    out = []
    indices = list(indices)
    with torch.inference_mode(), compute_precision(precision, device.type, bf16):
        for b in range(0, len(indices), batch_size):
            chunk = indices[b : b + batch_size]
            noise = ImageNoise(seed, chunk, device=device)
            x = diffusion.p_sample_loop(net, (len(chunk), *shape), noise_fn=noise)
            out.append(to_uint8(x))
    return np.concatenate(out) if out else np.zeros((0, *shape[1:], shape[0]), np.uint8)


def sample_block(start: int, stop: int, job: SamplingJob) -> dict[str, np.ndarray]:
    """The Ray task of one block: ``{"images": uint8 [stop - start, R, R, 3]}``."""
    device = _setup_worker(job)
    model = job.model(device)
    diffusion, indices = job.diffusion(), range(start, stop)
    images = sample_images(
        model, diffusion, indices, job.seed, job.batch_size, job.bf16, job.channels_last,
        job.precision,
    )  # fmt: skip
    return {"images": images}


def frame_steps(num_steps: int, frames: int) -> list[int]:
    """The reverse-process steps (0-indexed, descending) whose x_0 predictions are shown."""
    return sorted(set(np.round(np.linspace(num_steps - 1, 0, frames)).astype(int)), reverse=True)


def progressive_frames(
    model: UNet,
    diffusion: GaussianDiffusion,
    indices: list[int],
    seed: int,
    frames: int,
    bf16: bool = False,
    channels_last: bool = False,
    precision: Precision = "fp32",
) -> dict[str, np.ndarray]:
    """Fig. 6: the x_0 predictions of samples ``indices`` at evenly spaced steps.

    Returns ``frames`` uint8 [S, F, R, R, 3], ``t`` int64 [F] (the paper's 1-based timesteps
    of the original process) and ``final`` uint8 [S, R, R, 3]: the samples themselves (on the
    CPU in float32 byte-identical to the merged samples at those indices).
    """
    device = next(model.parameters()).device
    shape = (len(indices), model.in_channels, model.resolution, model.resolution)
    wanted = frame_steps(diffusion.num_timesteps, frames)
    net, shown, final = _network(model, channels_last), [], None
    with torch.inference_mode(), compute_precision(precision, device.type, bf16):
        noise = ImageNoise(seed, indices, device=device)
        for out in diffusion.p_sample_loop_progressive(net, shape, noise_fn=noise):
            if out["t"] in wanted:
                shown.append(to_uint8(out["pred_xstart"]))
            final = out["sample"]
    assert final is not None  # the reverse process has at least one step
    original = getattr(diffusion, "timesteps", np.arange(diffusion.num_timesteps))
    return {
        "frames": np.stack(shown, axis=1),
        "t": np.asarray([int(original[t]) + 1 for t in wanted], dtype=np.int64),
        "final": to_uint8(final),
    }


def _progressive_task(job: SamplingJob, indices: list[int], frames: int) -> dict[str, np.ndarray]:
    device = _setup_worker(job)
    model = job.model(device)
    diffusion = job.diffusion()
    return progressive_frames(
        model, diffusion, indices, job.seed, frames, job.bf16, job.channels_last, job.precision
    )


# ---------------------------------------------------------------------------------------------
# The driver.


@dataclass
class ModelInfo:
    """A variant's trained weights as the train stage left them."""

    weights: Path  # models/<variant>/ema.pt
    meta: dict[str, Any]  # models/<variant>/model.json
    sha256: str  # of the weights file


def load_model_info(model_dir: Path, variant: Variant, scale: str) -> ModelInfo:
    """Read model.json and check it against the params' variant; DataError otherwise."""
    weights, info = model_dir / "ema.pt", model_dir / "model.json"
    for path in (weights, info):
        if not path.is_file():
            raise DataError(f"{path}: not found (run the train stage first: dvc repro train)")
    try:
        meta = json.loads(info.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{info}: not readable JSON ({e}); rerun the train stage") from None
    want = {"variant": variant.name, "scale": scale, **variant_types(variant)}
    got = {k: meta.get(k) for k in want}
    if got != want:
        raise DataError(
            f"{info} describes {_describe(got)} but params.yaml asks for {_describe(want)}; "
            f"rerun the train stage for this variant"
        )
    sha = sha256_file(weights)
    if meta.get("ema_sha256") not in (None, sha):
        raise DataError(
            f"{weights}: sha256 differs from {info}'s ema_sha256; rerun the train stage"
        )
    return ModelInfo(weights=weights, meta=meta, sha256=sha)


def _describe(d: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v!r}" for k, v in d.items())


def check_sample_config(cfg: Config) -> None:
    """ConfigError for sample settings that params' types alone cannot rule out."""
    s, where = cfg.sample, f"presets.{cfg.scale}.sample"
    positive = {
        "torch_threads": s.torch_threads,
        "cpus_per_worker": s.cpus_per_worker,
        "progressive_frames": s.progressive_frames,
        "grid_size": s.grid_size,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{where}.{key} must be positive (got {value})")
    if s.use_gpu and s.gpus_per_worker <= 0:
        raise ConfigError(f"{where}.gpus_per_worker must be positive with use_gpu (got 0)")
    if any(i < 0 for i in s.progressive_seeds):
        raise ConfigError(f"{where}.progressive_seeds are sample indices: need >= 0")


def task_resources(cfg: Config) -> dict[str, float]:
    """Ray resources of one sampling task."""
    s = cfg.sample
    resources: dict[str, float] = {"num_cpus": s.cpus_per_worker}
    if s.use_gpu:
        resources["num_gpus"] = s.gpus_per_worker
    return resources


@dataclass
class SampleSet:
    """The outcome of :func:`draw_samples`."""

    images: SampleShards  # uint8 [N, R, R, 3], the blocks memory-mapped
    progressive: dict[str, np.ndarray]  # see progressive_frames
    manifest: dict[str, Any]
    run: BlockRun  # blocks computed and reused now, and the time it took
    work_dir: Path  # the shard folder
    run_id: str | None = None  # the variant's MLflow run (pipeline.cluster.runrecord), if any


def draw_samples(
    cfg: Config, variant: Variant, info: ModelInfo, root: Path = Path(".")
) -> SampleSet:
    """Compute (or reuse) every block of the variant's samples on Ray; map them (no merge).

    The variant's MLflow run is found first: a store without it is a one-line DataError
    before any block is drawn."""
    run_id = model_run_id(cfg, cfg.run_key(variant.name), info.meta, root)
    job = make_job(cfg, variant, info.weights)
    s = cfg.sample
    key = block_key(job, s.block_size)
    work = shared_path(cfg, root, layout.work_dir("sample", cfg.run_key(variant.name))) / key
    resources = task_resources(cfg)
    with synced(cfg, root, work, ("block-*.npz", "progressive-*.npz")):  # a bucket: uploads
        run = run_blocks(
            sample_block,
            s.n_samples,
            s.block_size,
            work,
            s.num_workers,
            resources,
            desc="samples",
            shared=job,
            connect=functools.partial(init_ray, cfg.ray),
            steps_per_item=job.diffusion().num_timesteps,  # reverse steps: progress in blocks
        )
        progressive = _progressive(cfg, job, work, resources)
    for stale in work.glob("merged-*.npz"):  # what older versions merged the blocks into
        stale.unlink(missing_ok=True)
    images = map_blocks(work, s.n_samples, s.block_size)  # checked, memory-mapped
    manifest = make_manifest(cfg, variant, info, job, images, key)
    return SampleSet(images, progressive, manifest, run, work, run_id)


def _progressive(
    cfg: Config, job: SamplingJob, work: Path, resources: dict
) -> dict[str, np.ndarray]:
    """Fig. 6 frames of the progressive seeds, computed once per key (cached beside the blocks)."""
    seeds, frames = cfg.sample.progressive_seeds, cfg.sample.progressive_frames
    if not seeds:
        return {}
    path = work / f"progressive-{config_hash([list(seeds), frames], 8)}.npz"
    if path.is_file():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    init_ray(cfg.ray)
    task = submit(
        _progressive_task,
        job,
        list(seeds),
        frames,
        resources=resources,
        max_retries=3,
        retry_exceptions=True,
    )
    out = ray.get(task)
    save_npz(path, **out)
    return out


def make_manifest(
    cfg: Config,
    variant: Variant,
    info: ModelInfo,
    job: SamplingJob,
    images: np.ndarray | SampleShards,
    key: str,
    sha256: str | None = None,
) -> dict[str, Any]:
    """What the sample shards hold and how they were drawn (deterministic: no timings, no
    MLflow run id; DVC hashes it into dvc.lock).

    ``sha256``: that of the images' bytes when already known; None until
    :func:`write_outputs` hashes the published shards (and adds their list, ``shards``)."""
    manifest = {
        "format": FORMAT,
        "variant": variant.name,
        "scale": cfg.scale,
        "count": int(images.shape[0]),
        "shape": list(images.shape),
        "dtype": str(images.dtype),
        "sha256": sha256,
        "sampler": job.label(),
        "var_type": job.var_type,  # the sampler's variance (sample.var_type or the variant's)
        "respaced": job.respaced,
        "steps": job.steps or len(job.betas),
        "num_timesteps": len(job.betas),
        "seed": job.seed,
        "seeding": f"sample i: torch {job.device_type} generator seeded by SeedSequence([seed, i])",
        "weights_sha256": info.sha256,
        "weights_digest": job.weights_digest(),
        "block_size": cfg.sample.block_size,
        "block_key": key,
        "device": job.device_type,
        "bf16": job.bf16,
        "precision": job.precision,
        "channels_last": job.channels_last,
        "torch": torch.__version__,
    }
    if "synthetic data" in cfg.stand_in_reasons():
        manifest["stand_in"] = f"{STAND_IN_NOTE} (model trained on synthetic data)"
    return manifest


def _array_sha256(array: np.ndarray, chunk: int = 1024) -> str:
    """sha256 of the array's C-order bytes, hashed ``chunk`` rows at a time (no whole copy)."""
    digest = hashlib.sha256()
    for start in range(0, len(array), chunk):
        digest.update(np.ascontiguousarray(array[start : start + chunk]).data)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Outputs: samples/<variant>/ written whole (atomic folder), figures logged to MLflow.


def write_outputs(cfg: Config, out_dir: Path, result: SampleSet) -> None:
    """The shards, manifest.json, grid.png and progressive.png in ``out_dir``, all or nothing.

    The shards are the blocks themselves, hard-linked (copied only across file systems) and
    hashed into the manifest (pipeline.sampling.shards.publish_shards): no merged second copy.

    The figures and sampling metrics go to the variant's MLflow run (when there is one:
    ``result.run_id``) before the folder is put in place, so a tracking error leaves no
    partial output.
    """
    title = f"{result.manifest['variant']}: {result.manifest['sampler']}"
    if "stand_in" in result.manifest:
        title += f" ({STAND_IN_NOTE})"
    with atomic_dir(out_dir) as tmp:
        count, block_size = result.manifest["count"], result.manifest["block_size"]
        published = publish_shards(result.work_dir, count, block_size, tmp)
        result.manifest = {**result.manifest, **published}  # sha256 filled, shards listed
        write_json(tmp / "manifest.json", result.manifest)
        figures = [tmp / "grid.png"]
        save_sample_grid(figures[0], np.array(result.images[: cfg.sample.grid_size]), title)
        if result.progressive:
            figures.append(tmp / "progressive.png")
            prog = result.progressive
            save_progressive(figures[1], prog["frames"], prog["t"], title)
        log_to_mlflow(cfg, result, figures)


def log_to_mlflow(cfg: Config, result: SampleSet, figures: list[Path]) -> bool:
    """Log figures, the sampler tag and samples/s to the variant's run; False if it has none."""
    run_id = result.run_id
    if not run_id:
        return False
    import mlflow
    from mlflow.exceptions import MlflowException

    metrics = {"n_samples": result.manifest["count"], "sampling_steps": result.manifest["steps"]}
    if result.run.items_per_s is not None:
        metrics["samples_per_s"] = result.run.items_per_s
    tags = {TAG_SAMPLER: result.manifest["sampler"], TAG_KEY: result.manifest["block_key"]}
    try:
        with variant_run(cfg, run_id):
            mlflow.set_tags(tags)
            mlflow.log_metrics(metrics)
            for path in figures:
                mlflow.log_artifact(str(path), "samples")
    except MlflowException as e:
        raise DataError(
            redact_uri(
                f"MLflow run {run_id} of models/{result.manifest['variant']}/model.json cannot "
                f"be logged to at {tracking_uri(cfg)} ({str(e).splitlines()[0]}); point "
                "MLFLOW_TRACKING_URI at the store the train stage used, or rerun it"
            )
        ) from None
    return True
