"""Typed configuration: params.yaml read once into frozen dataclasses.

params.yaml has a ``scale`` switch that picks one of its ``presets``; each preset holds the
sections ``data``, ``model``, ``diffusion``, ``train``, ``sample`` and ``eval``. A key that a
preset leaves out takes the default written here, and the defaults are the paper's CIFAR10
settings (Ho et al. 2020, Sec. 4 and App. B; the official code's where the paper is silent), so
``paper`` needs to spell out little. The sections ``ray`` and ``mlflow``, ``report`` (the
verdict's margins) and the Table-2 ``variants`` sit at the top level: they do not change with
the scale.

Every key can be overridden from DVC, e.g. ``dvc exp run -S scale=paper`` or
``dvc exp run -S presets.smoke.train.lr=1e-4``. Unknown keys and values of the wrong type are
:class:`~pipeline.errors.ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.choices import (
    LOSS_TYPES,
    MEAN_TYPES,
    VAR_TYPES,
    Dataset,
    FixedVarType,
    FlipSource,
    InceptionDevice,
    KlUnits,
    LossType,
    MeanType,
    ModelSource,
    Precision,
    Schedule,
    Selection,
    Split,
    TrainBackend,
    VarType,
    choices,
)
from pipeline.errors import ConfigError

SECTIONS = ("data", "model", "diffusion", "train", "sample", "eval")
# Preset and variant names become parts of paths (data/<scale>, models/<variant>) and of the
# commands dvc.yaml runs (--variant ${key}): plain names only.
NAME = re.compile(r"[a-z0-9_]+")

STAND_IN_NOTE = "stand-in, not comparable to published numbers"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"


@dataclass(frozen=True)
class Variant:
    """One Table-2 row: how the reverse process is parameterised and trained."""

    name: str
    mean_type: MeanType
    var_type: VarType
    loss_type: LossType

    def __post_init__(self) -> None:
        _check_choice(f"variants.{self.name}.mean_type", self.mean_type, MEAN_TYPES)
        _check_choice(f"variants.{self.name}.var_type", self.var_type, VAR_TYPES)
        _check_choice(f"variants.{self.name}.loss_type", self.loss_type, LOSS_TYPES)
        if self.var_type == "learned" and self.loss_type != "kl":
            raise ConfigError(
                f"variants.{self.name}: a learned variance is trained only by the variational "
                f"bound; use loss_type: kl (got {self.loss_type!r})"
            )

    def describe(self) -> dict[str, str]:
        """The variant's name and types, as model.json and manifests record them."""
        return {
            "variant": self.name,
            "mean_type": self.mean_type,
            "var_type": self.var_type,
            "loss_type": self.loss_type,
        }


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are prepared (stage ``prepare``)."""

    dataset: Dataset = "cifar10"
    resolution: int = 32  # output side in pixels (LSUN: 256; synthetic: any)
    source: str | None = None  # local archive (cifar10) or LMDB folder (lsun); None: download
    url: str = CIFAR10_URL  # cifar10 download address, used when source is None
    md5: str = CIFAR10_MD5  # expected md5 of the cifar10 archive
    max_images: int | None = None  # lsun: stop after this many records
    shard_size: int = 10_000  # lsun: images per shard file
    workers: int = 4  # lsun: parallel decode processes
    max_corrupt_fraction: float = 0.01  # lsun: fail when more records than this are undecodable
    test_fraction: float = 0.0  # lsun: images held out as a test split (LSUN has none)
    n_train: int = 50_000  # synthetic: training images
    n_test: int = 10_000  # synthetic: test images
    seed: int = 0  # synthetic: generator seed
    # training loader: random horizontal flips; None: as ``flip_source`` says (FLIPS_OFF). The
    # two sources disagree on LSUN: the paper (App. B) flips every dataset but Bedroom, the
    # official run_lsun.py flipped Bedroom and not Cat (docs/differences.md: the default).
    random_flip: bool | None = None
    flip_source: FlipSource = "official"


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net (pipeline.model.unet); defaults are the paper's 35.7M-parameter CIFAR10 network."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    norm_groups: int = 32
    source: ModelSource = "trained"  # checkpoint: published weights (pipeline.model.convert)
    checkpoint: str | None = None  # folder with a diffusers config.json and weights
    checkpoint_variant: str = "eps_fixed_mse"  # the variant the published weights are
    # training, sampling and the bound compute in: fp32 | tf32 | bf16 (pipeline.model.precision)
    precision: Precision = "fp32"


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process: a linear beta schedule (paper: 1e-4 to 0.02 over T = 1000)."""

    schedule: Schedule = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_timesteps: int = 1000


