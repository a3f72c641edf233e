"""Running the reverse process from a noised test image: Fig. 7 (reconstructions) and Fig. 8
(interpolation in latent space).

Fig. 7: for each t, x_t ~ q(x_t | x_0) of a test image, then ``draws`` runs of the reverse
process from that same x_t down to x_0 (different reverse noise): what the samples that share
the latent x_t have in common.

Fig. 8: two test images x_0, x'_0 are encoded stochastically to x_t, x'_t with independent
q-noise (as the official code does: each endpoint is its own draw of q(x_t | x_0)), mixed linearly,
x̄_t = (1 - λ) x_t + λ x'_t for evenly spaced λ in [0, 1], and decoded by the reverse process
with the same reverse noise for every λ, so that only λ changes along a row (paper Section 4.3:
"We fixed the noise for different values of λ"). λ = 0 and λ = 1 are the reconstructions of
the two sources.

Timesteps here are the paper's, 1-based (t = T is pure noise); the diffusion's are 0-indexed.
All noise comes from per-row generators (pipeline.sampling.noise) under streams derived from the
eval seed, so the figures are deterministic and independent of batching. The network runs in one Ray
task with the eval resources (the paper's network on a CPU driver would take half an hour), and
the result is cached by content next to the NLL blocks.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from torch import Tensor

from pipeline.atomic import save_npz
from pipeline.cluster.gputasks import submit
from pipeline.cluster.taskprogress import BlockProgress
from pipeline.config import config_hash
from pipeline.data import to_model_input, to_uint8
from pipeline.evaluation.fidelity import content_key
from pipeline.evaluation.likelihood import setup_worker
from pipeline.model.diffusion import GaussianDiffusion, NoiseFn
from pipeline.model.unet import UNet
from pipeline.sampling.job import SamplingJob
from pipeline.sampling.noise import ImageNoise, item_seed


def stream_seed(seed: int, purpose: str, t: int = 0) -> int:
    """The base seed of one noise stream (``purpose`` at 1-based step ``t``) under ``seed``."""
    return item_seed(seed, zlib.crc32(f"{purpose}:{t}".encode()))


@dataclass
class Chain:
    """Rows that run the reverse process from x_t (paper's 1-based t) with their own noise."""

    x_t: Tensor  # [B, C, H, W]
    t: int
    noise_fn: NoiseFn  # asked once per step s > 1, in order (as in p_sample_loop)


def reverse_chains(model: UNet, diffusion: GaussianDiffusion, chains: list[Chain]) -> list[Tensor]:
    """Every chain from its x_t down to x_0, in one batched loop; returns each chain's x_0.

    At step s the chains with t >= s take their reverse step together (one network call), each
    drawing its own noise as it would alone; with a batch-invariant network (the U-Net on the
    CPU in float32) each result is the same as running its chain alone, at a fraction of the
    network calls (max t instead of the sum of the t's).
    """
    xs = [c.x_t for c in chains]
    for i in reversed(range(max((c.t for c in chains), default=0))):
        active = [k for k, c in enumerate(chains) if c.t > i]
        x = torch.cat([xs[k] for k in active])
        if i > 0:
            noise = torch.cat([chains[k].noise_fn(tuple(xs[k].shape)) for k in active])
        else:
            noise = torch.zeros_like(x)
        step = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        out = diffusion.p_sample(model, x, step, noise=noise.to(x.device))["sample"]
        for k, part in zip(active, out.split([len(xs[k]) for k in active]), strict=True):
            xs[k] = part
    return xs


def reverse_from(
    model: UNet, diffusion: GaussianDiffusion, x_t: Tensor, t: int, noise_fn: NoiseFn
) -> Tensor:
    """Run p(x_{s-1} | x_s) from x_t (paper's 1-based t) to x_0; returns x_0 [B, C, H, W]."""
    return reverse_chains(model, diffusion, [Chain(x_t, t, noise_fn)])[0]


def q_sample_at(diffusion: GaussianDiffusion, x0: Tensor, t: int, noise: Tensor) -> Tensor:
    """x_t ~ q(x_t | x_0) at the paper's 1-based t with the given noise."""
    step = torch.full((x0.shape[0],), t - 1, dtype=torch.long, device=x0.device)
    return diffusion.q_sample(x0, step, noise)


def reconstruction_chains(
    diffusion: GaussianDiffusion, x0: Tensor, ts: tuple[int, ...], draws: int, seed: int
) -> list[Chain]:
    """Fig. 7's chains, one per t: ``draws`` rows per image (image-major), all from its x_t."""
    n, chains = x0.shape[0], []
    for t in ts:
        eps = ImageNoise(stream_seed(seed, "recon-q", t), range(n), device=x0.device)
        x_t = q_sample_at(diffusion, x0, t, eps(tuple(x0.shape)))
        noise = ImageNoise(stream_seed(seed, "recon-p", t), range(n * draws), device=x0.device)
        chains.append(Chain(x_t.repeat_interleave(draws, dim=0), t, noise))
    return chains


def lambdas(count: int) -> np.ndarray:
    """``count`` interpolation weights evenly spaced in [0, 1] (float64)."""
    return np.linspace(0.0, 1.0, count)


def interpolation_chain(
    diffusion: GaussianDiffusion, a: Tensor, b: Tensor, t: int, count: int, seed: int
) -> Chain:
    """Fig. 8's chain: rows (pair-major) (1 - λ) x_t + λ x'_t, one noise stream per pair.

    The two endpoints draw independent q-noise (streams ``interp-q`` and ``interp-q2``); the
    reverse noise (``interp-p``) is shared by every λ of a pair.
    """
    P, device = a.shape[0], a.device
    eps = ImageNoise(stream_seed(seed, "interp-q", t), range(P), device=device)(tuple(a.shape))
    eps2 = ImageNoise(stream_seed(seed, "interp-q2", t), range(P), device=device)(tuple(b.shape))
    x_t, x_t2 = q_sample_at(diffusion, a, t, eps), q_sample_at(diffusion, b, t, eps2)
    lam = torch.tensor(lambdas(count), dtype=x_t.dtype, device=device).view(1, -1, 1, 1, 1)
    mixed = ((1 - lam) * x_t.unsqueeze(1) + lam * x_t2.unsqueeze(1)).flatten(0, 1)
    rows = [p for p in range(P) for _ in range(count)]
    return Chain(mixed, t, ImageNoise(stream_seed(seed, "interp-p", t), rows, device=device))


def reconstructions(
    model: UNet,
    diffusion: GaussianDiffusion,
    images: np.ndarray,
    ts: tuple[int, ...],
    draws: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Fig. 7 for uint8 ``images`` [N, R, R, 3].

    Returns ``x_t`` uint8 [N, K, R, R, 3] (clipped for display) and ``x_0`` uint8
    [N, K, draws, R, R, 3]: the reverse process from each x_t, for the K steps ``ts``.
    """
    device = next(model.parameters()).device
    with torch.inference_mode():
        chains = reconstruction_chains(
            diffusion, to_model_input(images).to(device), ts, draws, seed
        )
        return _recon_arrays(chains, reverse_chains(model, diffusion, chains), images.shape)


def _recon_arrays(chains: list[Chain], outs: list[Tensor], shape: tuple) -> dict[str, np.ndarray]:
    n = shape[0]
    draws = chains[0].x_t.shape[0] // n
    shown = [to_uint8(c.x_t[::draws]) for c in chains]
    decoded = [to_uint8(x).reshape(n, draws, *shape[1:]) for x in outs]
    return {"x_t": np.stack(shown, axis=1), "x_0": np.stack(decoded, axis=1)}


def interpolations(
    model: UNet,
    diffusion: GaussianDiffusion,
    sources: np.ndarray,
    targets: np.ndarray,
    t: int,
    count: int,
    seed: int,
) -> np.ndarray:
    """Fig. 8: uint8 [P, count, R, R, 3], row p decoding (1 - λ) x_t + λ x'_t of pair p.

    ``sources`` and ``targets`` are uint8 [P, R, R, 3]; λ = lambdas(count).
    """
    device = next(model.parameters()).device
    a, b = to_model_input(sources).to(device), to_model_input(targets).to(device)
    with torch.inference_mode():
        chain = interpolation_chain(diffusion, a, b, t, count, seed)
        (out,) = reverse_chains(model, diffusion, [chain])
    return to_uint8(out).reshape(len(sources), count, *sources.shape[1:])


# ---------------------------------------------------------------------------------------------
# One Ray task for both figures, cached by content.

FIGURES = "figures"  # the progress key of the figure task


@dataclass(frozen=True)
class FigureSpec:
    """What Fig. 7 and Fig. 8 show (eval section), with their test images."""

    recon_images: np.ndarray  # uint8 [N, R, R, 3]
    recon_ts: tuple[int, ...]
    recon_draws: int
    interp_sources: np.ndarray  # uint8 [P, R, R, 3]
    interp_targets: np.ndarray  # uint8 [P, R, R, 3]
    interp_t: int
    interp_lambdas: int
    seed: int

    def key(self, weights_digest: str, network: SamplingJob) -> str:
        """The identity of the figures' pixels."""
        images = [
            content_key(x) for x in (self.recon_images, self.interp_sources, self.interp_targets)
        ]
        payload = {
            "weights": weights_digest,
            "betas": config_hash(list(network.betas), 16),
            "types": [network.mean_type, network.var_type, network.loss_type],
            "images": images,
            "recon": [list(self.recon_ts), self.recon_draws],
            "interp": [self.interp_t, self.interp_lambdas],
            "interp_q_noise": "independent",  # the two endpoints draw their own q-noise
            "seed": self.seed,
            "device": network.device_type,
            "torch": torch.__version__,
        }
        return config_hash(payload)

    def image_steps(self) -> int:
        """Per-image noise draws of figure_arrays (its progress unit): q noise (Fig. 8: one
        draw per endpoint), then t - 1 reverse steps of every chain."""
        n, p = len(self.recon_images), len(self.interp_sources)
        recon = sum(n + n * self.recon_draws * (t - 1) for t in self.recon_ts) if n else 0
        interp = 2 * p + p * self.interp_lambdas * (self.interp_t - 1) if p else 0
        return recon + interp


def figure_arrays(model: UNet, diffusion: GaussianDiffusion, spec: FigureSpec) -> dict:
    """Fig. 7 and Fig. 8 pixels (recon_x_t, recon_x_0 as in reconstructions; interp as in
    interpolations), every chain in one batched reverse loop."""
    device = next(model.parameters()).device
    chains: list[Chain] = []
    with torch.inference_mode():
        if len(spec.recon_images) and spec.recon_ts:
            x0 = to_model_input(spec.recon_images).to(device)
            chains += reconstruction_chains(
                diffusion, x0, spec.recon_ts, spec.recon_draws, spec.seed
            )
        n_recon = len(chains)
        if len(spec.interp_sources):
            a = to_model_input(spec.interp_sources).to(device)
            b = to_model_input(spec.interp_targets).to(device)
            chains.append(
                interpolation_chain(diffusion, a, b, spec.interp_t, spec.interp_lambdas, spec.seed)
            )
        outs = reverse_chains(model, diffusion, chains)
    out: dict[str, np.ndarray] = {}
    if n_recon:
        recon = _recon_arrays(chains[:n_recon], outs[:n_recon], spec.recon_images.shape)
        out.update(recon_x_t=recon["x_t"], recon_x_0=recon["x_0"])
    if len(chains) > n_recon:
        shape = (len(spec.interp_sources), spec.interp_lambdas, *spec.interp_sources.shape[1:])
        out["interp"] = to_uint8(outs[-1]).reshape(shape)
    return out


def _figure_task(network: SamplingJob, spec: FigureSpec) -> dict[str, np.ndarray]:
    device = setup_worker(network)
    return figure_arrays(network.model(device), network.diffusion(), spec)


class PendingFigures:
    """Figure arrays being computed by a Ray task, or already read from the cache."""

    def __init__(
        self,
        path: Path,
        arrays: dict | None = None,
        ref: Any = None,
        progress: BlockProgress | None = None,
    ) -> None:
        self.path, self.arrays, self.ref, self.progress = path, arrays, ref, progress

    def result(self) -> dict[str, np.ndarray]:
        """The arrays (waiting for the task and caching its result the first time)."""
        if self.arrays is None:
            if self.progress is not None:
                while not ray.wait([self.ref], timeout=2.0)[0]:
                    self.progress.poll()
                self.progress.finished(FIGURES, self.progress.total)
                self.progress.close()
            self.arrays = ray.get(self.ref)
            save_npz(self.path, **self.arrays)
        return self.arrays


def submit_figures(
    network: SamplingJob,
    weights_digest: str,
    spec: FigureSpec,
    work: Path,
    resources: dict[str, float],
    connect: Callable[[], None],
) -> PendingFigures:
    """figure_arrays read from ``work``, or submitted as one Ray task (``connect()`` first).

    Submitted before the NLL blocks, the task shares the workers with them instead of
    running alone after them.
    """
    path = Path(work) / f"figures-{spec.key(weights_digest, network)}.npz"
    if path.is_file():
        with np.load(path) as f:
            return PendingFigures(path, arrays={k: f[k] for k in f.files})
    connect()
    progress = BlockProgress(spec.image_steps(), 0, "Fig. 7/8 image-steps", steps_per_item=1)
    ref = submit(
        _figure_task,
        network,
        spec,
        resources=resources,
        progress=progress.handle(FIGURES),
        max_retries=3,
        retry_exceptions=True,
    )
    return PendingFigures(path, ref=ref, progress=progress)
