"""Smoke-scale training settings against sample quality, in one process (no Ray, no DVC).

    python -m benchmarks.smoke_settings --tag base --eval-at 120,300,500 --lr 2e-3 --dropout 0

Trains eps_fixed_mse (L_simple, sigma_t^2 = beta_t) on the smoke preset's synthetic 16x16 set
with the library's U-Net and GaussianDiffusion (Adam, linear warmup, no clipping, EMA), and at
each step count of ``--eval-at`` samples 64 images from the EMA network with the smoke sampler
(T ancestral steps, seeded) and scores them with the smoke feature network (the featurenet
stage's classifier, trained here once and cached in /tmp): FID of the 64 samples against the
whole train split's 64-d penultimate features (the Fréchet distance in float64 numpy, the same
formula torch-fidelity uses) and the classifier's confidence (mean top-class probability; 1/8
for noise). The real-data row (64 test images) is scored the same way. The learning rate is
constant after the warmup (the paper's schedule), so a checkpoint at step n is the run of n
steps. Each evaluation writes a grid PNG (8 x 8, 4x nearest upscaling) into ``--out``.

Appends one JSON line per evaluation to ``benchmarks/results/smoke-settings-<date>.jsonl`` with
steps/s, the training seconds and ``uptime``'s load (the machine is shared: timings are noisy).
FID here is a stand-in metric (a classifier trained on the synthetic set, not Inception): not
comparable to published numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from PIL import Image

from benchmarks import results_dir
from pipeline.data.loaders import to_model_input, to_uint8
from pipeline.data.synthetic import LABEL_NAMES, synthetic_images, synthetic_labels
from pipeline.evaluation.featurenet import (
    confidence,
    load_classifier,
    save_classifier,
    to_input,
    train_classifier,
)
from pipeline.model.diffusion import GaussianDiffusion, linear_beta_schedule
from pipeline.model.unet import UNet
from pipeline.training.ema import EMA

CLASSIFIER = Path("/tmp/ddpm-smoke-settings-classifier-r{res}.pt")


def load() -> str:
    return os.getloadavg().__repr__()


@torch.no_grad()
def features(net, images: np.ndarray) -> np.ndarray:
    """float64 [N, 64]: the classifier's penultimate activations (the FID features)."""
    return net(to_input(images))[0].double().numpy()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature rows ``a`` and ``b``."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def save_grid(images: np.ndarray, path: Path, scale: int = 4) -> None:
    """uint8 [64, R, R, 3] -> an 8 x 8 grid PNG, each pixel ``scale`` x ``scale``."""
    n, r = images.shape[0], images.shape[1]
    side = int(np.sqrt(n))
    grid = images[: side * side].reshape(side, side, r, r, 3).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(side * r, side * r, 3).repeat(scale, 0).repeat(scale, 1)
    Image.fromarray(grid).save(path)


def classifier(train, test, res: int):
    path = Path(str(CLASSIFIER).format(res=res))
    if path.exists():
        return load_classifier(path)
    y_tr = synthetic_labels(0, np.arange(len(train)), "train")
    y_te = synthetic_labels(0, np.arange(len(test)), "test")
    trained = train_classifier(train, y_tr, test, y_te, len(LABEL_NAMES), epochs=12, threads=2)
    print(f"classifier: test acc {trained.test_accuracy:.3f}, {trained.train_seconds:.0f} s")
    save_classifier(trained.net, path)
    return trained.net


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tag", required=True)
    p.add_argument("--eval-at", default="120")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--ema", type=float, default=0.98)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--ch", type=int, default=32)
    p.add_argument("--ch-mult", default="1,2,2")
    p.add_argument("--attn", default="8", help="attention resolutions, comma-separated; '' none")
    p.add_argument("--norm-groups", type=int, default=0, help="GroupNorm groups; 0: min(32, ch)")
    p.add_argument("--T", type=int, default=50)
    p.add_argument("--res", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("/tmp/smoke-settings"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    train = synthetic_images(0, np.arange(2048), a.res, "train")
    test = synthetic_images(0, np.arange(512), a.res, "test")
    net = classifier(train, test, a.res)
    ref = features(net, train)
    real = {"fid_train": frechet(features(net, test[:64]), ref), "conf": confidence(net, test[:64])}
    print(f"real data (64 test images): FID {real['fid_train']:.1f}, conf {real['conf']:.3f}")

    torch.manual_seed(0)
    attn = tuple(int(v) for v in a.attn.split(",") if v)
    mult = tuple(int(v) for v in a.ch_mult.split(","))
    groups = a.norm_groups or min(32, a.ch)
    model = UNet(a.res, 3, 3, a.ch, mult, 1, attn, a.dropout, norm_groups=groups)
    ema = EMA(model, a.ema)
    # the smoke schedule scaled by 1000 / T, as params.yaml does (T = 50: 2e-3 to 0.4)
    diffusion = GaussianDiffusion(linear_beta_schedule(a.T, 1e-4 * 1000 / a.T, 0.02 * 1000 / a.T))
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(s / a.warmup, 1.0) if a.warmup else 1.0
    )
    x_all = to_model_input(train)
    g = torch.Generator().manual_seed(0)
    evals = sorted(int(v) for v in a.eval_at.split(","))
    stamp = datetime.date.today().isoformat()
    log = results_dir() / f"smoke-settings-{stamp}.jsonl"
    train_s, losses = 0.0, []
    model.train()
    for step in range(1, evals[-1] + 1):
        started = time.perf_counter()
        idx = torch.randint(0, len(x_all), (a.batch,), generator=g)
        t = torch.randint(0, a.T, (a.batch,), generator=g)
        loss = diffusion.training_losses(model, x_all[idx], t)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ema.update(model)
        train_s += time.perf_counter() - started
        losses.append(float(loss.detach()))
        if step not in evals:
            continue
        started = time.perf_counter()
        sg = torch.Generator().manual_seed(1)
        with torch.no_grad():
            x = diffusion.p_sample_loop(ema.model, (64, 3, a.res, a.res), generator=sg)
        samples = to_uint8(x)
        sample_s = time.perf_counter() - started
        row = {
            "tag": a.tag,
            "steps": step,
            "settings": {k: v for k, v in vars(a).items() if k not in ("out", "eval_at", "tag")},
            "train_seconds": round(train_s, 1),
            "steps_per_s": round(step / train_s, 2),
            "loss_last50": round(float(np.mean(losses[-50:])), 4),
            "sample_seconds": round(sample_s, 1),
            "fid_train": round(frechet(features(net, samples), ref), 2),
            "classifier_confidence": round(confidence(net, samples), 3),
            "real_data": {k: round(v, 3) for k, v in real.items()},
            "loadavg": load(),
            "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, {a.threads} threads",
        }
        grid = a.out / f"{a.tag}-{step}.png"
        save_grid(samples, grid)
        print(json.dumps(row), flush=True)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
