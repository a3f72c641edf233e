"""Evaluating one variant (stage ``evaluate``): FID/IS, the NLL bound, rate-distortion, figures.

- FID against the reference splits and IS of ``samples/<variant>/``'s shards through
  torch-fidelity (pipeline.evaluation.fidelity), cached under ``work/fid/<variant>``: in this
  process, or as one GPU task when ``eval.inception_device`` is cuda and this process sees no
  GPU (pipeline.evaluation.inception_task: a CPU head).
- The NLL bound on the test set (and optionally a train subset) on Ray
  (pipeline.evaluation.likelihood),
  resumable under ``work/nll/<variant>``; from its per-timestep sums the rate-distortion curve
  (pipeline.evaluation.rate_distortion, Fig. 5, Table 4). ``eval.nll_images: 0`` skips both.
- Fig. 7 and Fig. 8 in one Ray task (pipeline.evaluation.reconstruction), cached beside the NLL
  blocks.

Ray starts once, and only when a block or a figure must be computed. Every input is checked
first, so a missing or short sample set, a resolution mismatch or a wrong checksum is a one-line
DataError before any long computation. pipeline.evaluation.outputs writes and logs the result.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import layout
from pipeline.choices import Precision
from pipeline.cluster.raycluster import init_ray
from pipeline.cluster.runrecord import model_run_id
from pipeline.config import Config, Variant
from pipeline.data import open_split, read_manifest
from pipeline.data.imageviews import ImagePrefix
from pipeline.errors import ConfigError, DataError
from pipeline.evaluation.feature_weights import project_inception_weights
from pipeline.evaluation.featurenet import CLASSIFIER_SCORES, classifier_scores
from pipeline.evaluation.fidelity import check_images, reference_files, stand_in_label
from pipeline.evaluation.inception_task import InceptionRunner
from pipeline.evaluation.likelihood import NllResult, compute_nll, eval_network, eval_resources
from pipeline.evaluation.rate_distortion import rate_distortion, table4_errors, table4_rows
from pipeline.evaluation.reconstruction import FigureSpec, submit_figures
from pipeline.sampling.draw import ModelInfo, load_model_info
from pipeline.sampling.job import SamplingJob
from pipeline.sampling.shards import SampleShards, open_samples

# ---------------------------------------------------------------------------------------------
# Checks.


def check_eval_config(cfg: Config) -> None:
    """ConfigError for eval settings that params' types alone cannot rule out."""
    e, T, where = cfg.eval, cfg.diffusion.num_timesteps, f"presets.{cfg.scale}.eval"
    counts = {
        "nll_images": e.nll_images,
        "nll_train_images": e.nll_train_images,
        "recon_images": e.recon_images,
        "interp_pairs": e.interp_pairs,
        "seed": e.seed,
    }
    for key, value in counts.items():
        if value < 0:
            raise ConfigError(f"{where}.{key} must be >= 0 (got {value})")
    positive = {
        "recon_draws": e.recon_draws,
        "torch_threads": e.torch_threads,
        "cpus_per_worker": e.cpus_per_worker,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{where}.{key} must be positive (got {value})")
    if e.interp_lambdas < 2:
        raise ConfigError(f"{where}.interp_lambdas must be at least 2 (0 and 1)")
    steps_1based = {"recon_ts": e.recon_ts, "rd_steps": e.rd_steps, "interp_t": [e.interp_t]}
    for key, steps in steps_1based.items():
        bad = [t for t in steps if not 1 <= t <= T]
        if bad:
            raise ConfigError(f"{where}.{key}: {bad} outside [1, {T}] (1-based, T = {T})")
    if e.use_gpu and e.gpus_per_worker <= 0:
        raise ConfigError(f"{where}.gpus_per_worker must be positive with use_gpu (got 0)")


def load_samples(
    variant: str,
    info: ModelInfo,
    root: Path = Path("."),
    precision: Precision | None = None,
    stage: str | None = None,
) -> tuple[SampleShards, dict]:
    """samples/<variant>/'s shards (memory-mapped, hashes verified) and its manifest; ``stage``
    is the DVC stage that draws them (default sample@<variant>), for the errors' hint.

    DataError when the manifest or a shard is missing, unreadable or altered, or when the
    samples were drawn from other weights or (``precision`` given) in another model.precision.
    """
    folder = root / layout.samples_dir(variant)
    manifest_path = folder / "manifest.json"
    hint = f"run `dvc repro {stage or f'sample@{variant}'}`"
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path}: not found ({hint})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{manifest_path}: unreadable ({type(e).__name__}); {hint}") from None
    if manifest.get("weights_sha256") not in (None, info.sha256):
        raise DataError(f"{folder}: drawn from other weights than {info.weights} ({hint})")
    if precision is not None and manifest.get("precision", "fp32") != precision:
        raise DataError(
            f"{folder}: drawn in precision {manifest.get('precision')} but params say "
            f"model.precision: {precision} ({hint})"
        )
    # every shard read once to check its sha256, then mapped: read in pages, never whole
    return open_samples(folder, manifest, hint), manifest


