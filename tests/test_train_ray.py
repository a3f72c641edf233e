"""Ray Train runs of the tiny scale: a retried worker failure, DDP equivalence, divergence.

One local Ray instance serves the module; every run trains 12 steps of global batch 8 with
checkpoints every 4 steps (train_project.TRAIN), in its own project folder, with dropout 0.1.
The reference is an uninterrupted 2-worker run; with the per-step randomness of
pipeline.training.randomness (dropout masks included), a run whose worker process is SIGKILLed
once must match it bit for bit, and (dropout 0) one worker with the whole batch must match two
to float rounding. Each run costs 15-50 s here (Ray Train's start-up dominates): the default
suite keeps the reference and the killed run (two workers, gloo); the rest is marked slow.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow
import pytest
import ray
import torch
from train_project import VARIANT, make_project, tiny_config

from pipeline.cluster.raycluster import init_ray
from pipeline.cluster.runrecord import model_run_id
from pipeline.config import RayConfig
from pipeline.model.weights import load_weights
from pipeline.training import faults
from pipeline.training.loop import TrainingDivergedError, make_state
from pipeline.training.selection import EvalRecords
from pipeline.training.trainer import HEALTH_CHECK_ENV, HEALTH_CHECK_S, train_variant


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray instance (2 CPUs) for the module's runs."""
    mp = pytest.MonkeyPatch()
    mp.setenv(HEALTH_CHECK_ENV, HEALTH_CHECK_S)
    init_ray(RayConfig(num_cpus=2))
    yield
    ray.shutdown()
    mp.undo()


def train(root, monkeypatch, fault: str | None = None, dropout: float = 0.1, **train_keys):
    """train_variant in a fresh project folder ``root`` with its own MLflow store.

    ``dropout`` replaces the tiny preset's 0 (the paper's CIFAR10 value by default): a resumed
    run repeats the dropout masks only through pipeline.training.randomness.seed_dropout.
    """
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    if fault:
        monkeypatch.setenv(faults.ENV, fault)
    cfg = make_project(root, **train_keys)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=dropout))
    return train_variant(cfg, cfg.variant(VARIANT), root)


def mlflow_run(summary):
    client = mlflow.MlflowClient(f"sqlite:///{summary.model_dir.parents[1] / 'mlflow.db'}")
    return client.get_run(summary.mlflow_run_id)