@dataclass(frozen=True)
class TrainConfig:
    """The paper's training recipe and the Ray Train cluster shape (stage ``train``)."""

    steps: int = 800_000
    batch_size: int = 128  # global batch, split evenly over the workers
    # Where the loop runs: ray (Ray Train: workers on the cluster, restarts, DDP) | process (the
    # train stage's own process: one CPU worker, no Ray; the same loop and bits, without Ray
    # Train's ~20 s start-up and background, which cost a 2-core machine ~25% of every step).
    backend: TrainBackend = "ray"
    lr: float = 2e-4
    warmup: int = 5000  # linear learning-rate warmup steps
    grad_clip: float = 1.0  # gradient-norm clip (of each virtual replica's gradient, below)
    # Virtual replicas whose gradients are clipped one by one before averaging (the official
    # TPU v3-8 run: 8 replicas of batch/8 images). 1: clip the whole batch's gradient.
    clip_replicas: int = 8
    kl_units: KlUnits = "bits"  # loss_type kl trains on the bound in bits (official) | nats
    ema_decay: float = 0.9999
    seed: int = 0
    log_every: int = 100  # steps between MLflow metric points
    checkpoint_every: int = 10_000  # steps between Ray Train checkpoints
    keep_checkpoints: int = 3
    # Ray Train workers (one per GPU on a GPU cluster): a number, or [min, max] for elastic
    # training (Ray presets): Ray Train runs as many as the cluster holds, min to max, restarts
    # on the workers left when a node is lost and grows the group when one joins (checked every
    # elastic_resize_s seconds); every W in the range must divide batch_size and clip_replicas.
    num_workers: int | tuple[int, ...] = 1
    elastic_resize_s: float = 60.0  # Ray's elastic_resize_monitor_interval_s (a range only)
    use_gpu: bool = False
    cpus_per_worker: int = 1
    gpus_per_worker: float = 1.0
    torch_threads: int = 1  # torch threads in each CPU worker
    bf16: bool = False  # bf16 autocast
    channels_last: bool = False
    max_failures: int = 3  # Ray Train restarts from the last checkpoint
    compile: bool = False  # torch.compile the network of each worker (fewer launches a step)
    # Evaluation during training (App. B: "evaluated throughout training ... reported on the
    # minimum FID"): every eval_every steps (0: never) the EMA weights are sampled
    # (eval_samples images) and scored with FID against the training reference; select picks
    # which checkpoint becomes models/<V>/: last | best_fid.
    eval_every: int = 0
    eval_samples: int = 0
    select: Selection = "last"
    variants: tuple[str, ...] | None = None  # the variants trained at this scale; None: all

    @property
    def min_workers(self) -> int:
        """The fewest workers training runs on (``num_workers``, or the range's min)."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        """The most workers training runs on (``num_workers``, or the range's max)."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[-1]

    @property
    def elastic(self) -> bool:
        """``num_workers`` is a range of more than one worker count (Ray Train resizes)."""
        return self.min_workers != self.max_workers

    def worker_counts(self) -> range:
        """Every world size W training may run on: min_workers .. max_workers."""
        return range(self.min_workers, self.max_workers + 1)


AUTO = "auto"  # sample/eval num_workers: follow the cluster's GPUs


@dataclass(frozen=True)
class SampleConfig:
    """Algorithm 2 fanned out over Ray workers (stage ``sample``)."""

    n_samples: int = 50_000
    batch_size: int = 256
    block_size: int = 1000  # sample indices per shard: the unit of work, retry and resume
    seed: int = 0  # base seed; sample i draws all its noise from seed (seed, i)
    steps: int | None = None  # None: all T steps (the paper). Fewer: respaced, not the paper's
    # The sampler's variance for fixed-variance variants: None: the variant's var_type;
    # fixedsmall (beta~_t): the official LSUN / CelebA-HQ sampler; fixedlarge (beta_t): CIFAR10.
    var_type: FixedVarType | None = None
    # Ray tasks in flight: a number, or auto: as many as the GPUs (CPUs without use_gpu) Ray
    # reports for the cluster, re-read while the stage runs (pipeline.cluster.blocks)
    num_workers: int | str = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    gpus_per_worker: float = 1.0
    torch_threads: int = 1
    bf16: bool = False
    channels_last: bool = False
    grid_size: int = 64  # images in the sample-grid figure
    progressive_seeds: tuple[int, ...] = (0, 1, 2, 3)  # Fig. 6 rows
    progressive_frames: int = 8  # Fig. 6 columns (x_0 predictions at evenly spaced t)


@dataclass(frozen=True)
class EvalConfig:
    """FID/IS through torch-fidelity and the NLL bound (stage ``evaluate``)."""

    inception_weights: str = "default"  # default | stand-in | classifier | path to a weights file
    inception_sha256: str | None = None  # required check for a local weights file
    fid_against: tuple[Split, ...] = ("train", "test")  # reference splits
    ref_images: int | None = None  # reference images per split; None: the whole split
    is_splits: int = 10
    fid_bootstrap: int = 100  # resamples of the sample features for FID's standard error (0: off)
    classifier_epochs: int = 12  # inception_weights: classifier (stage featurenet): its training
    batch_size: int = 64  # Inception batch size
    inception_device: InceptionDevice = "auto"  # auto: cuda when visible
    inception_threads: int = 2  # torch threads for Inception on CPU (2: ~95 ms/img, 1: ~175)
    nll_images: int = 10_000  # test images for the bound (the paper: all 10,000)
    nll_train_images: int = 0  # optional train-set bound, Table 1's "(train)" figure
    nll_batch_size: int = 100
    nll_block_size: int = 500  # images per NLL shard (unit of work, retry and resume)
    num_workers: int | str = 1  # NLL tasks in flight: a number or auto (as sample.num_workers)
    use_gpu: bool = False
    cpus_per_worker: int = 1
    gpus_per_worker: float = 1.0
    torch_threads: int = 1
    seed: int = 0  # base seed of the NLL's q(x_t | x_0) noise (per test image) and the figures
    interp_t: int = 500  # Fig. 8: the latent step of the interpolation (1-based, paper: 500)
    interp_lambdas: int = 9  # Fig. 8: interpolation weights, evenly spaced in [0, 1]
    interp_pairs: int = 2  # Fig. 8 rows: pairs of test images (0, 1), (2, 3), ...
    recon_ts: tuple[int, ...] = (250, 500, 750, 1000)  # Fig. 7: reconstruct from these x_t
    recon_images: int = 2  # Fig. 7 rows: the first test images
    recon_draws: int = 3  # Fig. 7: samples of p(x_0 | x_t) per t, all from the same x_t
    rd_steps: tuple[int, ...] = (1000, 900, 800, 700, 600, 500, 400, 300, 200, 100)  # Table 4


@dataclass(frozen=True)
class RayConfig:
    """How to reach Ray. RAY_ADDRESS (environment) wins over ``address``."""

    address: str | None = None  # None: start a local cluster for this stage
    num_cpus: int | None = None  # local cluster only; None: all cores
    log_to_driver: bool = True  # False hides worker output (and Ray's per-report lines)


@dataclass(frozen=True)
class MlflowConfig:
    """Tracking. MLFLOW_TRACKING_URI (environment) wins over ``tracking_uri``."""

    tracking_uri: str | None = None  # None: sqlite:///<repo>/mlflow.db
    experiment: str = "ddpm-repro"


@dataclass(frozen=True)
class ClusterConfig:
    """Cluster storage. DDPM_CLUSTER_STORAGE (environment) wins over ``storage``."""

    storage: str | None = None  # a path every node mounts (NFS...); None: single node, local
    # independent stages run at once (pipeline.cluster.parallel); None: 1 on one node, as many
    # trainings as the cluster holds when cluster storage is set
    max_parallel_stages: int | None = None


# ---------------------------------------------------------------------------------------------
# The verdict's declarations (section ``report``; docs/report-and-mlflow.md, "Reading the verdict")

# A margin or a seed std: a number in the figure's own units, or "<p>%" of the paper's value.
Amount = float | str


@dataclass(frozen=True)
class FigureMargins:
    """How far ours may lie from the paper's number and still reproduce it, per figure: the
    equivalence margin (a number in the figure's units, or "<p>%" of the paper's value)."""

    fid: Amount = "10%"  # FID (train, test; Table 3's LSUN FIDs too)
    inception_score: Amount = 0.3  # IS
    nll: Amount = 0.05  # NLL, bits/dim (test, train)
    rate: Amount = 0.05  # Table 4's rate, bits/dim
    distortion: Amount = "10%"  # Table 4's distortion, RMSE on [0, 255]


@dataclass(frozen=True)
class FigureSeedStds:
    """A declared estimate of how much one training run's figure moves with the training seed
    (e.g. the std of an earlier multi-seed run), per figure; null: none declared. Used only for a
    figure measured with one training seed."""

    fid: Amount | None = None
    inception_score: Amount | None = None
    nll: Amount | None = None
    rate: Amount | None = None
    distortion: Amount | None = None


@dataclass(frozen=True)
class ReportConfig:
    """The verdict's declarations (stage ``report``; pipeline.report.verdict)."""

    margin: FigureMargins = field(default_factory=FigureMargins)
    seed_std: FigureSeedStds = field(default_factory=FigureSeedStds)
    confidence: float = 0.90  # the interval's level: two one-sided tests at (1 - c) / 2 each


def parse_amount(value: Amount) -> tuple[float, bool]:
    """``value`` as (number, relative): 0.3 is (0.3, False), "10%" is (0.1, True). ValueError
    for anything else or a negative number."""
    if isinstance(value, str):
        found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*%\s*", value, re.I)
        if not found:
            raise ValueError(f"{value!r} is neither a number nor a percentage like '10%'")
        number, relative = float(found.group(1)) / 100, True
    else:
        number, relative = float(value), False
    if not number >= 0:  # NaN too
        raise ValueError(f"{value!r} is negative")
    return number, relative


def _report_config(raw: dict[str, Any]) -> ReportConfig:
    """params.yaml's ``report`` section, checked: margins positive, seed stds >= 0."""
    _check_keys("report", raw, {"margin", "seed_std", "confidence"})
    margin = _build(FigureMargins, raw.get("margin") or {}, "report.margin")
    seed_std = _build(FigureSeedStds, raw.get("seed_std") or {}, "report.seed_std")
    confidence = _coerce(float, raw.get("confidence", 0.90), "report.confidence")
    for name, section in (("margin", margin), ("seed_std", seed_std)):
        for key, value in dataclasses.asdict(section).items():
            if value is None:
                continue
            try:
                number, _ = parse_amount(value)
            except ValueError as e:
                raise ConfigError(f"report.{name}.{key}: {e}") from None
            if name == "margin" and number == 0:
                raise ConfigError(f"report.margin.{key}: must be above 0 (got {value!r})")
    if not 0.5 <= confidence < 1:
        raise ConfigError(f"report.confidence must be in [0.5, 1) (got {confidence})")
    return ReportConfig(margin, seed_std, confidence)


@dataclass(frozen=True)
class Config:
    """The resolved configuration of one scale."""

    scale: str
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    variants: dict[str, Variant] = field(default_factory=dict)
    # params.yaml's ``seeds``: the training seeds of every variant, the first the main stages'
    # (train@<V>: train.seed); the others run as train_seed@<V>-<k> (docs/report-and-mlflow.md)
    seeds: tuple[int, ...] = (0,)

    @property
    def main_seed(self) -> int:
        """The seed of the main stages (train@<V>, sample@<V>, evaluate@<V>)."""
        return self.seeds[0]

    def with_seed(self, seed: int | None) -> Config:
        """This configuration training with ``seed`` (one of ``seeds``; None: the main seed)."""
        if seed is None or seed == self.train.seed:
            return self
        if seed not in self.seeds:
            listed = ", ".join(map(str, self.seeds))
            raise ConfigError(
                f"--seed {seed} is not one of params.yaml's seeds [{listed}]; add it there "
                f"(and to extra_seeds) or pick one of them"
            )
        return dataclasses.replace(self, train=dataclasses.replace(self.train, seed=seed))

    def run_key(self, variant: str) -> str:
        """The name of this seed's outputs of ``variant`` (pipeline.layout's folders): the
        variant's name for the main seed (today's paths), ``<variant>-s<seed>`` for the others."""
        return seed_key(variant, self.train.seed, self.main_seed)

    def stage_name(self, stage: str, variant: str) -> str:
        """dvc.yaml's name of ``stage`` (train, sample, evaluate) of ``variant`` at this seed."""
        seed = self.train.seed
        return f"{stage}@{variant}" if seed == self.main_seed else f"{stage}_seed@{variant}-{seed}"

    def variant(self, name: str) -> Variant:
        """The named variant, or a ConfigError listing the known ones."""
        if name not in self.variants:
            known = ", ".join(self.variants) or "(none)"
            raise ConfigError(f"unknown variant {name!r}; params.yaml defines: {known}")
        return self.variants[name]

    def stand_in_reasons(self) -> list[str]:
        """Why this scale's metrics are not comparable to published numbers (empty if they are)."""
        reasons = []
        if self.data.dataset == "synthetic":
            reasons.append("synthetic data")
        if self.eval.inception_weights == "stand-in":
            reasons.append("stand-in Inception weights")
        if self.eval.inception_weights == "classifier":
            reasons.append("a classifier trained on the synthetic set, not Inception")
        return reasons

    def section_dict(self, *names: str) -> dict[str, Any]:
        """The named sections as plain nested dicts (for hashing and logging)."""
        return {n: dataclasses.asdict(getattr(self, n)) for n in names}

    def flat(self) -> dict[str, Any]:
        """Every key as ``section.key`` (what MLflow logs as params)."""
        out: dict[str, Any] = {"scale": self.scale}
        for name in (*SECTIONS, "ray", "mlflow", "cluster"):
            for key, value in dataclasses.asdict(getattr(self, name)).items():
                out[f"{name}.{key}"] = value
        return out


SECTION_TYPES: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "diffusion": DiffusionConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
    "eval": EvalConfig,
    "ray": RayConfig,
    "mlflow": MlflowConfig,
    "cluster": ClusterConfig,
}


