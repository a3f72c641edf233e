"""Evaluation during training: FID of the EMA weights every ``train.eval_every`` steps, on Ray.

The driver of a training run (pipeline.training.trainer) watches the run's checkpoints while
Ray Train trains. Each new checkpoint at a multiple of ``eval_every`` is copied to the driver
(Ray Train may delete it later: ``keep_checkpoints``) and scored by a Ray task beside the
training workers, which keep training: ``train.eval_samples`` samples of its EMA weights
(the sample stage's sampler: Algorithm 2, or respaced to ``sample.steps``; the sample
section's batch and variance; noise from a separate seed stream of the sample seed,
pipeline.sampling.noise.stream_seed, so no selection sample is a final sample), FID against
the training reference statistics (reference/<scale>/train-stats.pt, the reference stage's).
Each result is stored (pipeline.training.selection: resume-safe, never redone) and logged to
the variant's MLflow run as ``fid_during_training`` at the checkpoint's step (with
``fid_during_training_samples``).

The scoring task may run on any node of a cluster: it is handed no path. The driver reads the
checkpoint's EMA weights, the reference statistics file and the Inception (or feature-network)
weights file, and they travel through Ray's object store (the statistics and the weights file
put once per run, the EMA weights once per checkpoint); the task writes them into a temporary
folder of its own node and returns the FID. Where the checkpoints are found: the run folder
(a local or shared folder, ``checkpoint_<step>/``; the newest one once its files have not
changed for :data:`SETTLE_S` seconds), or, with a bucket as cluster storage, the bucket's
listing of the run (``Store.list``; a bucket object appears whole, so a checkpoint whose
state.pt and meta.json are both listed is complete). With a bucket the records (evals/) are
also uploaded to the run in the bucket and downloaded by a resubmitted driver.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.cluster import devices
from pipeline.cluster.lease import fence
from pipeline.cluster.storage_fs import Store
from pipeline.config import Config, Variant
from pipeline.evaluation.inception import InceptionWeights
from pipeline.training.selection import BEST, EVALS, EvalRecords, due_steps

if TYPE_CHECKING:  # ray is imported where used (a scorer run in this process needs none)
    from ray import ObjectRef

log = logging.getLogger(__name__)

METRIC = "fid_during_training"
TAG_EVAL_SAMPLER = "ddpm.eval_sampler"  # MLflow tag: eval_sampler(cfg) of the run's evaluations
# (cfg, variant, step, EMA state_dict, train-stats.pt bytes, weights, weights file bytes) -> FID
Scorer = Callable[
    [Config, Variant, int, dict[str, Any], bytes, InceptionWeights, bytes | None], float
]


def score_checkpoint(
    cfg: Config,
    variant: Variant,
    step: int,
    ema: dict[str, Any],
    reference: bytes,
    weights: InceptionWeights,
    weights_file: bytes | None,
) -> float:
    """FID of ``train.eval_samples`` samples of the EMA weights ``ema`` (the checkpoint of
    ``step``) against ``reference`` (the bytes of a train-stats.pt). Runs where it is called
    (a Ray task on any node in training): the statistics and ``weights_file`` (the bytes of
    ``weights.path``) are written into a temporary folder here; nothing is read from a path
    the driver named."""
    import torch

    from pipeline.evaluation.fidelity import EXTRACTOR, compute_fid_is, inception_options
    from pipeline.evaluation.inception_task import localise_weights
    from pipeline.model.diffusion import GaussianDiffusion
    from pipeline.model.unet import build_unet
    from pipeline.sampling.draw import sample_images
    from pipeline.sampling.job import sampler_var_type
    from pipeline.sampling.noise import SELECTION_STREAM, stream_seed
    from pipeline.training.loop import make_diffusion

    if weights.extractor != EXTRACTOR:  # the feature network's: registered on import, here too
        import pipeline.evaluation.featurenet  # noqa: F401

    s, n = cfg.sample, cfg.train.eval_samples
    options = inception_options(cfg.eval)
    device, options["device"] = devices.scorer_devices(s.use_gpu, options["device"])
    if device.type == "cpu":
        torch.set_num_threads(s.torch_threads)
    diffusion = make_diffusion(cfg, variant)
    net = build_unet(cfg.model, cfg.data.resolution, diffusion.model_output_channels(3))
    net.load_state_dict(ema)
    net.to(device).eval()
    sampler = GaussianDiffusion(
        diffusion.betas, variant.mean_type, sampler_var_type(cfg, variant), variant.loss_type
    )
    steps = cfg.sample.steps  # the sample stage's sampler: respaced when sample.steps says so
    if steps is not None and steps != sampler.num_timesteps:
        from pipeline.model.respace import RespacedDiffusion, space_timesteps

        sampler = RespacedDiffusion(sampler, space_timesteps(sampler.num_timesteps, steps))
    precision = cfg.model.precision
    seed = stream_seed(s.seed, SELECTION_STREAM)  # never the final samples' noise
    images = sample_images(net, sampler, range(n), seed, s.batch_size, s.bf16, False, precision)
    with tempfile.TemporaryDirectory(prefix="ddpm-eval-during-") as tmp:
        stats = Path(tmp) / "train-stats.pt"
        stats.write_bytes(reference)
        weights = localise_weights(weights, weights_file, Path(tmp))
        fid = compute_fid_is(
            images,
            {"train": stats},
            weights,
            cache_root=Path(tmp) / "cache",
            is_splits=1,
            **options,
        )
    return float(fid["fid_train"])


def eval_sampler(cfg: Config) -> str:
    """The sampler of evaluation during training, as the sample stage labels its own (the
    same: Algorithm 2, or respaced to ``sample.steps``)."""
    from pipeline.model.respace import sampler_label

    return sampler_label(cfg.diffusion.num_timesteps, cfg.sample.steps)


def driver_weights(cfg: Config, root: Path) -> InceptionWeights:
    """The Inception (or feature-network) weights the evaluate stage would use, resolved on the
    driver: the stand-in under ``root/work/fidelity``, the featurenet stage's classifier file."""
    from pipeline.evaluation.feature_weights import project_inception_weights

    return project_inception_weights(cfg, root)