def weights(summary, name: str = "model.pt") -> dict[str, torch.Tensor]:
    model, _ = load_weights(summary.model_dir / name)
    return model.state_dict()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2-worker run (dropout 0.1)."""
    mp = pytest.MonkeyPatch()
    summary = train(tmp_path_factory.mktemp("reference"), mp)
    mp.undo()
    return summary


def test_two_workers_train_logs_and_export(reference, monkeypatch):
    assert (reference.start, reference.restarts, reference.steps) == (0, [], 12)
    info = reference.model_json
    assert info["steps"] == 12 and info["run_name"] == reference.run_name
    run = mlflow_run(reference)
    client = mlflow.MlflowClient(f"sqlite:///{reference.model_dir.parents[1] / 'mlflow.db'}")
    assert run.data.tags["ddpm.variant"] == VARIANT
    assert run.data.tags["ddpm.ray_run"] == reference.run_name
    assert run.data.tags["ddpm.train_status"] == "finished"
    # model.json names no MLflow run; the later stages find it (the run folder's record)
    assert not any("mlflow" in k or "seconds" in k for k in info)
    root = reference.model_dir.parents[1]
    assert model_run_id(tiny_config(), VARIANT, info, root) == run.info.run_id
    assert (run.data.tags["ddpm.world_size"], run.data.tags["ddpm.restarts"]) == ("2", "none")
    assert run.data.params["train.batch_size"] == "8"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [4, 8, 12]
    for key in ("lr", "grad_norm", "steps_per_s", "images_per_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [4, 8, 12]
    folder = reference.model_dir.parents[1] / "checkpoints" / VARIANT / reference.run_name
    assert sorted(p.name for p in folder.glob("checkpoint_0*")) == [
        "checkpoint_000000008",
        "checkpoint_000000012",
    ]  # keep_checkpoints: 2


def test_a_sigkilled_worker_is_restarted_from_the_checkpoint_and_changes_nothing(
    reference, tmp_path, monkeypatch
):
    killed = train(tmp_path, monkeypatch, fault="kill:1:6")  # rank 1's process, before step 6
    assert (tmp_path / "checkpoints" / VARIANT / killed.run_name / ".test-fault-kill-1-6").exists()
    assert killed.restarts == [4]  # the group restarted from the checkpoint at step 4
    run = mlflow_run(killed)
    assert (run.data.tags["ddpm.world_size"], run.data.tags["ddpm.restarts"]) == ("2", "4")
    for name in ("model.pt", "ema.pt"):
        a, b = weights(reference, name), weights(killed, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # two runs of the same params (one of them interrupted, each with its own MLflow run and
    # seconds): the same models/ bytes, so the same hash in dvc.lock
    for name in ("model.json", "ema.pt", "model.pt"):
        assert (killed.model_dir / name).read_bytes() == (reference.model_dir / name).read_bytes()


@pytest.mark.slow
def test_one_worker_with_the_whole_batch_matches_two_workers(tmp_path, monkeypatch):
    # Dropout 0: each rank draws its own dropout masks, so only the rest is worker-independent.
    reference = train(tmp_path / "two", monkeypatch, dropout=0.0)
    single = train(tmp_path / "one", monkeypatch, num_workers=1, dropout=0.0)
    assert single.run_name == reference.run_name  # the worker count is not part of the run
    cfg = make_project(tmp_path / "init")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.0))
    init = make_state(cfg, cfg.variant(VARIANT), torch.device("cpu")).model.state_dict()
    for name in ("model.pt", "ema.pt"):
        a, b = weights(reference, name), weights(single, name)
        update = torch.cat([(a[k] - init[k]).flatten() for k in a]).norm()
        difference = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
        # Float rounding only. The largest differences sit in the biases that a per-channel
        # GroupNorm cancels: their true gradient is 0 and Adam scales up rounding noise there.
        assert difference < 1e-3 * update, (name, difference.item(), update.item())


@pytest.mark.slow
def test_a_failed_worker_is_restarted_and_changes_nothing(reference, tmp_path, monkeypatch):
    retried = train(tmp_path, monkeypatch, fault="fail:1:6")
    assert retried.restarts == [4]  # rank 1 failed at step 6: all restarted from step 4
    for name in ("model.pt", "ema.pt"):
        a, b = weights(reference, name), weights(retried, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_divergence_names_the_step_and_the_last_good_checkpoint(tmp_path, monkeypatch):
    with pytest.raises(TrainingDivergedError) as error:
        train(tmp_path, monkeypatch, fault="nan:1:6")  # before step 6, counting from 0
    folder = tmp_path / "checkpoints" / VARIANT
    (run_dir,) = folder.iterdir()
    assert str(error.value) == (
        "training diverged: the loss or the gradient norm became NaN or infinite in step 7 of 12;"
        f" last good checkpoint: after step 4, {run_dir / 'checkpoint_000000004'}"
    )
    assert not (tmp_path / "models").exists()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(client.search_experiments()[0].experiment_id)
    assert run.data.tags["ddpm.train_status"] == "diverged"


@pytest.mark.slow
def test_two_workers_resume_on_one_worker(tmp_path, monkeypatch):
    """Checkpointed with 2 workers, continued with 1: resumes at the step, matches to rounding.

    Dropout 0, as in the 1-vs-2-worker test: each rank draws its own dropout masks."""
    reference = train(tmp_path / "two", monkeypatch, dropout=0.0)
    run = tmp_path / "run"
    with pytest.raises(Exception, match="InjectedFault"):  # dies after step 4's save
        train(run, monkeypatch, fault="fail:1:6", max_failures=0, dropout=0.0)
    monkeypatch.delenv(faults.ENV)
    single = train(run, monkeypatch, num_workers=1, dropout=0.0)
    assert (single.run_name, single.start, single.steps) == (reference.run_name, 4, 12)
    cfg = make_project(tmp_path / "init")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.0))
    init = make_state(cfg, cfg.variant(VARIANT), torch.device("cpu")).model.state_dict()
    for name in ("model.pt", "ema.pt"):
        a, b = weights(reference, name), weights(single, name)
        update = torch.cat([(a[k] - init[k]).flatten() for k in a]).norm()
        difference = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
        assert difference < 1e-3 * update, (name, difference.item(), update.item())


@pytest.mark.slow
def test_evaluation_during_training_selects_the_lowest_fid(tmp_path, monkeypatch):
    """eval_every 4 on Ray beside one training worker: FIDs of steps 4, 8, 12 logged as
    fid_during_training, stored per step, and select best_fid exports the lowest one."""
    from pipeline.data import open_split
    from pipeline.evaluation.feature_weights import resolve_inception_weights
    from pipeline.evaluation.fidelity import compute_reference_stats

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    keys = {"num_workers": 1, "eval_every": 4, "eval_samples": 2, "select": "best_fid"}
    # keep 3: with 2, checkpoint 4 is pruned when 12 is written, often before the driver polls
    # (tiny trains 4 steps in ~0.2 s; the newest checkpoint waits SETTLE_S = 2 s)
    keys["keep_checkpoints"] = 3
    cfg = make_project(tmp_path, **keys)  # stand-in Inception: no featurenet stage needed here
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, inception_weights="stand-in"))
    weights = resolve_inception_weights(cfg.eval, tmp_path / "work" / "fidelity")
    train = open_split(tmp_path / "data" / cfg.scale, "train")[:3]
    ref = tmp_path / "reference" / cfg.scale
    compute_reference_stats(train, "train", weights, tmp_path / "c", ref, is_splits=1)
    summary = train_variant(cfg, cfg.variant(VARIANT), tmp_path)
    run_dir = tmp_path / "checkpoints" / VARIANT / summary.run_name
    records = EvalRecords(run_dir).all()
    assert [r["step"] for r in records] == [4, 8, 12]
    best = min(records, key=lambda r: (r["fid"], r["step"]))
    selection = summary.model_json["selection"]
    assert selection["selected_step"] == best["step"] == summary.model_json["steps"]
    assert selection["evaluations"] == 3
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = summary.mlflow_run_id
    history = client.get_metric_history(run_id, "fid_during_training")
    assert sorted((m.step, m.value) for m in history) == [(r["step"], r["fid"]) for r in records]
    assert f"step {best['step']} selected" in client.get_run(run_id).data.tags["ddpm.selection"]


def test_a_truncated_checkpoint_in_a_ray_train_run_is_scored_later_and_can_be_selected(
    tmp_path, monkeypatch, caplog
):
    """eval_every 4, select best_fid, one Ray Train worker, 8 steps: the first time the
    evaluator reads the checkpoint of step 4, its state.pt is cut in half (as NFS serves a file
    Ray Train is still writing). It is skipped with one warning, read again whole at a later
    poll (while training runs, or in finish()'s retries if the first read was finish()'s),
    scored and, having the lowest FID, exported. Ray Train's own folder is not touched (a
    truncation there would race Ray Train's write): the bytes the evaluator reads are cut, in
    its copy. The scorer is a controlled one (FIDs by step) run as the real Ray task; the real
    scorer's FID is test_selection's and the slow test above's.
    """
    from pipeline.evaluation.inception import InceptionWeights
    from pipeline.layout import reference_dir
    from pipeline.training import checkpoint, eval_during, trainer

    fids = {4: 1.5, 8: 3.0}  # the truncated checkpoint is the best one, not the last

    def scorer(cfg, variant, step, ema, reference, weights, weights_file) -> float:
        assert ema and reference == b"statistics"  # arrived through the object store
        return fids[step]  # a closure: pickled by value for the Ray task

    real_make, real_read = trainer.make_evaluator, checkpoint.read_checkpoint
    truncated: list[int] = []

    def make_evaluator(cfg, variant, run_dir, root):
        evaluator = real_make(cfg, variant, run_dir, root)
        evaluator.scorer, evaluator.weights = scorer, InceptionWeights(None, "none", True)
        return evaluator

    def read_checkpoint(folder):
        state = Path(folder) / checkpoint.STATE
        if Path(folder).name == ".pending-000000004" and not truncated:
            whole = state.read_bytes()
            state.write_bytes(whole[: len(whole) // 2])
            truncated.append(len(whole))
            print(f"\nstep 4 cut short at its first read, {'after' if ended else 'in'} training")
        return real_read(folder)

    ended: list[bool] = []  # fit() returned: the evaluator's finish() is next
    real_fit = trainer.fit
    monkeypatch.setattr(trainer, "fit", lambda *a: (real_fit(*a), ended.append(True))[0])
    monkeypatch.setattr(trainer, "make_evaluator", make_evaluator)
    monkeypatch.setattr(checkpoint, "read_checkpoint", read_checkpoint)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    keys = {"num_workers": 1, "eval_every": 4, "eval_samples": 2, "select": "best_fid"}
    cfg = make_project(tmp_path, **keys, steps=8)  # checkpoints 4 and 8, both kept
    (tmp_path / reference_dir(cfg.scale)).mkdir(parents=True)
    (tmp_path / reference_dir(cfg.scale) / "train-stats.pt").write_bytes(b"statistics")
    with caplog.at_level("WARNING", logger=eval_during.__name__):
        summary = train_variant(cfg, cfg.variant(VARIANT), tmp_path)
    assert truncated, "the evaluator never read the checkpoint of step 4"
    warned = [r.getMessage() for r in caplog.records if r.name == eval_during.__name__]
    assert len(warned) == 1 and "step 4 not loadable yet" in warned[0], warned
    run_dir = tmp_path / "checkpoints" / VARIANT / summary.run_name
    records = EvalRecords(run_dir).all()
    assert [(r["step"], r["fid"]) for r in records] == sorted(fids.items())
    selection = summary.model_json["selection"]
    assert selection["selected_step"] == summary.model_json["steps"] == 4
    exported, _ = load_weights(summary.model_dir / "ema.pt")
    kept = real_read(EvalRecords(run_dir).best_checkpoint())["ema"]  # step 4's, whole
    assert all(torch.equal(exported.state_dict()[k], kept[k]) for k in kept)