def default_params_path() -> Path:
    """params.yaml of the project: $DDPM_PARAMS, else ./params.yaml."""
    return Path(os.environ.get("DDPM_PARAMS", "params.yaml"))


def load_config(path: str | os.PathLike[str] | None = None, scale: str | None = None) -> Config:
    """Read params.yaml and resolve the preset named by ``scale`` (default: its ``scale`` key)."""
    path = Path(path) if path is not None else default_params_path()
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file (run from the project root)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    return config_from_dict(raw, scale)


def config_from_dict(raw: dict[str, Any], scale: str | None = None) -> Config:
    """Resolve a params dict (the content of params.yaml) into a :class:`Config`."""
    top = {"scale", "presets", "variants", "ray", "mlflow", "cluster", "seeds", "extra_seeds"}
    top.add("report")
    _check_keys("params.yaml", raw, top)
    presets = raw.get("presets") or {}
    for name in presets:
        check_name("presets", name)
    for name in raw.get("variants") or {}:
        check_name("variants", name)
    scale = scale or raw.get("scale")
    if not scale:
        raise ConfigError("params.yaml: set `scale` to one of the presets")
    check_name("scale", scale)
    if scale not in presets:
        raise ConfigError(f"scale {scale!r} is not a preset; choose one of: {', '.join(presets)}")
    preset = presets[scale] or {}
    _check_keys(f"presets.{scale}", preset, set(SECTIONS))
    sections = {
        name: _build(SECTION_TYPES[name], preset.get(name) or {}, f"presets.{scale}.{name}")
        for name in SECTIONS
    }
    for name in ("ray", "mlflow", "cluster"):
        sections[name] = _build(SECTION_TYPES[name], raw.get(name) or {}, name)
    sections["report"] = _report_config(raw.get("report") or {})
    variants = {}
    for vname, vraw in (raw.get("variants") or {}).items():
        where = f"variants.{vname}"
        _check_keys(where, vraw or {}, {"mean_type", "var_type", "loss_type"})
        missing = {"mean_type", "var_type", "loss_type"} - set(vraw or {})
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(sorted(missing))}")
        variants[vname] = Variant(name=vname, **vraw)
    data = sections["data"]
    if data.random_flip is None:
        flips = data.dataset not in FLIPS_OFF[data.flip_source]
        sections["data"] = dataclasses.replace(data, random_flip=flips)
    seeds = _seeds(raw, sections["train"], scale)
    cfg = Config(scale=scale, variants=variants, seeds=seeds, **sections)
    validate(cfg)
    return cfg