def check_resolution(
    cfg: Config,
    network: SamplingJob,
    samples: np.ndarray | SampleShards,
    variant: str,
    root: Path = Path("."),
) -> None:
    """DataError unless the network, the samples and the prepared data share one resolution."""
    data = int(read_manifest(root / layout.data_dir(cfg.scale))["resolution"])
    found = {"the network": network.unet["resolution"], "the samples": samples.shape[1]}
    bad = {k: v for k, v in found.items() if v != data}
    if bad:
        what = ", ".join(f"{k} {v}x{v}" for k, v in bad.items())
        raise DataError(
            f"{variant}: {what}, but data/{cfg.scale} holds {data}x{data} images; "
            f"rerun `dvc repro train@{variant} sample@{variant}`"
        )


# ---------------------------------------------------------------------------------------------
# The evaluation.


@dataclass
class Evaluation:
    """Everything the evaluate stage writes for one variant."""

    variant: str
    metrics: dict[str, Any]  # metrics/<variant>.json
    label: dict[str, Any]  # stand_in_label
    nll: dict[str, NllResult] = field(default_factory=dict)  # by split
    curve: dict[str, np.ndarray] | None = None  # rate_distortion over the test split
    figures: dict[str, np.ndarray] = field(default_factory=dict)  # reconstruction arrays
    spec: FigureSpec | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds
    run_id: str | None = None
    key: str = ""  # the outputs' name (Config.run_key): the variant's, or <V>-s<k>; "": variant

    def __post_init__(self) -> None:
        self.key = self.key or self.variant


class _Clock:
    """Seconds spent per part, and a Ray connect that counts its own start-up."""

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.seconds = cfg, dict[str, float]()

    def add(self, part: str, started: float) -> None:
        self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - started

    def connect(self) -> None:
        import ray

        if not ray.is_initialized():
            started = time.perf_counter()
            init_ray(self.cfg.ray)
            self.add("ray_init", started)


def evaluate_variant(cfg: Config, variant: Variant, root: Path = Path(".")) -> Evaluation:
    """Compute every metric and figure of ``variant`` (see the module docstring).

    Every input is checked (one-line DataError) before any long computation starts.
    """
    clock, started = _Clock(cfg), time.perf_counter()
    key = cfg.run_key(variant.name)  # <V>, or <V>-s<k> for a further training seed
    info = load_model_info(root / layout.model_dir(key), variant, cfg.scale)
    stage = cfg.stage_name("sample", variant.name)
    samples, sample_manifest = load_samples(key, info, root, cfg.model.precision, stage)
    hint = f"rerun `dvc repro {stage}`"
    check_images(samples, f"samples/{key}", max(2, cfg.sample.n_samples), hint=hint)
    network = eval_network(cfg, variant, info.weights)
    check_resolution(cfg, network, samples, variant.name, root)  # names the main stages
    weights = project_inception_weights(cfg, root)
    synthetic = bool(read_manifest(root / layout.data_dir(cfg.scale)).get("synthetic"))
    result = Evaluation(variant.name, {}, stand_in_label(cfg, weights, synthetic), key=key)
    result.run_id = model_run_id(cfg, key, info.meta, root)  # before any work: DataError if none
    t0 = time.perf_counter()
    # here, or as a GPU task when the preset asks for cuda and this driver has no GPU
    fid = InceptionRunner(cfg).fid_is(
        ImagePrefix(samples, len(samples)),  # read in chunks, mapped pages released as it goes
        reference_files(root / layout.reference_dir(cfg.scale)),
        weights,
        root / layout.work_dir("fid", key),
        cfg.eval.is_splits,
        expected=cfg.sample.n_samples,
        bootstrap=cfg.eval.fid_bootstrap,
        bootstrap_seed=cfg.eval.seed,
    )
    fid.update(classifier_scores(weights, samples))
    clock.add("fid_is", t0)
    t0 = time.perf_counter()
    run_on_ray(cfg, key, network, result, clock, root)
    clock.add("nll_and_figures", t0)
    result.metrics = metrics_json(cfg, variant, fid, result, sample_manifest)
    clock.add("total", started)
    result.timings = clock.seconds
    return result


