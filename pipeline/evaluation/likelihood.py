"""The NLL bound in bits/dim (Table 1) over a data split, fanned out over Ray by image blocks.

Test image i (or train image i) runs ``GaussianDiffusion.calc_bpd_loop`` (all T terms, the
predicted x_0 clipped as in the official code) with the q(x_t | x_0) noise drawn from its own
generator (pipeline.sampling.noise, base seed ``eval.seed``), so its terms do not depend on the
batch, the block or the worker that computed it. Blocks of images are computed by
pipeline.cluster.blocks (resumable, retried, written atomically under
``work/nll/<variant>/<key>/``); a block keeps every image's terms, so the aggregate is exact: sums
over images divided by the count, never a mean of block means.

The images travel inside the job through Ray's object store (the paper's 10,000 test images are
31 MB, next to the 143 MB of weights that travel anyway), so workers need no shared filesystem,
exactly as for sampling.

``key`` hashes what changes a block's numbers: the weights' content digest, the schedule, the
variant's types, the split's content (the data manifest's sha256s), the seed, the block size,
the device type and the torch version (and the batch size where the network is not
batch-invariant). More images, another worker count or a rerun reuse finished blocks.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import layout
from pipeline.choices import Precision
from pipeline.cluster import devices
from pipeline.cluster.blocks import BlockRun, merge_blocks, run_blocks
from pipeline.cluster.raycluster import init_ray
from pipeline.cluster.storage import shared_path, synced
from pipeline.config import Config, Variant, config_hash
from pipeline.data import open_split, read_manifest, to_model_input
from pipeline.model.diffusion import GaussianDiffusion
from pipeline.model.precision import compute_precision, set_matmul_precision
from pipeline.model.unet import UNet
from pipeline.sampling.job import SamplingJob, make_job
from pipeline.sampling.noise import ImageNoise

TERMS = ("total_bpd", "prior_bpd", "vb", "xstart_mse", "mse")
"""calc_bpd_loop's per-image outputs kept in every block (float64)."""


# ---------------------------------------------------------------------------------------------
# The job and its identity.


@dataclass(frozen=True)
class NllJob:
    """What every NLL task needs: the network and the images, shipped once through Ray."""

    network: SamplingJob  # EMA weights, schedule, types; seed = eval.seed, eval's device/threads
    images: np.ndarray  # uint8 [N, R, R, 3]: the split's first N images (the block items)
    split: str


def eval_network(cfg: Config, variant: Variant, weights: Path) -> SamplingJob:
    """The variant's network and diffusion with the eval section's seed, batch and device.

    Reuses sampling's job (weights, schedule, channel check); always all T steps, float32.
    """
    e = cfg.eval
    return dataclasses.replace(
        make_job(cfg, variant, weights),
        steps=None,
        seed=e.seed,
        batch_size=e.nll_batch_size,
        bf16=False,  # the legacy flag; model.precision (make_job) applies here too
        channels_last=False,
        use_gpu=e.use_gpu,
        torch_threads=e.torch_threads,
    )


def split_digest(data_dir: Path, split: str) -> str:
    """A digest of a prepared split's content, from the sha256s in its manifest."""
    entry = read_manifest(data_dir)["splits"][split]
    return config_hash([f.get("sha256") for f in entry["files"]], 16)


def nll_key(network: SamplingJob, weights_digest: str, split: str, data: str, block: int) -> str:
    """The identity of an NLL block's numbers (see the module docstring)."""
    payload = {
        "weights": weights_digest,
        "betas": config_hash(list(network.betas), 16),
        "types": [network.mean_type, network.var_type, network.loss_type],
        "split": split,
        "data": data,
        "seed": network.seed,
        "block_size": block,
        "device": network.device_type,
        "precision": network.precision,
        "torch": torch.__version__,
        "batch_size": None if network.batch_invariant else network.batch_size,
        "clip_denoised": True,
    }
    return config_hash(payload)


# ---------------------------------------------------------------------------------------------
# The bound in one process (what a Ray task runs).


def setup_worker(network: SamplingJob) -> torch.device:
    """Threads and deterministic kernels of an eval task; its device."""
    torch.set_num_threads(network.torch_threads)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    device = devices.task_device(network.use_gpu, "eval.use_gpu")
    set_matmul_precision(network.precision, device.type)  # TF32 flags explicit
    return device