# data.flip_source -> the datasets trained without random flips
FLIPS_OFF: dict[FlipSource, tuple[Dataset, ...]] = {
    "official": ("lsun_cat",),  # run_lsun.py: randflip=1 by default, `--randflip 0` for cat
    "paper": ("lsun_bedroom",),  # App. B: "random horizontal flips ... except LSUN Bedroom"
}


def check_name(where: str, name: object) -> str:
    """``name`` if it is a plain name (:data:`NAME`: lowercase letters, digits, ``_``), else a
    ConfigError naming ``where``: preset and variant names reach paths and shell commands."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        shown = repr(name)[:80]
        raise ConfigError(
            f"{where}: {shown} is not a plain name; use lowercase letters, digits and _ only "
            "(it becomes part of paths and commands)"
        )
    return name


def seed_key(variant: str, seed: int, main_seed: int) -> str:
    """``variant`` for the main seed, ``<variant>-s<seed>`` for a further training seed."""
    return variant if seed == main_seed else f"{variant}-s{seed}"


def _seeds(raw: dict[str, Any], train: TrainConfig, scale: str) -> tuple[int, ...]:
    """params.yaml's ``seeds``, checked against ``extra_seeds`` (what dvc.yaml's matrix reads:
    DVC cannot slice a list) and the main stages' ``train.seed``; one ConfigError naming the
    ``-S`` that fixes a disagreement. Absent: the preset's train.seed alone."""
    seeds = raw.get("seeds", [train.seed])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ConfigError(
            f"params.yaml: seeds must be a non-empty list of distinct integers >= 0 (got {seeds!r})"
        )
    extra = raw.get("extra_seeds", [])
    if extra != seeds[1:]:
        want = _yaml_list(seeds[1:])
        raise ConfigError(
            f"params.yaml: extra_seeds ({extra!r}) must be seeds[1:] = {want}: dvc.yaml makes "
            f"the further seeds' stages from extra_seeds; pass -S 'extra_seeds={want}' "
            f"(with -S 'seeds={_yaml_list(seeds)}') or edit params.yaml"
        )
    if seeds[0] != train.seed:
        raise ConfigError(
            f"params.yaml: seeds[0] ({seeds[0]}) is the main stages' training seed, but "
            f"presets.{scale}.train.seed is {train.seed}; pass -S "
            f"presets.{scale}.train.seed={seeds[0]} or put {train.seed} first in seeds"
        )
    return tuple(seeds)