def scorer_resources(cfg: Config) -> dict[str, float]:
    """One scoring task's Ray resources: the sample section's (CPUs, and GPUs with use_gpu)."""
    resources: dict[str, float] = {"num_cpus": cfg.sample.cpus_per_worker}
    if cfg.sample.use_gpu:
        resources["num_gpus"] = cfg.sample.gpus_per_worker
    return resources


SETTLE_S = 2.0  # a checkpoint whose files are this old is complete
UNLOADABLE_WAIT_S = 30.0  # at the end: how long a checkpoint not loadable yet is tried again
POLL_S = 0.5  # ... and how often (while training: at every progress update)


def _settled(folder: Path) -> bool:
    """Whether the checkpoint's state.pt and meta.json exist and none of its files changed
    in the last SETTLE_S seconds."""
    from pipeline.training.checkpoint import META, STATE

    try:
        if not (folder / STATE).is_file() or not (folder / META).is_file():
            return False
        newest = max(p.stat().st_mtime for p in folder.rglob("*") if p.is_file())
    except (FileNotFoundError, ValueError):
        return False
    return time.time() - newest > SETTLE_S


class CheckpointEvaluator:
    """A progress sink (pipeline.cluster.progress) that scores due checkpoints on Ray.

    ``poll()`` submits the due checkpoints and collects finished scores without waiting;
    ``finish()`` waits for the ones in flight and scores any left (the final checkpoint).
    ``scorer`` runs as a Ray task (default :func:`score_checkpoint`); ``run_task=False`` calls
    it in this process instead (tests). ``run_dir`` is the driver's run folder (the records);
    ``bucket`` = (store, the run's path in it) when Ray Train writes the checkpoints to a bucket
    (``run_dir`` is then the driver's local mirror of the run). ``weights``: the Inception
    weights (default: :func:`driver_weights`, resolved at the first submission).
    """

    def __init__(
        self,
        cfg: Config,
        variant: Variant,
        run_dir: Path,
        reference: Path,
        root: Path,
        mlflow: tuple[str, str] | None = None,
        scorer: Scorer = score_checkpoint,
        run_task: bool = True,
        bucket: tuple[Store, Path] | None = None,
        weights: InceptionWeights | None = None,
    ):
        self.cfg, self.variant, self.run_dir = cfg, variant, Path(run_dir)
        self.reference, self.root = Path(reference), Path(root)
        self.records = EvalRecords(run_dir)
        self.mlflow, self.scorer, self.run_task = mlflow, scorer, run_task
        self.bucket, self.weights = bucket, weights
        self._listed = -float("inf")  # when the bucket was last listed (time.monotonic)
        self.in_flight: dict[int, tuple[Any, Path, float]] = {}  # step -> (ref, copy, started)
        self.evaluated_now: list[int] = []
        self.failed: set[int] = set()  # scoring failed: retried by finish() (and a restart)
        self.unreadable: set[int] = set()  # checkpoints not loadable yet: retried every poll
        self._shared: tuple[Any, InceptionWeights, Any] | None = None  # reference, weights, file
        if bucket is not None:  # the records of an earlier job of this run
            store, rel = bucket
            store.get_dir(rel / EVALS, self.records.folder)

    def show(self, update: dict[str, Any]) -> None:
        """Called by the BoardReader on every progress update. An error (a storage outage, a
        full disk) is one warning line; the next update retries."""
        try:
            self.poll()
        except Exception as e:  # evaluation must never stop progress or training
            log.warning("evaluation during training: %s: %s; retrying", type(e).__name__, e)

    def poll(self, newest_too: bool = False) -> None:
        """Collect finished scores; submit due checkpoints. The newest one, which Ray Train
        may still be writing, only once its files have not changed for SETTLE_S seconds (or
        with ``newest_too``; in a bucket: once state.pt and meta.json are both there)."""
        self._collect(wait=False)
        done = self.records.done() | set(self.in_flight) | self.failed
        if self.bucket is not None:
            if not newest_too and time.monotonic() - self._listed < SETTLE_S:
                return  # a bucket listing is a request: at most one per SETTLE_S seconds
            self._listed = time.monotonic()
            for step, rel in self._bucket_due(done):
                self._submit(step, rel)
            return
        due = due_steps(self.run_dir, self.cfg.train.eval_every, done)
        newest = max((s for s, _ in due_steps(self.run_dir, 1, set())), default=None)
        for step, folder in due:
            if newest_too or step != newest or _settled(folder):
                self._submit(step, folder)

    def finish(self) -> list[dict[str, Any]]:
        """Score every due checkpoint (waiting for them, and retrying any that failed while
        training ran); returns all the run's records. A checkpoint not loadable yet (seen
        half-written, maybe first at this last poll) is tried again every POLL_S for up to
        UNLOADABLE_WAIT_S: training has ended, so its writer has too (an NFS client sees the
        whole file once its attribute cache expires)."""
        self.failed.clear()
        self.poll(newest_too=True)
        deadline = time.monotonic() + UNLOADABLE_WAIT_S
        while self.unreadable - self.records.done() and time.monotonic() < deadline:
            time.sleep(POLL_S)  # first seen half-written just now: the writer has ended
            self.poll(newest_too=True)
        if self.in_flight:
            steps = ", ".join(map(str, sorted(self.in_flight)))
            self.say(f"waiting for {len(self.in_flight)} evaluation(s) of step(s) {steps}")
        self._collect(wait=True)
        left = sorted(self.unreadable - self.records.done())
        if left:
            log.warning("checkpoints of steps %s never loaded: not evaluated", left)
        return self.records.all()

    def say(self, message: str) -> None:
        """One progress line, ``train <variant>: <message>`` (stderr, as the training bar)."""
        print(f"train {self.variant.name}: {message}", file=sys.stderr, flush=True)

    def _bucket_due(self, done: set[int]) -> list[tuple[int, Path]]:
        """(step, path in the store) of the complete checkpoints in the bucket not yet done."""
        from pipeline.training.checkpoint import META, STATE

        assert self.bucket is not None  # called by poll() for a bucket run only
        store, rel = self.bucket
        files: dict[str, set[str]] = {}
        for name in store.list(rel):
            folder, _, file = name.partition("/")
            if folder.startswith("checkpoint_") and "/" not in file:
                files.setdefault(folder, set()).add(file)
        due = []
        for folder, names in sorted(files.items()):
            try:
                step = int(folder.removeprefix("checkpoint_"))
            except ValueError:
                continue
            every = self.cfg.train.eval_every
            if {STATE, META} <= names and step > 0 and step % every == 0 and step not in done:
                due.append((step, rel / folder))
        return due

    def _inputs(self) -> tuple[Any, InceptionWeights, Any]:
        """The reference statistics' bytes, the weights and their file's bytes: read once on
        the driver, and put in Ray's object store once when the scorer runs as a task."""
        if self._shared is None:
            weights = self.weights or driver_weights(self.cfg, self.root)
            reference = self.reference.read_bytes()
            data = Path(weights.path).read_bytes() if weights.path is not None else None
            if self.run_task:
                import ray

                self._shared = (ray.put(reference), weights, ray.put(data))
            else:
                self._shared = (reference, weights, data)
        return self._shared

    def _submit(self, step: int, source: Path) -> None:
        """Copy the checkpoint ``source`` (a folder, or its path in the bucket) to the driver
        and start scoring its EMA weights."""
        from pipeline.training.checkpoint import META, STATE, read_checkpoint

        copy = self.records.folder / f".pending-{step:09d}"
        if copy.exists():
            shutil.rmtree(copy)
        self.records.folder.mkdir(parents=True, exist_ok=True)
        try:
            if self.bucket is None:
                shutil.copytree(source, copy)
            else:
                self.bucket[0].get_dir(source, copy)
            if not (copy / STATE).is_file() or not (copy / META).is_file():
                raise FileNotFoundError(copy)
            ema = read_checkpoint(copy)["ema"]
        except FileNotFoundError:  # Ray Train removed it meanwhile (keep_checkpoints)
            shutil.rmtree(copy, ignore_errors=True)
            log.warning("checkpoint of step %d disappeared before its evaluation", step)
            return
        except Exception as e:  # not loadable (yet): half-written on NFS, a transient error
            shutil.rmtree(copy, ignore_errors=True)
            if step not in self.unreadable:
                log.warning(
                    "checkpoint of step %d not loadable yet (%s: %s); retrying",
                    step, type(e).__name__, str(e)[:200],
                )  # fmt: skip
            self.unreadable.add(step)
            return
        self.unreadable.discard(step)
        reference, weights, data = self._inputs()
        args = (self.cfg, self.variant, step, ema, reference, weights, data)
        ref: ObjectRef[float] | float  # the task's, or the score itself (run_task=False)
        if self.run_task:
            from pipeline.cluster.gputasks import submit

            # one task per GPU: a fresh worker, never a reused one holding another GPU's context
            ref = submit(self.scorer, *args, resources=scorer_resources(self.cfg), max_retries=2)
        else:
            try:
                ref = self.scorer(*args)
            except Exception as e:  # as a failed task: retried by finish()
                log.warning("evaluation of step %d failed: %s", step, e)
                self.failed.add(step)
                shutil.rmtree(copy, ignore_errors=True)
                return
        self.in_flight[step] = (ref, copy, time.perf_counter())
        self.say(
            f"evaluating the checkpoint of step {step}: FID of {self.cfg.train.eval_samples} "
            f"samples ({eval_sampler(self.cfg)}) against the training set"
        )

    def _collect(self, wait: bool) -> None:
        for step in sorted(self.in_flight):
            ref, copy, started = self.in_flight[step]
            if self.run_task:
                import ray

                ready, _ = ray.wait([ref], timeout=None if wait else 0)
                if not ready:
                    continue
                try:
                    fid = float(ray.get(ref))
                except Exception as e:  # an evaluation must never stop training
                    log.warning("evaluation of step %d failed: %s", step, e)
                    self.say(f"evaluation of step {step} failed (retried after training): {e}")
                    self.failed.add(step)
                    shutil.rmtree(copy, ignore_errors=True)
                    del self.in_flight[step]
                    continue
            else:
                fid = float(ref)
            record = {
                "step": step,
                "fid": fid,
                "n_samples": self.cfg.train.eval_samples,
                "seconds": round(time.perf_counter() - started, 3),
            }
            self.records.add(record, copy)
            self._upload(record, self.records.best() == record)
            shutil.rmtree(copy, ignore_errors=True)
            del self.in_flight[step]
            self.evaluated_now.append(step)
            self.say(f"checkpoint of step {step}: FID {fid:.3f} ({record['seconds']:.0f} s)")
            self._log(record)

    def _upload(self, record: dict[str, Any], new_best: bool) -> None:
        """A bucket run: the new record (and best/, first, when it changed) into the bucket, so
        that a resubmitted driver (a new, empty mirror) redoes nothing."""
        if self.bucket is None:
            return
        store, rel = self.bucket
        try:
            fence(store, self.cfg.scale)  # a job that lost its lease uploads nothing more
            if new_best:
                store.put_dir(self.records.folder / BEST, rel / EVALS / BEST)
            path = self.records.path(record["step"])
            store.put_file(path, rel / EVALS / path.name)
        except Exception as e:  # a storage outage must not stop training; kept locally
            log.warning("upload of the evaluation of step %d failed: %s", record["step"], e)

    def _log(self, record: dict[str, Any]) -> None:
        if self.mlflow is None:
            return
        try:
            from mlflow import MlflowClient

            client = MlflowClient(self.mlflow[0])
            client.log_metric(self.mlflow[1], METRIC, record["fid"], step=record["step"])
            client.log_metric(
                self.mlflow[1], f"{METRIC}_samples", record["n_samples"], step=record["step"]
            )
        except Exception as e:  # a tracking outage must not stop training
            log.warning("MLflow logging of %s failed: %s", METRIC, e)