def image_nll(
    model: UNet,
    diffusion: GaussianDiffusion,
    images: np.ndarray,
    indices: range | list[int],
    seed: int,
    batch_size: int,
    precision: Precision = "fp32",
) -> dict[str, np.ndarray]:
    """calc_bpd_loop of uint8 ``images`` [n, R, R, 3], image k drawing noise from indices[k],
    computed in ``precision`` (model.precision, pipeline.model.precision).

    Returns float64 arrays: total_bpd, prior_bpd [n]; vb, xstart_mse, mse [n, T] (bits/dim
    per 0-indexed t; vb[:, 0] is the decoder L_0; mse values in [-1, 1] units squared).
    """
    device = next(model.parameters()).device
    indices = list(indices)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in TERMS}
    with torch.inference_mode(), compute_precision(precision, device.type):
        for b in range(0, len(indices), batch_size):
            x = to_model_input(images[b : b + batch_size]).to(device)
            noise = ImageNoise(seed, indices[b : b + batch_size], device=device)
            out = diffusion.calc_bpd_loop(model, x, clip_denoised=True, noise_fn=noise)
            for k in TERMS:
                parts[k].append(out[k].double().cpu().numpy())
    T = diffusion.num_timesteps
    empty = {k: np.zeros((0, T) if k in ("vb", "xstart_mse", "mse") else 0) for k in TERMS}
    return {k: np.concatenate(v) if v else empty[k] for k, v in parts.items()}


def nll_block(start: int, stop: int, job: NllJob) -> dict[str, np.ndarray]:
    """The Ray task of one block: the terms of images [start, stop) of the job's split."""
    device = setup_worker(job.network)
    model, diffusion = job.network.model(device), job.network.diffusion()
    images = job.images[start:stop]
    n = job.network
    return image_nll(
        model, diffusion, images, range(start, stop), n.seed, n.batch_size, n.precision
    )


# ---------------------------------------------------------------------------------------------
# Exact aggregation.


def summarize(terms: dict[str, np.ndarray]) -> dict[str, Any]:
    """Sums over images of every term (exact across blocks) and the bound in bits/dim.

    Returns count, nll_bpd (mean total bound), prior_sum, and the [T] sums vb_sum,
    xstart_mse_sum, xstart_rmse_sum (of the per-image sqrt(MSE)), mse_sum, and the per-t means
    vb_bpd, xstart_mse, mse.
    """
    count = int(terms["total_bpd"].shape[0])
    if count == 0:
        raise ValueError("no images to summarize")
    sums = {
        "prior_sum": float(terms["prior_bpd"].sum()),
        "vb_sum": terms["vb"].sum(axis=0),
        "xstart_mse_sum": terms["xstart_mse"].sum(axis=0),
        "xstart_rmse_sum": np.sqrt(terms["xstart_mse"]).sum(axis=0),
        "mse_sum": terms["mse"].sum(axis=0),
    }
    return {
        "count": count,
        "nll_bpd": float(terms["total_bpd"].sum()) / count,
        **sums,
        "vb_bpd": sums["vb_sum"] / count,
        "xstart_mse": sums["xstart_mse_sum"] / count,
        "mse": sums["mse_sum"] / count,
    }


# ---------------------------------------------------------------------------------------------
# The driver.


@dataclass
class NllResult:
    """The outcome of :func:`compute_nll` for one split."""

    split: str
    terms: dict[str, np.ndarray]  # per image, in index order (see image_nll)
    summary: dict[str, Any]  # see summarize
    run: BlockRun
    work_dir: Path


def eval_resources(cfg: Config) -> dict[str, float]:
    """Ray resources of one eval task (NLL block or figure strip)."""
    e = cfg.eval
    resources: dict[str, float] = {"num_cpus": e.cpus_per_worker}
    if e.use_gpu:
        resources["num_gpus"] = e.gpus_per_worker
    return resources


def compute_nll(
    cfg: Config,
    variant: str,
    network: SamplingJob,
    weights_digest: str,
    split: str,
    n_images: int,
    root: Path = Path("."),
    connect: Callable[[], None] | None = None,
) -> NllResult:
    """The bound of the split's first ``n_images`` images (fewer if the split is smaller).

    ``network`` comes from :func:`eval_network`; ``weights_digest`` is its weights_digest()
    (computed once by the caller: it reads every weight). ``connect`` starts Ray when a block
    must be computed (default: pipeline.cluster.raycluster.init_ray).
    """
    data_dir = root / layout.data_dir(cfg.scale)
    images = open_split(data_dir, split)
    n = min(n_images, len(images))
    block = cfg.eval.nll_block_size
    key = nll_key(network, weights_digest, split, split_digest(data_dir, split), block)
    work = shared_path(cfg, root, layout.work_dir("nll", variant)) / f"{split}-{key}"
    job = NllJob(network, images[:n], split)
    connect = connect or functools.partial(init_ray, cfg.ray)
    with synced(cfg, root, work, ("block-*.npz",)):  # a bucket: each block uploaded
        run = run_blocks(
            nll_block,
            n,
            block,
            work,
            cfg.eval.num_workers,
            eval_resources(cfg),
            desc="images",
            label=f"bound, {split} images",
            shared=job,
            connect=connect,
            steps_per_item=network.diffusion().num_timesteps,  # terms: progress within blocks
        )
    terms = merge_blocks(work, n, block)
    return NllResult(split, terms, summarize(terms), run, work)