def _yaml_list(values: list[int]) -> str:
    return "[" + ", ".join(map(str, values)) + "]"


def _check_seed_keys(cfg: Config) -> None:
    """Further seeds: trained weights only, and no variant named like another's seed outputs."""
    if len(cfg.seeds) == 1:
        return
    if cfg.model.source == "checkpoint":
        raise ConfigError(
            f"params.yaml: seeds {_yaml_list(list(cfg.seeds))}: presets.{cfg.scale} imports "
            f"published weights (model.source: checkpoint), which have no training seed; "
            f"pass -S 'seeds=[{cfg.main_seed}]' -S 'extra_seeds=[]'"
        )
    # A further seed's outputs are <variant>-s<seed>: no variant can be named so, since a
    # variant's name is plain (check_name: no "-").


def validate(cfg: Config) -> None:
    """Cross-field checks that a single key's type cannot express."""
    where = f"presets.{cfg.scale}"
    check_name(f"{where}.model.checkpoint_variant", cfg.model.checkpoint_variant)
    if cfg.model.source == "checkpoint" and cfg.model.checkpoint_variant not in cfg.variants:
        _check_choice(
            f"{where}.model.checkpoint_variant", cfg.model.checkpoint_variant, tuple(cfg.variants)
        )
    positive = {
        "data.resolution": cfg.data.resolution,
        "model.ch": cfg.model.ch,
        "diffusion.num_timesteps": cfg.diffusion.num_timesteps,
        "train.steps": cfg.train.steps,
        "train.batch_size": cfg.train.batch_size,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "train.log_every": cfg.train.log_every,
        "sample.n_samples": cfg.sample.n_samples,
        "sample.batch_size": cfg.sample.batch_size,
        "sample.block_size": cfg.sample.block_size,
        "eval.nll_batch_size": cfg.eval.nll_batch_size,
        "eval.nll_block_size": cfg.eval.nll_block_size,
        "eval.is_splits": cfg.eval.is_splits,
        "eval.batch_size": cfg.eval.batch_size,
        "eval.inception_threads": cfg.eval.inception_threads,
        "eval.classifier_epochs": cfg.eval.classifier_epochs,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{where}.{key} must be positive (got {value})")
    check_worker_range(cfg.train, where)
    for key, workers in (("sample", cfg.sample.num_workers), ("eval", cfg.eval.num_workers)):
        if workers != AUTO and (isinstance(workers, str) or workers < 1):
            raise ConfigError(f"{where}.{key}.num_workers must be a positive number or auto "
                              f"(got {workers!r})")  # fmt: skip
    if isinstance(cfg.train.num_workers, int) and cfg.train.batch_size % cfg.train.num_workers:
        raise ConfigError(
            f"{where}.train.batch_size ({cfg.train.batch_size}) must be divisible by "
            f"train.num_workers ({cfg.train.num_workers}): the global batch is split evenly"
        )
    if not 0 < cfg.diffusion.beta_start <= cfg.diffusion.beta_end < 1:
        raise ConfigError(
            f"{where}.diffusion: need 0 < beta_start <= beta_end < 1 "
            f"(got {cfg.diffusion.beta_start}, {cfg.diffusion.beta_end})"
        )
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"{where}.train.ema_decay must be in [0, 1) (got {cfg.train.ema_decay})")
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"{where}.model.dropout must be in [0, 1) (got {cfg.model.dropout})")
    steps = cfg.sample.steps
    if steps is not None and not 0 < steps <= cfg.diffusion.num_timesteps:
        raise ConfigError(
            f"{where}.sample.steps must be null or in [1, {cfg.diffusion.num_timesteps}] "
            f"(got {steps})"
        )
    if cfg.eval.ref_images is not None and cfg.eval.ref_images < 2:
        raise ConfigError(f"{where}.eval.ref_images must be null or at least 2")
    parallel = cfg.cluster.max_parallel_stages
    if parallel is not None and parallel < 1:
        raise ConfigError(f"cluster.max_parallel_stages must be at least 1 (got {parallel})")
    _validate_official_semantics(cfg, where)
    check_across_sections(cfg)
    _check_seed_keys(cfg)


