"""Evaluation during training: FID of the EMA weights every ``train.eval_every`` steps, on Ray.

The driver of a training run (pipeline.training.trainer) polls the run's checkpoint folder while
Ray Train trains. Each new checkpoint at a multiple of ``eval_every`` is copied (Ray Train may
delete it later: ``keep_checkpoints``) and scored by a Ray task beside the training workers,
which keep training: ``train.eval_samples`` samples of its EMA weights (Algorithm 2, the
sample section's seed, batch and variance), FID against the training reference statistics
(reference/<scale>/train-stats.pt, the reference stage's). Each result is stored
(pipeline.training.selection: resume-safe, never redone) and logged to the variant's MLflow run
as ``fid_during_training`` at the checkpoint's step (with ``fid_during_training_samples``).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import Config, Variant
from pipeline.training.selection import EvalRecords, due_steps

log = logging.getLogger(__name__)

METRIC = "fid_during_training"
# (cfg, variant, checkpoint folder, reference stats file, root) -> FID
Scorer = Callable[[Config, Variant, Path, Path, Path], float]


def score_checkpoint(
    cfg: Config, variant: Variant, checkpoint: Path, reference: Path, root: Path
) -> float:
    """FID of ``train.eval_samples`` samples of the checkpoint's EMA weights against
    ``reference`` (a train-stats.pt). Runs where it is called (a Ray task in training)."""
    import torch

    from pipeline.diffusion import GaussianDiffusion
    from pipeline.fidelity import compute_fid_is, inception_options
    from pipeline.inception import resolve_inception_weights
    from pipeline.layout import WORK
    from pipeline.sampling import sample_images
    from pipeline.samplingjob import sampler_var_type
    from pipeline.training.checkpoint import read_checkpoint
    from pipeline.training.loop import make_diffusion
    from pipeline.unet import build_unet

    s, n = cfg.sample, cfg.train.eval_samples
    use_gpu = s.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda" if use_gpu else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(s.torch_threads)
    diffusion = make_diffusion(cfg, variant)
    payload = read_checkpoint(checkpoint)
    net = build_unet(cfg.model, cfg.data.resolution, diffusion.model_output_channels(3))
    net.load_state_dict(payload["ema"])
    net.to(device).eval()
    sampler = GaussianDiffusion(
        diffusion.betas, variant.mean_type, sampler_var_type(cfg, variant), variant.loss_type
    )
    images = sample_images(net, sampler, range(n), s.seed, s.batch_size, s.bf16)
    weights = resolve_inception_weights(cfg.eval, root / WORK / "fidelity")  # as evaluate's
    with tempfile.TemporaryDirectory(prefix="ddpm-eval-during-") as cache:
        fid = compute_fid_is(
            images,
            {"train": reference},
            weights,
            cache_root=Path(cache),
            is_splits=1,
            **inception_options(cfg.eval),
        )
    return float(fid["fid_train"])


SETTLE_S = 2.0  # a checkpoint whose files are this old is complete


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
    """A progress sink (pipeline.training.progress) that scores due checkpoints on Ray.

    ``poll()`` submits the due checkpoints and collects finished scores without waiting;
    ``finish()`` waits for the ones in flight and scores any left (the final checkpoint).
    ``scorer`` runs as a Ray task (default :func:`score_checkpoint`); ``run_task=False`` calls
    it in this process instead (tests).
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
    ):
        self.cfg, self.variant, self.run_dir = cfg, variant, Path(run_dir)
        self.reference, self.root = Path(reference), Path(root)
        self.records = EvalRecords(run_dir)
        self.mlflow, self.scorer, self.run_task = mlflow, scorer, run_task
        self.in_flight: dict[int, tuple[Any, Path, float]] = {}  # step -> (ref, copy, started)
        self.evaluated_now: list[int] = []
        self.failed: set[int] = set()  # not retried by this driver (a restart retries them)

    def show(self, update: dict[str, Any]) -> None:
        """Called by the BoardReader on every progress update."""
        self.poll()

    def poll(self, newest_too: bool = False) -> None:
        """Collect finished scores; submit due checkpoints. The newest one, which Ray Train
        may still be writing, only once its files have not changed for SETTLE_S seconds (or
        with ``newest_too``)."""
        self._collect(wait=False)
        done = self.records.done() | set(self.in_flight) | self.failed
        due = due_steps(self.run_dir, self.cfg.train.eval_every, done)
        newest = max((s for s, _ in due_steps(self.run_dir, 1, set())), default=None)
        for step, folder in due:
            if newest_too or step != newest or _settled(folder):
                self._submit(step, folder)

    def finish(self) -> list[dict[str, Any]]:
        """Score every due checkpoint (waiting for them, and retrying any that failed while
        training ran); returns all the run's records."""
        self.failed.clear()
        self.poll(newest_too=True)
        self._collect(wait=True)
        return self.records.all()

    def _submit(self, step: int, folder: Path) -> None:
        copy = self.records.folder / f".pending-{step:09d}"
        if copy.exists():
            shutil.rmtree(copy)
        self.records.folder.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copytree(folder, copy)
        except FileNotFoundError:  # Ray Train removed it meanwhile (keep_checkpoints)
            shutil.rmtree(copy, ignore_errors=True)
            log.warning("checkpoint of step %d disappeared before its evaluation", step)
            return
        args = (self.cfg, self.variant, copy, self.reference, self.root)
        if self.run_task:
            import ray

            resources = {"num_cpus": self.cfg.sample.cpus_per_worker}
            if self.cfg.sample.use_gpu:
                resources["num_gpus"] = self.cfg.sample.gpus_per_worker
            ref = ray.remote(self.scorer).options(max_retries=2, **resources).remote(*args)
        else:
            ref = self.scorer(*args)
        self.in_flight[step] = (ref, copy, time.perf_counter())

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
            shutil.rmtree(copy, ignore_errors=True)
            del self.in_flight[step]
            self.evaluated_now.append(step)
            self._log(record)

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