def run_on_ray(
    cfg: Config, key: str, network: SamplingJob, result: Evaluation, clock: _Clock, root: Path
) -> None:
    """The figures' task and the NLL blocks (test, then train), sharing the Ray workers.

    Fills ``result.figures``, ``result.spec``, ``result.nll`` and ``result.curve``.
    """
    digest = network.weights_digest()  # reads every weight: once
    result.spec = figure_spec(cfg, root)
    work = root / layout.work_dir("nll", key)  # key: Config.run_key of the variant
    resources = eval_resources(cfg)
    pending = submit_figures(network, digest, result.spec, work, resources, clock.connect)
    for split, count in (("test", cfg.eval.nll_images), ("train", cfg.eval.nll_train_images)):
        if count > 0:
            result.nll[split] = compute_nll(
                cfg, key, network, digest, split, count, root, clock.connect
            )
    result.figures = pending.result()
    if "test" in result.nll:
        s = result.nll["test"].summary
        result.curve = rate_distortion(
            s["vb_sum"], s["prior_sum"], s["xstart_mse_sum"], s["count"], s["xstart_rmse_sum"]
        )


def figure_spec(cfg: Config, root: Path = Path(".")) -> FigureSpec:
    """Fig. 7 and 8 settings with their test images (the first images of the test split).

    Data without a test split (LSUN at ``test_fraction: 0``, as the official run trained on every
    record) use the first training images instead.
    """
    e = cfg.eval
    data = root / layout.data_dir(cfg.scale)
    split = "test" if "test" in read_manifest(data)["splits"] else "train"
    test = open_split(data, split)
    n_recon = min(e.recon_images, len(test))
    pairs = min(e.interp_pairs, len(test) // 2)
    both = test[: 2 * pairs]
    return FigureSpec(
        recon_images=test[:n_recon],
        recon_ts=tuple(e.recon_ts),
        recon_draws=e.recon_draws,
        interp_sources=both[0::2],
        interp_targets=both[1::2],
        interp_t=e.interp_t,
        interp_lambdas=e.interp_lambdas,
        seed=e.seed,
    )


def metrics_json(
    cfg: Config, variant: Variant, fid: dict[str, Any], result: Evaluation, samples: dict
) -> dict[str, Any]:
    """The content of metrics/<variant>.json: deterministic (no timings), flat where it can be."""
    test, train = result.nll.get("test"), result.nll.get("train")
    out: dict[str, Any] = {
        "fid_train": fid["fid_train"],
        "fid_test": fid["fid_test"],
        "is_mean": fid["is_mean"],
        "is_std": fid["is_std"],
        "n_samples": fid["n_samples"],
        # uncertainty (docs/report-and-mlflow.md): FID's bootstrap standard error, the NLL's
        # standard error over images; IS's is its split std with is_splits splits
        "fid_train_se": fid.get("fid_train_se"),
        "fid_test_se": fid.get("fid_test_se"),
        "fid_bootstrap": cfg.eval.fid_bootstrap,
        "is_splits": cfg.eval.is_splits,
        "sampler": samples.get("sampler"),
        "nll_bpd": test.summary["nll_bpd"] if test else None,
        "nll_bpd_se": standard_error(test.terms["total_bpd"]) if test else None,
        "nll_train_bpd": train.summary["nll_bpd"] if train else None,
        "nll_train_bpd_se": standard_error(train.terms["total_bpd"]) if train else None,
        "nll_images": test.summary["count"] if test else 0,
        "nll_train_images": train.summary["count"] if train else 0,
    }
    if test:
        s = test.summary
        out["nll_prior_bpd"] = s["prior_sum"] / s["count"]
        out["nll_decoder_bpd"] = float(s["vb_bpd"][0])  # L_0, the distortion term in bits
        assert result.curve is not None  # computed with the test split's bound
        rows = table4_rows(result.curve, tuple(cfg.eval.rd_steps))
        t = test.terms
        errors = table4_errors(t["prior_bpd"], t["vb"], t["xstart_mse"], tuple(cfg.eval.rd_steps))
        out["table4"] = {
            str(r["steps"]): {
                "rate_bpd": r["rate_bpd"],
                "rmse": r["distortion_rmse"],
                "rmse_per_image": r["distortion_rmse_per_image"],
                "rate_bpd_se": e["rate_bpd_se"],  # standard errors over the nll_images
                "rmse_se": e["distortion_rmse_se"],
                "rmse_per_image_se": e["distortion_rmse_per_image_se"],
            }
            for r, e in zip(rows, errors, strict=True)
        }
    out.update({k: fid[k] for k in CLASSIFIER_SCORES if k in fid})
    out.update(result.label)
    return {"variant": variant.name, "scale": cfg.scale, **out}


def standard_error(values: np.ndarray) -> float | None:
    """The standard error of the mean of per-image ``values`` [n]: std (ddof 1) / sqrt(n)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) >= 2 else None