def _validate_official_semantics(cfg: Config, where: str) -> None:
    """Replica clipping, the process backend's limits and checkpoint selection."""
    t = cfg.train
    if t.backend == "process" and (t.max_workers != 1 or t.use_gpu or t.eval_every):
        raise ConfigError(
            f"{where}.train.backend: process trains one CPU worker in the stage's process, so "
            f"it needs num_workers 1, use_gpu false and eval_every 0 (got {_yaml(t.num_workers)}, "
            f"{str(t.use_gpu).lower()}, {t.eval_every}); use backend: ray"
        )
    if t.clip_replicas < 1:
        raise ConfigError(f"{where}.train.clip_replicas must be at least 1 (got {t.clip_replicas})")
    fixed = t.num_workers if isinstance(t.num_workers, int) else 1  # a range: below
    if t.clip_replicas > 1 and (t.batch_size % t.clip_replicas or t.clip_replicas % fixed):
        raise ConfigError(
            f"{where}.train.clip_replicas ({t.clip_replicas}) must divide train.batch_size "
            f"({t.batch_size}) and be a multiple of train.num_workers ({_yaml(t.num_workers)}): "
            "each worker clips whole replicas of batch_size / clip_replicas images"
        )
    # the bounds of pipeline.training.replicas.fixed_point_exponent (k in 40..126)
    if t.clip_replicas > 1 and not 2.0**-65 <= t.clip_replicas * t.grad_clip < 2.0**22:
        raise ConfigError(
            f"{where}.train.clip_replicas ({t.clip_replicas}) clips each replica's gradient: "
            f"it needs 2^-65 <= clip_replicas x train.grad_clip < 2^22 (got grad_clip "
            f"{t.grad_clip}), the clip sets the exact sum's fixed-point scale "
            "(docs/training.md); without a clip use clip_replicas: 1"
        )
    check_elastic_sizes(t, where)
    for name in t.variants or ():
        _check_choice(f"{where}.train.variants", name, tuple(cfg.variants))
    if t.eval_every < 0 or t.eval_samples < 0:
        raise ConfigError(f"{where}.train.eval_every and eval_samples must be 0 or more")
    if (t.eval_every > 0) != (t.eval_samples > 0):
        raise ConfigError(
            f"{where}.train.eval_every ({t.eval_every}) and eval_samples ({t.eval_samples}) "
            "must both be positive (evaluation during training) or both 0 (off)"
        )
    if t.select == "best_fid" and t.eval_every == 0:
        raise ConfigError(
            f"{where}.train.select: best_fid needs evaluation during training "
            "(set train.eval_every and train.eval_samples)"
        )


def check_worker_range(t: TrainConfig, where: str) -> None:
    """``train.num_workers`` is a positive number or ``[min, max]`` with 1 <= min <= max (a
    Ray preset); ``elastic_resize_s`` is 0 or more. One ConfigError line otherwise."""
    n = t.num_workers
    if isinstance(n, int):
        if n < 1:
            raise ConfigError(f"{where}.train.num_workers must be positive (got {n})")
    elif len(n) != 2 or not 1 <= n[0] <= n[1]:
        raise ConfigError(
            f"{where}.train.num_workers must be a positive number or a range [min, max] with "
            f"1 <= min <= max (got {_yaml(n)})"
        )
    if t.elastic_resize_s < 0:
        raise ConfigError(
            f"{where}.train.elastic_resize_s must be 0 or more (got {t.elastic_resize_s})"
        )


def _yaml(value: int | tuple[int, ...]) -> str:
    """A worker count as params.yaml writes it: 8, or [1, 2]."""
    return str(value) if isinstance(value, int) else _yaml_list(list(value))


def allowed_world_sizes(t: TrainConfig, upto: int) -> list[int]:
    """The world sizes W in 1..``upto`` that split the global batch, and the virtual replicas
    (``clip_replicas`` > 1), evenly over W workers."""
    R = t.clip_replicas
    return [w for w in range(1, upto + 1) if not t.batch_size % w and (R <= 1 or not R % w)]


def check_elastic_sizes(t: TrainConfig, where: str) -> None:
    """A range of workers: Ray Train may run any W in it, so every W must be allowed
    (:func:`allowed_world_sizes`); one ConfigError line naming the W that are not."""
    if isinstance(t.num_workers, int):
        return
    allowed = allowed_world_sizes(t, t.max_workers)
    bad = [w for w in t.worker_counts() if w not in allowed]
    if not bad:
        return
    runs: list[list[int]] = []  # allowed W in consecutive runs: the ranges that would pass
    for w in allowed:
        if runs and runs[-1][-1] == w - 1:
            runs[-1].append(w)
        else:
            runs.append([w])
    passing = ", ".join(_yaml((r[0], r[-1]) if len(r) > 1 else r[0]) for r in runs)
    what = f"train.batch_size ({t.batch_size})"
    if t.clip_replicas > 1:
        what += f" and train.clip_replicas ({t.clip_replicas})"
    raise ConfigError(
        f"{where}.train.num_workers {_yaml(t.num_workers)}: Ray Train may run any number of "
        f"workers W in the range, but W = {', '.join(map(str, bad))} "
        f"{'does' if len(bad) == 1 else 'do'} not split {what} evenly; allowed W up to "
        f"{t.max_workers}: {', '.join(map(str, allowed))} (ranges that pass: {passing})"
    )


# Image counts of the splits that are known before `prepare` runs (LSUN's depend on the LMDB).
CIFAR10_SPLITS = {"train": 50_000, "test": 10_000}


def split_sizes(data: DataConfig) -> dict[str, int | None]:
    """Images in each split as params determine them; None where only the data can tell."""
    if data.dataset == "cifar10":
        return dict(CIFAR10_SPLITS)
    if data.dataset == "synthetic":
        return {"train": data.n_train, "test": data.n_test}
    return {"train": None, "test": None if data.test_fraction > 0 else 0}  # LSUN


def check_across_sections(cfg: Config) -> None:
    """Rules between sections, checked when params are loaded, before any stage does work.

    Each would otherwise stop a later stage after the earlier ones ran (e.g. the evaluate stage
    after six trainings); the error names the keys and the fix.
    """
    where = f"presets.{cfg.scale}"
    s, e, T = cfg.sample, cfg.eval, cfg.diffusion.num_timesteps
    need = max(2, e.is_splits)
    if s.n_samples < need:
        raise ConfigError(
            f"{where}.sample.n_samples ({s.n_samples}) must be at least {need}: FID needs 2 "
            f"samples and IS one per split (eval.is_splits: {e.is_splits}); raise "
            f"sample.n_samples or lower eval.is_splits"
        )
    sizes = split_sizes(cfg.data)
    wanted = {
        "eval.nll_images": ("test", e.nll_images),
        "eval.nll_train_images": ("train", e.nll_train_images),
    }
    for key, (split, count) in wanted.items():
        size = sizes[split]
        if count > 0 and size is not None and count > size:
            fix = (
                "set data.test_fraction > 0 (LSUN has no test split)"
                if cfg.data.dataset.startswith("lsun_")
                else f"lower it to at most {size}"
            )
            raise ConfigError(
                f"{where}.{key} ({count}) exceeds the {split} split of {cfg.data.dataset} "
                f"({size} images); {fix}, or set it to 0 to skip"
            )
    for split in e.fid_against:
        size = sizes[split]
        if size is not None and size < 2:
            raise ConfigError(
                f"{where}.eval.fid_against lists {split!r} but that split has {size} images "
                f"(FID needs at least 2); remove it or give the split images"
            )
        if e.ref_images is not None and size is not None and e.ref_images > size:
            raise ConfigError(
                f"{where}.eval.ref_images ({e.ref_images}) exceeds the {split} split of "
                f"{cfg.data.dataset} ({size} images); lower it to at most {size} or set null"
            )
    steps_1based = {"recon_ts": e.recon_ts, "rd_steps": e.rd_steps, "interp_t": (e.interp_t,)}
    for key, steps in steps_1based.items():
        bad = [t for t in steps if not 1 <= t <= T]
        if bad:
            raise ConfigError(
                f"{where}.eval.{key}: {bad} outside [1, {T}] (1-based steps of "
                f"diffusion.num_timesteps = {T}); choose steps in that range"
            )


def config_hash(payload: Any, length: int = 12) -> str:
    """A short stable hash of JSON-able ``payload`` (run identities, cache keys)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# ---------------------------------------------------------------------------------------------
# Typed construction of one section from a dict.


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    _check_keys(where, raw, fields)
    values = {key: _coerce(hints[key], value, f"{where}.{key}") for key, value in raw.items()}
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for hint_i in inner[:-1]:  # the first type that takes the value (int | str: 8, auto)
            try:
                return _coerce(hint_i, value, where)
            except ConfigError:
                pass
        return _coerce(inner[-1], value, where)
    if value is None:
        raise ConfigError(f"{where}: must not be null")
    if origin is Literal:  # a choice (pipeline.choices): one of the type's values
        _check_choice(where, value, choices(hint))
        return value
    if origin is tuple:
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, where) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not number.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(number)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:  # PyYAML reads 1e-4 (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {hint!r} at {where}")  # a bug, not a user error


def _check_keys(where: str, raw: dict[str, Any], allowed: set[str]) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )


def _check_choice(where: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(allowed)}")
